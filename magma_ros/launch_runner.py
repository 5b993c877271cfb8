"""Run ROS 2 declarative YAML launch files (the ``launch_yaml`` frontend) without ``ros2 launch``.

The ``launch``/``launch_ros``/``ros2cli`` packages have no wheels, so this module executes the same
``launch/*.launch.yaml`` files that ``ros2 launch magma_ros sim.launch.yaml robot:=fr3`` runs on a
real install. It follows the launch_yaml schema exactly (entity and attribute names, attribute
types, ``if``/``unless`` conditions, the substitution grammar) and rejects what the real tooling
would reject, so a file that runs here also runs under ``ros2 launch``.

Supported entities: ``arg`` (with ``choice``), ``let``, ``set_env``, ``unset_env``, ``append_env``,
``log``, ``include``, ``group`` (``scoped``, ``forwarding``), ``push_ros_namespace`` /
``push-ros-namespace``, ``set_parameter``, ``set_parameters_from_file``, ``set_remap``,
``set_use_sim_time``, ``node`` and ``executable``. Substitutions: ``var``, ``env``, ``eval`` (a safe
subset: literals, comparisons, ``and``/``or``/``not``, ``if-else``; no names, calls or attributes),
``not``, ``and``, ``or``, ``equals``, ``not-equals``, ``if``, ``find-pkg-share``, ``find-pkg-prefix``,
``find-exec``, ``dirname``, ``filename``, ``anon``. ``command`` (arbitrary shell) is refused.

Parameters are typed as launch_ros types them: ``set_parameter`` values are strings, YAML-parsed
(``"true"`` is a bool); a node ``param`` value keeps its YAML type (a plain string stays a string), a
substituted string is YAML-parsed, lists have one item type, ``type:`` coerces.

Processes: ``pkg: magma_ros, exec: magma_ros_<name>`` runs ``python -m magma_ros.nodes.<name>``;
another package's executable is ``<prefix>/lib/<pkg>/<exec>`` of its ament index prefix under
``AMENT_PREFIX_PATH``; a package or executable that is not installed is an error with launch_ros's
message (``package 'realsense2_camera' not found, searching: [...]``), as under ``ros2 launch``.
``executable`` entities (and nodes without ``pkg``) whose command is not on PATH are skipped with one
log line (``ros2 launch`` logs the error and starts the rest). Every child runs in its own process group;
Ctrl-C / SIGTERM (or a node with ``on_exit: shutdown``, or a name in ``required``, exiting) stops
all of them: SIGINT, then SIGTERM after ``sigterm_timeout``, then SIGKILL after ``sigkill_timeout``.

Python callers::

    with LaunchRunner("sim.launch.yaml", {"robot": "fr3"}) as run:   # starts the processes
        run.processes["safety"].poll()

Command line: ``python -m magma_ros.launch_runner FILE [name:=value ...] [--show-args] [--print]``.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import operator
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from magma_ros.core.errors import ConfigError, choose

PACKAGE = "magma_ros"
LOG_PREFIX = "[launch]"


# --------------------------------------------------------------------------------------------
# Substitutions: parsing (the launch frontend grammar) and evaluation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sub:
    """One ``$(name arg ...)`` substitution; each argument is a list of text / Sub parts."""

    name: str
    args: tuple[tuple, ...]


_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class _SubstitutionParser:
    """Recursive-descent parser for launch's substitution grammar (grammar.lark)."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"bad substitution in '{self.s}': {msg} (at column {self.i + 1})")

    def template(self) -> list:
        parts: list = []
        buf = []
        while self.i < len(self.s):
            if self.s.startswith("$(", self.i):
                if buf:
                    parts.append("".join(buf))
                    buf = []
                parts.append(self.substitution())
            elif self.s[self.i] == "\\" and self.i + 1 < len(self.s):
                buf.append(self.s[self.i + 1])
                self.i += 2
            else:
                buf.append(self.s[self.i])
                self.i += 1
        if buf:
            parts.append("".join(buf))
        return parts

    def substitution(self) -> Sub:
        self.i += 2  # "$("
        m = _IDENT.match(self.s, self.i)
        if not m:
            raise self.error("expected a substitution name after '$('")
        name = m.group(0)
        self.i = m.end()
        args = []
        while True:
            if self.i >= len(self.s):
                raise self.error(f"unterminated $({name} ...)")
            c = self.s[self.i]
            if c == ")":
                self.i += 1
                return Sub(name, tuple(tuple(a) for a in args))
            if c != " ":
                raise self.error(f"expected ' ' or ')' in $({name} ...)")
            while self.i < len(self.s) and self.s[self.i] == " ":
                self.i += 1
            if self.i < len(self.s) and self.s[self.i] == ")":
                continue
            args.append(self.value())

    def value(self) -> list:
        q = self.s[self.i]
        if q in "'\"":
            self.i += 1
            return self.scan(q)
        return self.scan(None)

    def scan(self, q: str | None) -> list:
        """Text and substitutions up to the closing quote ``q`` (None: an unquoted argument, which ends
        at ' ' or ')'). In quotes a backslash escapes only the quote, '$' and itself."""
        parts: list = []
        buf = []
        while True:
            if self.i >= len(self.s):
                if q is None:
                    break
                raise self.error(f"unterminated {q}-quoted argument")
            c = self.s[self.i]
            if q is not None and c == q:
                self.i += 1
                break
            if self.s.startswith("$(", self.i):
                if buf:
                    parts.append("".join(buf))
                    buf = []
                parts.append(self.substitution())
                continue
            if c == "\\" and self.i + 1 < len(self.s) and (q is None or self.s[self.i + 1] in (q, "$", "\\")):
                buf.append(self.s[self.i + 1])
                self.i += 2
                continue
            if q is None and c in " )":
                break
            if q is None and c in "('\"":
                raise self.error(f"unexpected {c!r} in an unquoted argument (quote it)")
            buf.append(c)
            self.i += 1
        if buf:
            parts.append("".join(buf))
        return parts


def parse_substitution(text: str) -> list:
    """Parse a launch string into a list of plain text and :class:`Sub` parts."""
    if not text:
        return [text]
    return _SubstitutionParser(text).template()


_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b}
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Mod: operator.mod}


