"""Shared rclpy scaffolding for the thin node shells.

- :func:`declare_config` declares one ROS parameter per field of a component's config dataclass
  and parses the values back into that dataclass (the one place parameters are parsed).
- :func:`run_node` is the standard skeleton: ``rclpy.init`` context, an executor (single-threaded unless asked),
  clean exit on Ctrl-C / external shutdown, and one-line errors for user mistakes.
- :func:`diagnostic_array` builds the one-status ``diagnostics`` message every node publishes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Mapping

from magma_ros.core.errors import ConfigError

try:
    from rcl_interfaces.msg import ParameterDescriptor
except ImportError:  # pragma: no cover - rclpy always ships it
    ParameterDescriptor = None


def declare_config(node, cls, prefix: str = "", **defaults):
    """Declare a ROS parameter per dataclass field of ``cls`` and return a filled instance.

    Field types supported: bool, int, float, str, and tuples/lists of float or str.
    ``defaults`` override the dataclass defaults (e.g. per-robot values).
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            raise ConfigError(f"parameter '{prefix}{f.name}' is required")
        if isinstance(default, tuple):
            default = list(default)
        # dynamic typing: `-p rate:=5` (an int) must not crash a float parameter; coerce below.
        value = node.declare_parameter(prefix + f.name, default, ParameterDescriptor(dynamic_typing=True)).value
        values[f.name] = _coerce(prefix + f.name, value, hints.get(f.name))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_seconds(t) -> float:
    """builtin_interfaces Time or Duration -> seconds."""
    return t.sec + t.nanosec * 1e-9


def _sec_nanosec(seconds: float) -> tuple[int, int]:
    ns = int(round(seconds * 1e9))
    return ns // 1_000_000_000, ns % 1_000_000_000  # nanosec always in [0, 1e9)


def to_time_msg(seconds: float):
    """Seconds -> builtin_interfaces/Time."""
    from builtin_interfaces.msg import Time

    sec, nanosec = _sec_nanosec(seconds)
    return Time(sec=sec, nanosec=nanosec)


def to_duration_msg(seconds: float):
    """Seconds -> builtin_interfaces/Duration."""
    from builtin_interfaces.msg import Duration

    sec, nanosec = _sec_nanosec(seconds)
    return Duration(sec=sec, nanosec=nanosec)


def diagnostic_array(stamp, name: str, level, message: str, values: Mapping[str, object] | None = None,
                     hardware_id: str = ""):
    """A diagnostic_msgs/DiagnosticArray holding one DiagnosticStatus.

    ``stamp``: the header stamp, a builtin_interfaces/Time or seconds (float). ``level``: 0 OK,
    1 WARN, 2 ERROR, 3 STALE, as an int or as the message's own one-byte constant
    (``DiagnosticStatus.WARN``). ``values``: key -> value, in order, every value as ``str(value)``.
    """
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    if isinstance(level, (bytes, bytearray)):
        level = level[0] if len(level) == 1 else -1
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 3:
        raise ValueError(f"diagnostic level must be 0..3 (OK, WARN, ERROR, STALE), got {level!r}")
    arr = DiagnosticArray()
    arr.header.stamp = to_time_msg(stamp) if isinstance(stamp, (int, float)) else stamp
    arr.status = [DiagnosticStatus(level=bytes([level]), name=name, message=message, hardware_id=hardware_id,
                                   values=[KeyValue(key=str(k), value=str(v)) for k, v in (values or {}).items()])]
    return arr


def _coerce(name: str, value, t):
    """Convert a parameter value to the dataclass field type ``t``; one-line ConfigError if impossible."""
    origin = typing.get_origin(t)
    try:
        if value is None:
            return None
        if t is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if t is str:
            return str(value)
        if origin in (tuple, list):
            args = [a for a in typing.get_args(t) if a is not Ellipsis]
            item = args[0] if args else None
            seq = list(value)
            if item is float:
                seq = [float(v) for v in seq]
            elif item is str:
                seq = [str(v) for v in seq]
            return tuple(seq) if origin is tuple else seq
    except (TypeError, ValueError):
        raise ConfigError(f"parameter '{name}' = {value!r} is not a valid {getattr(t, '__name__', t)}") from None
    return value


# DDS settings this package's processes use unless the environment says otherwise (docs/nodes.md):
# - synchronous publication: Fast DDS's asynchronous mode (rmw_fastrtps' default) hands every message
#   to a sender thread (a small message's round trip 3.1 vs 1.2 ms here); a keep-last writer never
#   blocks on a slow reader either way;
# - config/fastdds.xml: shared memory with a segment an image fits in (a 640x480 image's round trip
#   14-15 ms with the default 512 KiB segment, 4.4-4.7 ms with it).
DDS_DEFAULTS = {"RMW_FASTRTPS_PUBLICATION_MODE": "SYNCHRONOUS"}