def safe_eval(expr: str):
    """Evaluate a ``$(eval ...)`` expression restricted to literals and logic (no names or calls).

    >>> safe_eval("'fr3' == 'fr3' and not False")
    True
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"$(eval) cannot parse '{expr}': {e.msg}") from None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (str, int, float, bool, type(None))):
            return n.value
        if isinstance(n, ast.Name) and n.id in ("True", "False", "None", "true", "false"):
            return {"True": True, "true": True, "False": False, "false": False, "None": None}[n.id]
        if isinstance(n, (ast.Tuple, ast.List)):
            return tuple(ev(e) for e in n.elts)
        if isinstance(n, ast.BoolOp):
            vals = [ev(v) for v in n.values]
            out = vals[0]
            for v in vals[1:]:
                out = (out and v) if isinstance(n.op, ast.And) else (out or v)
            return out
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Not, ast.USub, ast.UAdd)):
            v = ev(n.operand)
            if isinstance(n.op, ast.Not):
                return not v
            if not isinstance(v, (int, float)):
                raise ConfigError(f"$(eval) '{expr}': unary minus needs a number")
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.Compare):
            left = ev(n.left)
            for op, right_n in zip(n.ops, n.comparators):
                right = ev(right_n)
                if type(op) not in _CMP:
                    raise ConfigError(f"$(eval) '{expr}': operator {type(op).__name__} not allowed")
                if not _CMP[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Add) and isinstance(a, str) and isinstance(b, str):
                return a + b
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
                raise ConfigError(f"$(eval) '{expr}': arithmetic needs numbers")
            return _BIN[type(n.op)](a, b)
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        raise ConfigError(f"$(eval) '{expr}': only literals, comparisons and and/or/not are allowed "
                          f"here (found {type(n).__name__})")

    return ev(tree)


def _truth(text: str, where: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    raise ConfigError(f"{where}: expected true/false/1/0, got '{text}'")


# --------------------------------------------------------------------------------------------
# Plan: what the file asks for, with every substitution performed
# --------------------------------------------------------------------------------------------

@dataclass
class ProcessSpec:
    """One process the launch file starts, fully resolved."""

    label: str  # unique display name ("safety", "sim", "talker-2")
    cmd: list[str]  # argv
    env: dict[str, str]  # complete environment
    output: str = "log"  # screen | log | both
    required: bool = False  # on_exit: shutdown
    respawn: bool = False
    respawn_delay: float = 0.0  # [s]
    respawn_max_retries: int = -1  # respawns allowed; negative: no limit (launch's default)
    sigterm_timeout: float = 5.0  # [s] after SIGINT before SIGTERM
    sigkill_timeout: float = 5.0  # [s] after SIGTERM before SIGKILL
    cwd: str | None = None
    package: str = ""
    executable: str = ""
    node_name: str | None = None
    namespace: str | None = None  # absolute, e.g. "/" or "/arm1"
    parameters: dict = field(default_factory=dict)  # merged inline parameters (name -> value)
    param_files: list[str] = field(default_factory=list)
    remaps: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Plan:
    """Everything a launch file resolves to for a given set of arguments."""

    processes: list[ProcessSpec]
    arguments: dict[str, str]  # every declared argument -> final value
    declared: dict[str, dict]  # name -> {default, description, choices}
    skipped: list[str]  # one line per node whose executable is not installed here
    messages: list[str]  # `log` entities


_COMMON = {"if", "unless"}
_PROC_KEYS = {"cwd", "name", "on_exit", "launch-prefix", "output", "respawn", "respawn_max_retries",
              "respawn_delay", "sigkill_timeout", "sigterm_timeout", "shell", "emulate_tty", "env"}
_SCHEMA: dict[str, set[str]] = {
    "arg": {"name", "default", "description", "choice"},
    "let": {"name", "value"},
    "set_env": {"name", "value"},
    "unset_env": {"name"},
    "append_env": {"name", "value", "prepend", "separator"},
    "log": {"message"},
    "include": {"file", "arg"},
    "group": {"scoped", "forwarding", "keep", "children"},
    "push_ros_namespace": {"namespace"},
    "push-ros-namespace": {"namespace"},
    "set_parameter": {"name", "value"},
    "set_parameters_from_file": {"filename"},
    "set_remap": {"from", "to"},
    "set_use_sim_time": {"value"},
    "node": _PROC_KEYS | {"exec", "pkg", "namespace", "remap", "param", "args", "ros_args", "exec_name",
                          "node-name"},
    "executable": _PROC_KEYS | {"cmd"},
}
# Attributes whose YAML value must be a string (launch_yaml checks the type; quote numbers/bools).
_BOOL_ATTRS = {("group", "scoped"), ("group", "forwarding"), ("node", "shell"), ("node", "emulate_tty"),
               ("executable", "shell"), ("executable", "emulate_tty"), ("append_env", "prepend")}
_NUM_ATTRS = {"respawn_max_retries", "respawn_delay", "sigkill_timeout", "sigterm_timeout"}
_LIST_ATTRS = {"choice", "arg", "children", "keep", "remap", "param", "env"}


def node_modules() -> list[str]:
    """Node modules of this package (``magma_ros.nodes.<name>``), i.e. valid ``magma_ros_<name>``."""
    d = Path(__file__).resolve().parent / "nodes"
    return sorted(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))


def package_prefix(pkg: str, env: dict | None = None) -> Path:
    """Install prefix of ``pkg`` from the ament index under ``AMENT_PREFIX_PATH`` (ament_index_python's
    ``get_package_prefix``); raises with its ``PackageNotFoundError`` message, which ``ros2 launch`` prints."""
    paths = [x for x in (os.environ if env is None else env).get("AMENT_PREFIX_PATH", "").split(os.pathsep) if x]
    for prefix in paths:
        if Path(prefix, "share", "ament_index", "resource_index", "packages", pkg).is_file():
            return Path(prefix)
    raise ConfigError(f"package '{pkg}' not found, searching: {paths}")


def find_package_share(pkg: str, env: dict | None = None) -> Path:
    """Share directory of ``pkg``: this package's data, or an ament index entry."""
    if pkg == PACKAGE:
        from magma_ros.core.paths import share_dir

        return share_dir()
    return package_prefix(pkg, env) / "share" / pkg


def _ros_value(v):
    """Format a parameter value for a ``-p name:=value`` rule / YAML params file."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return yaml.safe_dump(v, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()


# --------------------------------------------------------------------------------------------
# Parameter typing: launch_ros's rules (frontend/parse_substitution.py parse_if_substitutions,
# utilities/type_utils.py normalize/perform_typed_substitution, launch_ros evaluate_parameter_dict)
# --------------------------------------------------------------------------------------------

_SCALARS = (int, float, bool, str)  # launch's ScalarTypesTuple
# `type:` of a node `param` (launch/frontend/type_utils.py): None = YAML rules; else (scalar type, is list)
_PARAM_TYPES: dict[str, tuple[type, bool] | None] = {
    "str": (str, False), "bool": (bool, False), "float": (float, False), "int": (int, False),
    "list_of_str": (str, True), "list_of_bool": (bool, True), "list_of_float": (float, True),
    "list_of_int": (int, True), "yaml": None}


def _type_text(dtype) -> str:
    """How launch prints a data type in its errors ('None', "<class 'float'>", 'typing.List[int]')."""
    if dtype is None:
        return "None"
    t, is_list = dtype
    return f"typing.List[{t.__name__}]" if is_list else f"<class '{t.__name__}'>"


def _uniform(value, can_be_str: bool) -> bool:
    """launch's ``is_instance_of_valid_type``: a scalar, or a list whose items share the first non-str type."""
    if isinstance(value, list):
        if not value:
            return True
        member = next((type(x) for x in value if type(x) is not str), str)
        if member not in _SCALARS:
            return False
        valid = (member, str) if can_be_str else member
        return all(isinstance(x, valid) for x in value)
    return isinstance(value, _SCALARS)


def _is_instance(value, dtype, can_be_str: bool) -> bool:
    """launch's ``is_instance_of`` (``isinstance(True, int)`` holds there too)."""
    if dtype is None:
        return _uniform(value, can_be_str)
    t, is_list = dtype
    types = (str, t) if can_be_str else t
    if not is_list:
        return isinstance(value, types)
    return isinstance(value, list) and all(isinstance(x, types) for x in value)


def _yaml_value(text: str, what: str):
    """launch's ``coerce_to_type(text, None)``: YAML rules; the result must be a scalar or a uniform list."""
    if not text:
        return text
    try:
        out = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: failed to convert '{text}' using yaml rules: yaml.safe_load() failed "
                          f"({str(e).splitlines()[0]})") from None
    if not _uniform(out, can_be_str=False):
        raise ConfigError(f"{what}: failed to convert '{text}' using yaml rules: output type is not allowed, "
                          f"got {type(out)} (a parameter is a scalar or a uniform list; ros2 launch rejects "
                          f"it too: quote ': ' / '#' inside the value)")
    return out


def _coerce(text: str, dtype, what: str):
    """launch's ``coerce_to_type(text, dtype)`` (``can_be_str=False``, as ``ParameterValue`` uses it)."""
    if dtype is None:
        return _yaml_value(text, what)
    t, is_list = dtype
    if is_list:
        out = _yaml_value(text, what)
        if not isinstance(out, list) or not all(isinstance(x, t) for x in out):
            raise ConfigError(f"{what}: cannot convert value '{text}' to a list of '{t}'")
        return out
    if t is str:
        return text
    if t in (int, float):
        try:
            return t(text)
        except ValueError:
            raise ConfigError(f"{what}: cannot convert value '{text}' to {t}") from None
    out = _yaml_value({"1": "true", "0": "false"}.get(text, text), what)
    if not isinstance(out, bool):
        raise ConfigError(f"{what}: cannot convert value '{text}' to '{t}'")
    return out


def _global_param_value(text: str, name: str, where: str):
    """A ``set_parameter`` value as launch_ros's ``evaluate_parameter_dict`` types it: always YAML-parsed
    (``"true"`` is a bool, ``"10"`` an int); a list must be non-empty and of one item type."""
    try:
        y = yaml.safe_load(text or "''")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: unable to parse the value of parameter {name} as yaml ('{text}')") from None
    if type(y) in (bool, int, float, str):
        return y
    if isinstance(y, list):
        if not (y and type(y[0]) in _SCALARS and all(isinstance(x, type(y[0])) for x in y)):
            raise ConfigError(f"{where}: expected a non-empty sequence, with items of uniform type. Allowed "
                              f"sequence item types are bool, int, float, str. Got inconsistent input for "
                              f"\"{name}\" ('{text}')")
        return y
    raise ConfigError(f"{where}: allowed value types are bool, int, float, str, Sequence[bool], Sequence[int], "
                      f"Sequence[float], Sequence[str]. Got {type(y)} for \"{name}\" ('{text}')")


class _Scope:
    """Launch configurations + environment + ROS namespace/params/remaps (what groups scope)."""

    def __init__(self, configs: dict, env: dict, state: dict | None = None):
        self.configs = configs
        self.env = env
        self.state = state or {"ns": None, "params": [], "remaps": []}

    def copy(self, env: bool = True) -> _Scope:
        st = {"ns": self.state["ns"], "params": list(self.state["params"]),
              "remaps": list(self.state["remaps"])}
        return _Scope(dict(self.configs), dict(self.env) if env else self.env, st)