def dds_defaults(env: dict | None = None) -> dict:
    """Set :data:`DDS_DEFAULTS` and the Fast DDS profiles file in ``env`` (default: ``os.environ``,
    before ``rclpy.init``) where unset."""
    env = os.environ if env is None else env
    for k, v in DDS_DEFAULTS.items():
        env.setdefault(k, v)
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in env and "FASTRTPS_DEFAULT_PROFILES_FILE" not in env:
        from magma_ros.core.paths import data_path

        profile = data_path("config", "fastdds.xml")
        if profile.is_file():
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    return env


def make_executor(threads: int = 1):
    """The executor ``run_node`` spins: one thread -> the ``SingleThreadedExecutor``, or with
    ``MAGMA_EXECUTOR=events`` rclpy's experimental ``EventsExecutor`` (its wait loop and timers are
    C++: the demo graph needs a third less CPU) -- not the default: it is experimental in rclpy, and
    a failure of the teleop takeover system test seen while it was tried (the teleop node never
    engaging; later also without it) is not explained yet (docs/nodes.md). More threads ->
    ``MultiThreadedExecutor``."""
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

    if threads > 1:
        return MultiThreadedExecutor(num_threads=threads)
    if os.environ.get("MAGMA_EXECUTOR", "single") == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            pass
        else:
            return EventsExecutor()
    return SingleThreadedExecutor()


def run_node(make_node: Callable[[], object], args=None, threads: int = 1) -> int:
    """Run a node built by ``make_node`` until shutdown. Returns the process exit status.

    ``threads`` 1: one executor thread (``make_executor``) -- for a node whose callbacks share one
    mutually exclusive group (rclpy's default group), where more executor threads add no concurrency
    but cost a lot: rclpy's ``MultiThreadedExecutor`` keeps waking while a callback of a busy exclusive
    group is in flight (measured: most of the simulator's CPU, docs/performance.md). > 1: a
    ``MultiThreadedExecutor`` for nodes with callbacks that must run concurrently.

    rclpy's own signal handlers are disabled: SIGINT/SIGTERM raise KeyboardInterrupt in the main
    thread, so the node's ``close()`` stops its worker threads while the context is still valid
    (a worker publishing into a shut-down context would raise), then the context shuts down.
    """
    import signal

    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.signals import SignalHandlerOptions

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    dds_defaults()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    executor = None
    try:
        node = make_node()
        executor = make_executor(threads)
        executor.add_node(node)
        while rclpy.ok():  # short waits: the SIGINT/SIGTERM handler runs between them
            executor.spin_once(timeout_sec=0.1)
    except ConfigError as e:
        print(f"[magma_ros] error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if executor is not None:
            _drain(executor)
        if node is not None:
            close = getattr(node, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as e:  # noqa: BLE001 - report, then still shut down cleanly
                    print(f"[magma_ros] error while closing: {e}", file=sys.stderr)
        if executor is not None:
            _join_workers(executor)
            executor.shutdown(timeout_sec=1.0)
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
    return 0


def _drain(executor, timeout: float = 2.0) -> None:
    """Give the callbacks still in flight up to ``timeout`` s to finish (before the node closes).

    rclpy's ``MultiThreadedExecutor.shutdown`` destroys its guard condition before it joins its
    worker threads, so a callback that finishes after that fails on the destroyed guard ("cannot use
    Destroyable because destruction was requested") and the error is printed at exit as "The
    following exception was never retrieved". See :func:`_join_workers` for the second half.
    """
    import time

    tasks = list(getattr(executor, "_futures", ()))  # submitted callbacks (MultiThreadedExecutor)
    deadline = time.monotonic() + timeout
    while any(not t.done() for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.005)


def _join_workers(executor) -> None:
    """Join the executor's worker threads while its guard condition still exists (after the node's
    ``close()``), then report the error of any callback that really failed, once, as a line."""
    pool = getattr(executor, "_executor", None)  # the worker thread pool (MultiThreadedExecutor)
    if pool is not None:
        pool.shutdown(wait=True)
    tasks = list(getattr(executor, "_futures", ())) + [t[0] for t in getattr(executor, "_tasks", ())]
    for task in tasks:
        try:
            err = task.exception() if task.done() else None
        except Exception:  # noqa: BLE001 - a cancelled task, or an rclpy without these internals
            err = None
        if err is not None:
            print(f"[magma_ros] error in a callback at shutdown: {type(err).__name__}: {err}", file=sys.stderr)