class _Planner:
    def __init__(self, exec_map: dict | None, python: str):
        self.exec_map = dict(exec_map or {})
        self.python = python
        self.processes: list[ProcessSpec] = []
        self.declared: dict[str, dict] = {}
        self.skipped: list[str] = []
        self.messages: list[str] = []
        self.file_stack: list[Path] = []
        self.labels: dict[str, int] = {}

    # -- substitutions -------------------------------------------------------------------
    def sub(self, text, scope: _Scope) -> str:
        if not isinstance(text, str):
            return str(text)
        return self.perform(parse_substitution(text), scope)

    def perform(self, parts, scope: _Scope) -> str:
        return "".join(p if isinstance(p, str) else self.eval_sub(p, scope) for p in parts)

    def eval_sub(self, s: Sub, scope: _Scope) -> str:
        args = [self.perform(a, scope) for a in s.args]
        n = len(args)

        def need(lo, hi=None):
            hi = lo if hi is None else hi
            if not lo <= n <= hi:
                span = f"{lo}" + (f"-{hi}" if hi != lo else "")
                raise ConfigError(f"$({s.name}) takes {span} arguments, got {n}")

        here = self.file_stack[-1] if self.file_stack else Path.cwd() / "<launch>"
        if s.name == "var":
            need(1, 2)
            if args[0] in scope.configs:
                return scope.configs[args[0]]
            if n == 2:
                return args[1]
            raise ConfigError(f"{here.name}: launch configuration '{args[0]}' does not exist; "
                              f"defined: {', '.join(sorted(scope.configs)) or '(none)'}")
        if s.name == "env":
            need(1, 2)
            v = scope.env.get(args[0], args[1] if n == 2 else None)
            if v is None:
                raise ConfigError(f"environment variable '{args[0]}' does not exist (give a default: "
                                  f"$(env {args[0]} DEFAULT))")
            return v
        if s.name == "eval":
            need(1)
            return str(safe_eval(args[0]))
        if s.name == "not":
            need(1)
            return str(not _truth(args[0], "$(not)")).lower()
        if s.name in ("and", "or", "all", "any"):
            vals = [_truth(a, f"$({s.name})") for a in args]
            return str(all(vals) if s.name in ("and", "all") else any(vals)).lower()
        if s.name in ("equals", "not-equals"):
            need(1, 2)
            a, b = args[0], (args[1] if n == 2 else "")
            return str((a == b) == (s.name == "equals")).lower()
        if s.name == "if":
            need(1, 3)
            return (args[1] if n > 1 else "") if _truth(args[0], "$(if)") else (args[2] if n > 2 else "")
        if s.name == "find-pkg-share":
            need(1)
            return str(find_package_share(args[0], scope.env))
        if s.name == "find-pkg-prefix":
            need(1)
            return str(find_package_share(args[0], scope.env).parent.parent)
        if s.name == "find-exec":
            need(1)
            p = shutil.which(args[0])
            if p is None:
                raise ConfigError(f"$(find-exec): executable '{args[0]}' not found on PATH")
            return p
        if s.name == "dirname":
            need(0)
            return str(here.parent)
        if s.name == "filename":
            need(0)
            return str(here)
        if s.name == "anon":
            need(1)
            return f"{args[0]}_{uuid.uuid4().hex[:12]}"
        valid = ["var", "env", "eval", "not", "and", "or", "equals", "not-equals", "if", "find-pkg-share",
                 "find-pkg-prefix", "find-exec", "dirname", "filename", "anon"]
        if s.name == "command":
            raise ConfigError("$(command) runs arbitrary shell commands; not supported by this runner")
        choose(s.name, valid, "substitution")
        raise AssertionError  # pragma: no cover

    # -- entities ------------------------------------------------------------------------
    def check(self, kind: str, attrs: dict) -> None:
        if not isinstance(attrs, dict):
            raise ConfigError(f"{self.where()}: '{kind}' needs a mapping of attributes, got {attrs!r}")
        allowed = _SCHEMA[kind] | _COMMON
        for k, v in attrs.items():
            if k not in allowed:
                raise ConfigError(f"{self.where()}: unexpected key '{k}' in '{kind}'; valid: "
                                  f"{', '.join(sorted(allowed))}")
            if k in _NUM_ATTRS:
                self.check_number(kind, k, v)
                continue
            if (kind, k) in _BOOL_ATTRS and not isinstance(v, (bool, str)):
                raise ConfigError(f"{self.where()}: '{kind}' attribute '{k}' must be true/false, got "
                                  f"{type(v).__name__} {v!r} (ros2 launch: TypeError: Attribute '{k}' of Entity "
                                  f"'{kind}' expected to be of type '<class 'bool'>', got '{type(v)}')")
            if k in _LIST_ATTRS or (kind, k) in _BOOL_ATTRS:
                continue
            if not isinstance(v, str):
                raise ConfigError(f"{self.where()}: '{kind}' attribute '{k}' must be a string, got "
                                  f"{type(v).__name__} {v!r} (quote it in YAML; ros2 launch: TypeError: "
                                  f"Attribute '{k}' of Entity '{kind}' expected to be of type "
                                  f"'<class 'str'>', got '{type(v)}')")
        for k in _LIST_ATTRS & attrs.keys():
            v = attrs[k]
            if not (isinstance(v, list) and v and all(isinstance(e, dict) for e in v)):
                raise ConfigError(f"{self.where()}: '{kind}' attribute '{k}' must be a list of mappings")
        if "if" in attrs and "unless" in attrs:
            raise ConfigError(f"{self.where()}: '{kind}' cannot have both 'if' and 'unless'")

    def check_number(self, kind: str, k: str, v) -> None:
        """``respawn_delay`` / ``sigterm_timeout`` / ``sigkill_timeout``: a YAML float (launch reads them with
        ``data_type=float`` and compares with 0.0, so an int or a string fails); ``respawn_max_retries``:
        a YAML int."""
        want = int if k == "respawn_max_retries" else float
        if isinstance(v, want) and not isinstance(v, bool):
            if want is float and v < 0:
                raise ConfigError(f"{self.where()}: Attribute {k} of Entity {kind} expected to be a non-negative "
                                  f"value but got `{v}`")
            return
        example = "3" if want is int else "2.0"
        real = ("'<' not supported between instances of 'str' and 'float'" if isinstance(v, str) and want is float
                else f"Attribute '{k}' of Entity '{kind}' expected to be of type '{want}', got '{type(v)}'")
        raise ConfigError(f"{self.where()}: '{kind}' attribute '{k}' must be a YAML {want.__name__} such as "
                          f"{k}: {example}, got {type(v).__name__} {v!r} (ros2 launch: TypeError: {real})")

    def where(self) -> str:
        return str(self.file_stack[-1]) if self.file_stack else "<launch>"

    def enabled(self, attrs: dict, scope: _Scope, kind: str) -> bool:
        if "if" in attrs:
            return _truth(self.sub(attrs["if"], scope), f"{self.where()}: '{kind}' condition 'if'")
        if "unless" in attrs:
            where = f"{self.where()}: '{kind}' condition 'unless'"
            return not _truth(self.sub(attrs["unless"], scope), where)
        return True

    def run_file(self, path: Path, scope: _Scope) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"launch file not found: {path}")
        if not re.search(r"\.(launch\.)?ya?ml$", path.name):
            raise ConfigError(f"{path}: only YAML launch files (*.launch.yaml) can run here")
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict) or list(tree) != ["launch"]:
            raise ConfigError(f"{path}: expected a single root key 'launch'")
        root = tree["launch"]
        if isinstance(root, dict):
            extra = set(root) - {"children", "deprecated"}
            if extra:
                raise ConfigError(f"{path}: unexpected key(s) {sorted(extra)} in 'launch'")
            root = root.get("children", [])
        if not isinstance(root, list):
            raise ConfigError(f"{path}: 'launch' must hold a list of entities")
        self.file_stack.append(path.resolve())
        try:
            self.entities(root, scope)
        finally:
            self.file_stack.pop()

    def entities(self, items: list, scope: _Scope) -> None:
        for item in items:
            if not isinstance(item, dict) or len(item) != 1:
                raise ConfigError(f"{self.where()}: each entity must be a mapping with one key (the entity "
                                  f"type), got {item!r}")
            (kind, attrs), = item.items()
            if kind not in _SCHEMA:
                choose(kind, sorted(_SCHEMA), f"launch entity in {self.where()}")
            self.check(kind, attrs)
            if not self.enabled(attrs, scope, kind):
                if kind == "arg":  # conditionally declared arguments still count as known names
                    self.declared.setdefault(attrs["name"], {"default": None, "description": "",
                                                             "choices": None})
                continue
            getattr(self, "e_" + kind.replace("-", "_"))(attrs, scope)

    def e_arg(self, a: dict, scope: _Scope) -> None:
        name = a["name"]
        choices = [c.get("value") for c in a.get("choice", [])] or None
        self.declared[name] = {"default": a.get("default"), "description": a.get("description", ""),
                               "choices": choices}
        if name not in scope.configs:
            if "default" not in a:
                raise ConfigError(f"launch argument '{name}' is required ({a.get('description', '')}); "
                                  f"pass {name}:=VALUE")
            scope.configs[name] = self.sub(a["default"], scope)
        if choices is not None and scope.configs[name] not in choices:
            v = scope.configs[name]
            close = difflib.get_close_matches(v, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"invalid value '{v}' for launch argument '{name}'{hint}; valid: "
                              f"{', '.join(choices)}")

    def e_let(self, a, scope):
        scope.configs[self.sub(a["name"], scope)] = self.sub(a["value"], scope)

    def e_set_env(self, a, scope):
        scope.env[self.sub(a["name"], scope)] = self.sub(a["value"], scope)

    def e_unset_env(self, a, scope):
        scope.env.pop(self.sub(a["name"], scope), None)

    def e_append_env(self, a, scope):
        name, value = self.sub(a["name"], scope), self.sub(a["value"], scope)
        sep = self.sub(a.get("separator", os.pathsep), scope)
        prepend = a.get("prepend", False)
        prepend = _truth(self.sub(prepend, scope), "prepend") if isinstance(prepend, str) else bool(prepend)
        old = scope.env.get(name)
        scope.env[name] = value if not old else (value + sep + old if prepend else old + sep + value)

    def e_log(self, a, scope):
        self.messages.append(self.sub(a["message"], scope))

    def e_include(self, a, scope):
        f = Path(self.sub(a["file"], scope))
        for e in a.get("arg", []):
            if set(e) != {"name", "value"} or not all(isinstance(x, str) for x in e.values()):
                raise ConfigError(f"{self.where()}: include 'arg' entries need exactly 'name' and 'value' "
                                  f"(strings), got {e!r}")
            scope.configs[self.sub(e["name"], scope)] = self.sub(e["value"], scope)
        self.run_file(f, scope)

    def e_group(self, a, scope):
        if "children" not in a:
            raise ConfigError(f"{self.where()}: 'group' needs 'children'")
        scoped = a.get("scoped", True)
        scoped = _truth(self.sub(scoped, scope), "scoped") if isinstance(scoped, str) else bool(scoped)
        fwd = a.get("forwarding", True)
        fwd = _truth(self.sub(fwd, scope), "forwarding") if isinstance(fwd, str) else bool(fwd)
        if not scoped:
            self.entities(a["children"], scope)
            return
        inner = scope.copy()
        if not fwd:
            inner.configs = {}
        for k in a.get("keep", []):
            inner.configs[self.sub(k["name"], scope)] = self.sub(k["value"], scope)
        self.entities(a["children"], inner)

    def e_push_ros_namespace(self, a, scope):
        ns = _prefix_ns(scope.state["ns"], self.sub(a["namespace"], scope))
        scope.state["ns"] = _absolute_ns(ns)
        _validate_ns(scope.state["ns"])

    def e_set_parameter(self, a, scope):
        name = self.sub(a["name"], scope)
        value = _global_param_value(self.sub(a["value"], scope), name, f"{self.where()}: set_parameter")
        scope.state["params"].append((name, value))

    def e_set_parameters_from_file(self, a, scope):
        scope.state["params"].append(self.param_file(a["filename"], scope))

    def e_set_remap(self, a, scope):
        scope.state["remaps"].append((self.sub(a["from"], scope), self.sub(a["to"], scope)))

    def e_set_use_sim_time(self, a, scope):
        value = _truth(self.sub(a["value"], scope), "set_use_sim_time")
        scope.state["params"].append(("use_sim_time", value))

    def param_value(self, v, scope, type_id=None, name: str = ""):
        """A node ``param`` value, typed as launch_ros types it: a plain value keeps its YAML type (a plain
        string stays a string), a string with substitutions is YAML-parsed after substitution, a list keeps
        one item type; ``type:`` (str, bool, int, float, list_of_*, yaml) coerces substituted values."""
        what = f"{self.where()}: param '{name}'"
        if type_id is not None and (not isinstance(type_id, str) or type_id not in _PARAM_TYPES):
            raise ConfigError(f"{what}: got invalid type identifier '{type_id}'; valid: {', '.join(_PARAM_TYPES)}")
        dtype = _PARAM_TYPES[type_id] if type_id is not None else None
        if not _is_instance(v, dtype, can_be_str=True):
            raise ConfigError(f"{what}: Attribute 'value' of Entity 'param' expected to be of type "
                              f"'{_type_text(dtype)}', got '{type(v)}' (a scalar or a list of one item type)")
        kinds = set()

        def parse_if(x):  # parse_if_substitutions: plain text -> str, substitutions -> parts
            if isinstance(x, str):
                parts = parse_substitution(x)
                if all(isinstance(q, str) for q in parts):
                    kinds.add(str)
                    return "".join(parts)
                return parts
            kinds.add(type(x))
            return x

        is_sub = lambda x: isinstance(x, list)  # noqa: E731 - parsed substitution parts
        value = [parse_if(x) for x in v] if isinstance(v, list) else parse_if(v)
        if len(kinds) > 1:
            raise ConfigError(f"{what}: the result is a non-uniform list ({v!r}; ros2 launch: ValueError)")
        if not isinstance(v, list):
            if is_sub(value):
                return _coerce(self.perform(value, scope), dtype, what)
            if dtype is not None and not _is_instance(value, dtype, can_be_str=False):
                raise ConfigError(f"{what}: value='{value}' is not an instance of {_type_text(dtype)}")
            return value
        scalar = None
        if dtype is not None:
            scalar, is_list = dtype
            if not is_list:
                raise ConfigError(f"{what}: the provided value resolves to a list, though the required type is "
                                  f"a scalar ({_type_text(dtype)})")
        plain = {type(x) for x in value if not is_sub(x)}  # at most one type (checked above)
        if plain and scalar not in (None, *plain):
            raise ConfigError(f"{what}: got a list of '{plain.pop().__name__}', expected a list of '{scalar}'")
        out = [_coerce(self.perform(x, scope), (scalar, False) if scalar else None, what) if is_sub(x) else x
               for x in value]
        if not _is_instance(out, None if dtype is None else dtype, can_be_str=False):
            raise ConfigError(f"{what}: the output list " + (f"does not match the expected type {scalar}"
                              if scalar else "is not uniform") + f" ({out!r}; ros2 launch: ValueError)")
        return out

    def param_file(self, f, scope) -> str:
        p = Path(self.sub(f, scope))
        if not p.is_file():
            raise ConfigError(f"{self.where()}: parameter file not found: {p}")
        return str(p.resolve())

    def node_params(self, entries: list, scope: _Scope, prefix: str = ""):
        out: list = []  # dicts (inline) and str (files), in order
        for e in entries:
            keys = set(e)
            if "from" in keys:
                if keys - {"from", "allow_substs"}:
                    raise ConfigError(f"{self.where()}: param with 'from' takes no other keys "
                                      f"(got {sorted(keys)})")
                out.append(self.param_file(e["from"], scope))
                continue
            if "name" not in keys:
                raise ConfigError(f"{self.where()}: param entries need 'name' (with 'value' or nested "
                                  f"'param') or 'from'")
            if keys - {"name", "value", "param", "type"}:
                bad = sorted(keys - {"name", "value", "param", "type"})
                raise ConfigError(f"{self.where()}: unexpected key(s) {bad} in param '{e['name']}'")
            name = prefix + self.sub(e["name"], scope)
            if "param" in e and "value" in e:
                raise ConfigError(f"{self.where()}: param '{name}': nested parameters and value attributes are "
                                  f"mutually exclusive")
            if "param" in e and "type" in e:
                raise ConfigError(f"{self.where()}: param '{name}': nested parameters and type attributes are "
                                  f"mutually exclusive")
            if "param" in e:
                if not (isinstance(e["param"], list) and e["param"] and all(isinstance(x, dict) for x in e["param"])):
                    raise ConfigError(f"{self.where()}: param '{name}': nested 'param' must be a list of mappings")
                for d in self.node_params(e["param"], scope, prefix=name + "."):
                    out.append(d)
            elif "value" in e:
                out.append({name: self.param_value(e["value"], scope, e.get("type"), name)})
            else:
                raise ConfigError(f"{self.where()}: param '{name}': either a value attribute or nested params "
                                  f"are needed")
        return out

    def label(self, base: str) -> str:
        n = self.labels.get(base, 0) + 1
        self.labels[base] = n
        return base if n == 1 else f"{base}-{n}"

    def proc_common(self, a, scope, spec: ProcessSpec) -> None:
        if "output" in a:
            spec.output = choose(self.sub(a["output"], scope), ("screen", "log", "both", "own_log"), "output")
        if "on_exit" in a:
            if a["on_exit"] != "shutdown":
                raise ConfigError(f"{self.where()}: on_exit must be 'shutdown', got '{a['on_exit']}'")
            spec.required = True
        if "respawn" in a:
            spec.respawn = _truth(self.sub(a["respawn"], scope), "respawn")
        for k in ("respawn_delay", "sigterm_timeout", "sigkill_timeout", "respawn_max_retries"):
            if k in a:  # types checked in check_number()
                setattr(spec, k, a[k])
        if "cwd" in a:
            spec.cwd = self.sub(a["cwd"], scope)
        env = dict(scope.env)
        for e in a.get("env", []):
            env[self.sub(e["name"], scope)] = self.sub(e["value"], scope)
        env.setdefault("PYTHONUNBUFFERED", "1")
        spec.env = env
        if "launch-prefix" in a:
            spec.cmd = shlex.split(self.sub(a["launch-prefix"], scope)) + spec.cmd

    def e_executable(self, a, scope):
        cmd = shlex.split(self.sub(a["cmd"], scope))
        if not cmd:
            raise ConfigError(f"{self.where()}: 'executable' with an empty cmd")
        name = self.sub(a["name"], scope) if "name" in a else Path(cmd[0]).name
        if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
            self.skipped.append(f"skipping executable '{name}': '{cmd[0]}' not found on this machine")
            return
        spec = ProcessSpec(label=self.label(name), cmd=cmd, env={}, executable=cmd[0])
        self.proc_common(a, scope, spec)
        self.processes.append(spec)

    def resolve_exec(self, pkg: str, exe: str, env: dict) -> list[str] | None:
        """argv of a node's executable, as launch_ros's ExecutableInPackage finds it: ``<prefix>/lib/<pkg>/<exe>``
        of the package's ament index prefix (a missing package or executable is an error, as under
        ``ros2 launch``); without ``pkg``, ``exe`` on PATH (None when absent: the node is skipped)."""
        for key in (f"{pkg}/{exe}", exe):
            if key in self.exec_map:
                return list(self.exec_map[key])
        if pkg == PACKAGE:
            mods = node_modules()
            if exe.startswith(PACKAGE + "_") and exe[len(PACKAGE) + 1:] in mods:
                return [self.python, "-m", f"{PACKAGE}.nodes.{exe[len(PACKAGE) + 1:]}"]
            if exe.startswith(PACKAGE + "_") and importlib.util.find_spec(
                    f"{PACKAGE}.nodes.{exe[len(PACKAGE) + 1:]}") is not None:
                return [self.python, "-m", f"{PACKAGE}.nodes.{exe[len(PACKAGE) + 1:]}"]
            choose(exe, [f"{PACKAGE}_{m}" for m in mods], f"executable of package {PACKAGE}")
        if not pkg:
            p = shutil.which(exe, path=env.get("PATH"))
            return [p] if p else None
        libexec = package_prefix(pkg, env) / "lib" / pkg
        p = libexec / exe
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ConfigError(f"executable '{exe}' not found on the libexec directory '{libexec}'")
        return [str(p)]

    def e_node(self, a, scope):
        if "exec" not in a:
            raise ConfigError(f"{self.where()}: 'node' needs 'exec'")
        pkg = self.sub(a.get("pkg", ""), scope)
        exe = self.sub(a["exec"], scope)
        name = self.sub(a["name"], scope) if "name" in a else None
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{self.where()}: invalid node name '{name}' (letters, digits, '_')")
        ns = self.sub(a["namespace"], scope) if "namespace" in a else None
        ns = _absolute_ns(_prefix_ns(scope.state["ns"], ns))
        if ns is not None:
            _validate_ns(ns)
        base = self.resolve_exec(pkg, exe, scope.env)
        label = name or exe
        if base is None:
            self.skipped.append(f"skipping node '{label}': executable '{exe}' not found on PATH")
            return
        args = shlex.split(self.sub(a["args"], scope)) if "args" in a else []
        spec = ProcessSpec(label=self.label(label), cmd=[], env={}, package=pkg, executable=exe,
                           node_name=name, namespace=ns)
        ros = ["--ros-args"]
        if name:
            ros += ["-r", f"__node:={name}"]
        if ns is not None:
            ros += ["-r", f"__ns:={ns}"]
        inline: dict = {}
        items: list = []
        for g in scope.state["params"]:
            items.append({g[0]: g[1]} if isinstance(g, tuple) else g)
        items += self.node_params(a.get("param", []), scope)
        for it in items:
            if isinstance(it, str):
                spec.param_files.append(it)
                ros += ["--params-file", it]
            else:
                inline.update(it)
                for k, v in it.items():
                    ros += ["-p", f"{k}:={_ros_value(v)}"]
        spec.parameters = inline
        remaps = list(scope.state["remaps"])
        remaps += [(self.sub(r["from"], scope), self.sub(r["to"], scope)) for r in a.get("remap", [])]
        for r in a.get("remap", []):
            if set(r) != {"from", "to"}:
                raise ConfigError(f"{self.where()}: remap entries need exactly 'from' and 'to'")
        spec.remaps = remaps
        for src, dst in remaps:
            ros += ["-r", f"{src}:={dst}"]
        if "ros_args" in a:
            ros += shlex.split(self.sub(a["ros_args"], scope))
        spec.cmd = base + args + ros
        self.proc_common(a, scope, spec)
        self.processes.append(spec)


def _prefix_ns(base: str | None, ns: str | None) -> str | None:
    if base is None and ns is None:
        return None
    if ns is None:
        out = base
    elif not base or ns.startswith("/"):
        out = ns
    else:
        out = ("" if base == "/" else base) + "/" + ns
    return out if out in ("", "/") else out.rstrip("/")


def _absolute_ns(ns: str | None) -> str | None:
    if ns is None:
        return None
    return ns if ns.startswith("/") else "/" + ns


def _validate_ns(ns: str) -> None:
    if ns != "/" and not re.fullmatch(r"(/[A-Za-z_][A-Za-z0-9_]*)+", ns):
        raise ConfigError(f"invalid ROS namespace '{ns}' (use letters, digits and '_', e.g. arm1)")


def parse_cli_args(items: list[str]) -> dict[str, str]:
    """``['robot:=fr3', 'policy:=scripted']`` -> dict; a one-line error for anything else."""
    out = {}
    for it in items:
        if ":=" not in it:
            raise ConfigError(f"launch arguments look like name:=value, got '{it}'")
        k, v = it.split(":=", 1)
        if not k:
            raise ConfigError(f"launch argument with an empty name: '{it}'")
        out[k] = v
    return out


def resolve_launch_file(name: str | os.PathLike) -> Path:
    """A path, or a file name under this package's ``launch/`` (e.g. ``sim.launch.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    if p.parent == Path("."):
        try:
            from magma_ros.core.paths import data_path

            q = data_path("launch", p.name)
        except ConfigError:
            q = None
        if q is not None and q.is_file():
            return q
        try:
            from magma_ros.core.paths import data_path

            valid = sorted(x.name for x in data_path("launch").glob("*.launch.*"))
        except ConfigError:
            valid = []
        if valid:
            choose(p.name, valid, "launch file")
    raise ConfigError(f"launch file not found: {p}")


def plan(file: str | os.PathLike, args: dict | None = None, *, env: dict | None = None,
         exec_map: dict | None = None, python: str = sys.executable) -> Plan:
    """Resolve a launch file with ``args`` into the processes it would start (nothing is started)."""
    path = resolve_launch_file(file)
    args = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in (args or {}).items()}
    planner = _Planner(exec_map, python)
    scope = _Scope(dict(args), dict(os.environ if env is None else env))
    planner.run_file(path, scope)
    unknown = [k for k in args if k not in planner.declared]
    if unknown:
        choose(unknown[0], sorted(planner.declared), f"launch argument for {path.name}")
    values = {k: scope.configs.get(k, "") for k in planner.declared}
    return Plan(planner.processes, values, planner.declared, planner.skipped, planner.messages)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

class LaunchRunner:
    """Start the processes of a launch file, prefix and log their output, stop them all cleanly.

    ``required``: labels whose exit shuts everything down (in addition to ``on_exit: shutdown``).
    ``echo``: print ``screen``/``both`` output (prefixed ``[label]``) on this process's stdout.
    """

    def __init__(self, file: str | os.PathLike, args: dict | None = None, *, env: dict | None = None,
                 log_dir: str | os.PathLike | None = None, exec_map: dict | None = None,
                 required: tuple[str, ...] = (), echo: bool = True, stream=None):
        self.plan = plan(file, args, env=env, exec_map=exec_map)
        self.file = resolve_launch_file(file)
        for r in required:
            choose(r, [p.label for p in self.plan.processes], "required process")
        for p in self.plan.processes:
            p.required = p.required or p.label in required
        if log_dir is None:
            base = Path(os.environ.get("ROS_LOG_DIR") or Path.home() / ".ros" / "log")
            log_dir = base / f"magma_ros_launch_{time.strftime('%Y-%m-%d-%H-%M-%S')}_{os.getpid()}"
        self.log_dir = Path(log_dir)
        self.echo = echo
        self.stream = stream or sys.stdout
        self.processes: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, int] = {}
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._monitor: threading.Thread | None = None
        self._reason = ""

    # -- output ----------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        with self._lock:
            print(f"{LOG_PREFIX} {msg}", file=self.stream, flush=True)

    def log_path(self, label: str) -> Path:
        return self.log_dir / f"{label}.log"

    def log_text(self, label: str) -> str:
        p = self.log_path(label)
        return p.read_text(errors="replace") if p.exists() else ""

    def _pump(self, spec: ProcessSpec, proc: subprocess.Popen) -> None:
        with open(self.log_path(spec.label), "a", buffering=1) as log:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                log.write(line + "\n")
                if self.echo and spec.output in ("screen", "both"):
                    with self._lock:
                        print(f"[{spec.label}] {line}", file=self.stream, flush=True)
        proc.stdout.close()

    # -- lifecycle --------------------------------------------------------------------------
    def _spawn(self, spec: ProcessSpec) -> None:
        proc = subprocess.Popen(spec.cmd, env=spec.env, cwd=spec.cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[spec.label] = proc
        self.say(f"process started with pid [{proc.pid}]: {spec.label}")
        t = threading.Thread(target=self._pump, args=(spec, proc), daemon=True, name=f"out-{spec.label}")
        t.start()
        self._threads.append(t)

    def start(self) -> LaunchRunner:
        """Start every process (in file order) and a monitor thread; returns self."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for m in self.plan.messages:
            self.say(m)
        for s in self.plan.skipped:
            self.say(s)
        self.say(f"{self.file.name}: " + ", ".join(f"{k}:={v}" for k, v in self.plan.arguments.items()))
        self.say(f"logs in {self.log_dir}")
        try:
            for spec in self.plan.processes:
                self._spawn(spec)
        except OSError as e:
            self.stop()
            raise ConfigError(f"cannot start {spec.label} ({shlex.join(spec.cmd)}): {e}") from None
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="launch-monitor")
        self._monitor.start()
        if not self.plan.processes:
            self._done.set()
            self.returncode = 0
        return self

    def _watch(self) -> None:
        specs = {s.label: s for s in self.plan.processes}
        respawn_at: dict[str, float] = {}
        respawns: dict[str, int] = {}
        while not self._stopping.is_set():
            for label, proc in list(self.processes.items()):
                if label in self.exit_codes or proc.poll() is None:
                    continue
                rc = proc.returncode
                spec = specs[label]
                left = spec.respawn_max_retries < 0 or respawns.get(label, 0) < spec.respawn_max_retries
                if spec.respawn and left and not self._stopping.is_set():
                    t = respawn_at.setdefault(label, time.monotonic() + spec.respawn_delay)
                    if time.monotonic() >= t:
                        respawn_at.pop(label)
                        respawns[label] = respawns.get(label, 0) + 1
                        self.say(f"process has died [pid {proc.pid}, exit code {rc}]: {label}; respawning")
                        self._spawn(spec)
                    continue
                self.exit_codes[label] = rc
                if rc == 0:
                    self.say(f"process has finished cleanly [pid {proc.pid}]: {label}")
                else:
                    self.say(f"process has died [pid {proc.pid}, exit code {rc}]: {label}")
                    tail = self.log_text(label).strip().splitlines()[-8:]
                    if tail and spec.output == "log":
                        with self._lock:
                            for line in tail:
                                print(f"[{label}] {line}", file=self.stream, flush=True)
                if spec.required:
                    self._reason = f"required process '{label}' exited (code {rc})"
                    self.say(self._reason + "; shutting down")
                    threading.Thread(target=self.stop, kwargs={"returncode": rc},
                                     daemon=True).start()
                    return
            if self.processes and len(self.exit_codes) == len(self.processes) and not respawn_at:
                self.returncode = max(self.exit_codes.values(), key=abs, default=0)
                self._done.set()
                return
            time.sleep(0.05)

    def running(self) -> bool:
        """True while at least one process runs and no shutdown was requested."""
        return not self._done.is_set() and not self._stopping.is_set()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until everything has exited (or ``timeout``); returns the exit status or None."""
        if not self._done.wait(timeout):
            return None
        return self.returncode

    def stop(self, timeout: float | None = None, returncode: int = 0) -> int:
        """SIGINT every process group, then SIGTERM and SIGKILL after the per-process timeouts."""
        if self._stopping.is_set():
            self._done.wait(timeout)
            return self.returncode if self.returncode is not None else returncode
        self._stopping.set()
        specs = {s.label: s for s in self.plan.processes}
        alive = {k: p for k, p in self.processes.items() if p.poll() is None}
        for sig, attr in ((signal.SIGINT, "sigterm_timeout"), (signal.SIGTERM, "sigkill_timeout"),
                          (signal.SIGKILL, None)):
            for label, p in alive.items():
                if sig != signal.SIGINT:
                    self.say(f"sending {sig.name} to {label} [pid {p.pid}]")
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if attr is None:
                break
            wait = max((getattr(specs[k], attr) for k in alive), default=0.0)
            if timeout is not None:
                wait = min(wait, timeout)
            end = time.monotonic() + wait
            while alive and time.monotonic() < end:
                alive = {k: p for k, p in alive.items() if p.poll() is None}
                time.sleep(0.02)
            alive = {k: p for k, p in alive.items() if p.poll() is None}
            if not alive:
                break
        for label, p in self.processes.items():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.exit_codes.setdefault(label, p.returncode)
        for t in self._threads:
            t.join(2)
        if self.returncode is None:
            self.returncode = returncode
        self._done.set()
        return self.returncode

    def __enter__(self) -> LaunchRunner:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _show_args(p: Plan, file: Path) -> str:
    lines = [f"Arguments of {file.name} (pass as name:=value):"]
    for name, d in p.declared.items():
        default = "(required)" if d["default"] is None else f"default: '{d['default']}'"
        lines.append(f"  {name}: {d['description']}")
        lines.append(f"      {default}" + (f"; one of: {', '.join(d['choices'])}" if d["choices"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``magma-ros launch FILE [name:=value ...]``: run until Ctrl-C / SIGTERM or a required exit."""
    ap = argparse.ArgumentParser(prog="magma-ros launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="launch file: a path or a name under magma_ros/launch (sim.launch.yaml)")
    ap.add_argument("args", nargs="*", metavar="name:=value", help="launch arguments")
    ap.add_argument("-s", "--show-args", action="store_true", help="list the file's arguments and exit")
    ap.add_argument("-p", "--print", action="store_true", dest="print_only",
                    help="print the commands that would run and exit")
    ap.add_argument("--log-dir", help="where each process's output is written")
    ap.add_argument("--required", default="", help="comma-separated process names whose exit stops all")
    ns = ap.parse_args(argv)
    try:
        args = parse_cli_args(ns.args)
        file = resolve_launch_file(ns.file)
        if ns.show_args:
            print(_show_args(plan(file, {k: v for k, v in args.items()}), file))
            return 0
        if ns.print_only:
            p = plan(file, args)
            for s in p.skipped:
                print(f"# {s}")
            for s in p.processes:
                print(f"# {s.label}\n{shlex.join(s.cmd)}")
            return 0
        runner = LaunchRunner(file, args, log_dir=ns.log_dir,
                              required=tuple(filter(None, ns.required.split(","))))
    except ConfigError as e:
        print(f"[magma_ros] error: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        runner.say(f"{signal.Signals(signum).name} received, stopping all processes")
        threading.Thread(target=runner.stop, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        runner.start()
    except ConfigError as e:
        print(f"[magma_ros] error: {e}", file=sys.stderr)
        return 2
    while runner.wait(0.2) is None:
        pass
    return int(runner.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
