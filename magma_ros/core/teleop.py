"""Teleop logic (ROS-free): device input -> base-frame end-effector twists, with a real deadman.

Contract (docs/teleop.md):

- Input is a :class:`Sample`: the deadman (``enable``), turbo, six normalized axes (linear x, y, z,
  angular roll, pitch, yaw; after the deadzone) and the buttons held. :class:`JoyLayout` makes one
  from a sensor_msgs/Joy (axes, buttons) with teleop_twist_joy's parameter names;
  :class:`KeyboardInput` makes one from terminal key presses.
- **Deadman.** No enable, no motion; turbo only scales a motion that enable allows (turbo alone moves
  nothing; teleop_twist_joy lets turbo alone move). While enabled, one twist per output period
  (:meth:`TeleopCore.tick`), zero when the sticks are centred. The release is acted on in the input
  callback itself: a zero twist at once (and once more at the next tick), then silence, so the arm
  stops within one output period and is held; never by a command timeout.
- **Stale input** (no sample for ``input_timeout``: joy_node stopped) stops the same way.
- **Re-arm.** After start-up, an e-stop and (``rearm_after_stale``) stale input, the deadman must be
  seen released before it engages again: a deadman held through those never starts motion by itself.
- Buttons act on their press (edge): gripper open / close / toggle (only with the deadman held; a
  keyboard key press counts as deliberate and sends a zero twist first),
  hand back to the policy (only with the deadman released), start / stop / discard an episode, e-stop.
- Twist units: base-frame m/s and rad/s (rotation-vector rate), applied by the teleop servo for one
  output period, exactly the ``magma/ee_twist`` convention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.paths import data_path

DEVICES = ("xbox", "ps5", "ps4", "spacemouse", "keyboard")  # config/teleop/<device>.yaml
LINEAR = ("x", "y", "z")  # base-frame axes of the linear velocity
ANGULAR = ("roll", "pitch", "yaw")  # rotation about base x, y, z (teleop_twist_joy's names)
ACTIONS = ("gripper_open", "gripper_close", "gripper_toggle", "resume_policy", "start_episode", "stop_episode",
           "discard_episode", "estop")
GRIPPER_ACTIONS = ("gripper_open", "gripper_close", "gripper_toggle")
ZERO6 = np.zeros(6)


# --------------------------------------------------------------------------- device files
def device_file(device: str) -> Path:
    """``config/teleop/<device>.yaml`` for a known device name, or ``device`` itself as a YAML path."""
    if device.endswith((".yaml", ".yml")) or "/" in device:
        p = Path(device).expanduser()
        if not p.is_file():
            raise ConfigError(f"teleop device file not found: {p}")
        return p
    return data_path("config", "teleop", f"{choose(device, DEVICES, 'teleop device')}.yaml")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mapping -> ROS parameter names: ``{'axis_linear': {'x': 1}}`` -> ``{'axis_linear.x': 1}``."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def load_device_params(device: str) -> dict[str, object]:
    """The device YAML (``/**: ros__parameters:`` or a bare mapping) as flat ROS parameter names."""
    path = device_file(device)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(tree, Mapping) and len(tree) == 1:
        (top, body), = tree.items()
        if isinstance(body, Mapping) and "ros__parameters" in body:
            tree = body["ros__parameters"]
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: expected a mapping of parameters")
    return flatten(tree)


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Scales:
    """Full-deflection velocities per axis, normal and turbo (teleop_twist_joy's scale_* parameters)."""

    linear: np.ndarray  # (3,) [m/s] x, y, z at axis value 1 (negative flips the axis)
    linear_turbo: np.ndarray  # (3,) [m/s] with the turbo button (and the deadman) held
    angular: np.ndarray  # (3,) [rad/s] roll, pitch, yaw
    angular_turbo: np.ndarray  # (3,) [rad/s]

    def twist(self, axes: np.ndarray, turbo: bool) -> tuple[np.ndarray, np.ndarray]:
        """Normalized axes (6,) -> (linear m/s (3,), angular rad/s (3,))."""
        lin = self.linear_turbo if turbo else self.linear
        ang = self.angular_turbo if turbo else self.angular
        return axes[:3] * lin, axes[3:] * ang


def _num(p: Mapping, key: str, default, kind=float):
    v = p.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and float(v) != int(v)):
        raise ConfigError(f"teleop parameter '{key}' = {v!r} must be {'an integer' if kind is int else 'a number'}")
    v = kind(v)
    if kind is float and not math.isfinite(v):
        raise ConfigError(f"teleop parameter '{key}' = {v!r} must be finite")
    return v


def _scales(p: Mapping) -> Scales:
    def vec(prefix, names, fallback=None):
        return np.array([_num(p, f"{prefix}.{n}", p.get(f"{fallback}.{n}", 0.0) if fallback else 0.0)
                         for n in names])

    return Scales(vec("scale_linear", LINEAR), vec("scale_linear_turbo", LINEAR, "scale_linear"),
                  vec("scale_angular", ANGULAR), vec("scale_angular_turbo", ANGULAR, "scale_angular"))


def apply_deadzone(a: np.ndarray, deadzone: float) -> np.ndarray:
    """Zero inside ``|a| < deadzone``, rescaled outside so the output is continuous and reaches ±1."""
    a = np.clip(np.asarray(a, dtype=float), -1.0, 1.0)
    if deadzone <= 0.0:
        return a
    mag = np.maximum(np.abs(a) - deadzone, 0.0) / (1.0 - deadzone)
    return np.sign(a) * mag


@dataclass(frozen=True)
class Sample:
    """One reading of the input device, in device-independent terms."""

    enable: bool  # the deadman is held
    turbo: bool  # the turbo button is held (counts only with enable)
    axes: np.ndarray  # (6,) normalized [-1, 1], deadzone applied: linear x y z, roll pitch yaw
    pressed: frozenset = frozenset()  # actions whose button is held now (edges are found by the core)
    events: tuple = ()  # actions that happened (already edges: keyboard key presses)
    problem: str = ""  # why this sample cannot enable motion (malformed message, wrong layout)


@dataclass(frozen=True)
class JoyLayout:
    """A sensor_msgs/Joy device: which axis and button does what (teleop_twist_joy names)."""

    device: str  # name for logs (xbox, ps5, ...)
    enable_button: int  # deadman: hold to move (required, >= 0)
    enable_turbo_button: int  # held together with enable: the turbo scales; -1 = none
    axis_linear: tuple[int, int, int]  # Joy axis index for x, y, z; -1 = unused
    axis_angular: tuple[int, int, int]  # Joy axis index for roll, pitch, yaw; -1 = unused
    scales: Scales
    deadzone: float  # [0, 1) of full deflection, applied per axis
    buttons: Mapping[str, int]  # action -> button index (ACTIONS; -1 / absent = none)
    joy_topic: str = "joy"  # sensor_msgs/Joy input (spacenav_node: spacenav/joy)
    twist_topic: str = ""  # optional geometry_msgs/Twist motion input (spacenav/twist); deadman stays on Joy
    rearm_after_stale: bool = True  # stale input needs a deadman release before motion again
    axis_twist: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # twist_topic: [lin x,y,z, ang x,y,z] -> axes order

    def sample(self, axes: Iterable[float], buttons: Iterable[int]) -> Sample:
        """Joy axes/buttons -> Sample. An index past the message's arrays reads 0 (teleop_twist_joy's rule);
        a missing deadman button or NaN axes make a sample that cannot enable (with the reason)."""
        try:
            ax = np.asarray(list(axes), dtype=float).reshape(-1)
            bt = [int(b) for b in buttons]
        except (TypeError, ValueError):
            return Sample(False, False, ZERO6, problem="malformed Joy message (axes/buttons not numbers)")
        problem = ""
        if self.enable_button >= len(bt):
            problem = (f"deadman button {self.enable_button} not in the Joy message ({len(bt)} buttons): "
                       f"wrong device layout for '{self.device}'?")
        idx = self.axis_linear + self.axis_angular
        raw = np.array([ax[i] if 0 <= i < ax.size else 0.0 for i in idx])
        if not np.all(np.isfinite(raw)):
            problem = problem or "NaN/inf in the Joy axes"
            raw = np.zeros(6)

        def held(i: int) -> bool:
            return 0 <= i < len(bt) and bt[i] != 0

        pressed = frozenset(a for a, i in self.buttons.items() if held(i))
        return Sample(held(self.enable_button) and not problem, held(self.enable_turbo_button),
                      apply_deadzone(raw, self.deadzone), pressed, problem=problem)

    def twist_axes(self, linear, angular) -> np.ndarray:
        """geometry_msgs/Twist motion (twist_topic) -> raw axes (6,) in this layout's axis order."""
        src = np.concatenate([np.asarray(linear, dtype=float), np.asarray(angular, dtype=float)])
        out = np.zeros(6)
        for k, i in enumerate(self.axis_linear + self.axis_angular):
            if 0 <= i < 6:
                out[k] = src[self.axis_twist[i]] if 0 <= self.axis_twist[i] < 6 else 0.0
        if not np.all(np.isfinite(out)):
            return np.zeros(6)
        return apply_deadzone(out, self.deadzone)


@dataclass(frozen=True)
class KeyboardLayout:
    """Keys -> axes and actions for a terminal (no key-release events: see KeyboardInput)."""

    keys_linear: Mapping[str, tuple[str, str]]  # x/y/z -> (key for +, key for -)
    keys_angular: Mapping[str, tuple[str, str]]  # roll/pitch/yaw -> (key for +, key for -)
    scales: Scales
    key_timeout: float  # [s] a motion key counts as held this long after its last press / autorepeat
    stop_key: str  # stops at once (a release the terminal can report)
    keys: Mapping[str, str]  # action -> key
    turbo_shift: bool = True  # the upper-case motion key (Shift held) = turbo

    def key_axes(self) -> dict[str, tuple[int, float]]:
        """Motion key -> (axis index 0..5, sign)."""
        out = {}
        for i, name in enumerate(LINEAR + ANGULAR):
            keys = (self.keys_linear if i < 3 else self.keys_angular).get(name)
            if keys:
                out[keys[0]], out[keys[1]] = (i, 1.0), (i, -1.0)
        return out


def parse_layout(params: Mapping[str, object], device: str = "") -> JoyLayout | KeyboardLayout:
    """Flat device parameters (load_device_params, ROS overrides applied) -> a validated layout."""
    kind = str(params.get("input", "joy"))
    choose(kind, ("joy", "keyboard"), "teleop input")
    scales = _scales(params)
    if kind == "keyboard":
        return _parse_keyboard(params, scales)
    enable = _num(params, "enable_button", -1, int)
    if enable < 0 or params.get("require_enable_button", True) is False:
        raise ConfigError("teleop needs a deadman: set enable_button to a button index "
                          "(require_enable_button: false is not supported)")
    turbo = _num(params, "enable_turbo_button", -1, int)
    if turbo == enable:
        raise ConfigError(f"enable_turbo_button ({turbo}) must differ from enable_button")
    dz = _num(params, "deadzone", 0.1)
    if not 0.0 <= dz < 1.0:
        raise ConfigError(f"teleop deadzone must be in [0, 1), got {dz}")
    buttons = {a: _num(params, f"{a}_button", -1, int) for a in ACTIONS}
    buttons = {a: i for a, i in buttons.items() if i >= 0}
    for a, i in buttons.items():
        if i in (enable, turbo):
            raise ConfigError(f"{a}_button ({i}) is also the deadman or turbo button")
    return JoyLayout(device=device or str(params.get("device", "joy")), enable_button=enable,
                     enable_turbo_button=turbo,
                     axis_linear=tuple(_num(params, f"axis_linear.{n}", -1, int) for n in LINEAR),
                     axis_angular=tuple(_num(params, f"axis_angular.{n}", -1, int) for n in ANGULAR),
                     scales=scales, deadzone=dz, buttons=buttons,
                     joy_topic=str(params.get("joy_topic", "joy")), twist_topic=str(params.get("twist_topic", "")),
                     rearm_after_stale=bool(params.get("rearm_after_stale", True)))


def _parse_keyboard(params: Mapping[str, object], scales: Scales) -> KeyboardLayout:
    def pair(name):
        v = params.get(name)
        if v is None or v == "":
            return None
        keys = list(v) if not isinstance(v, str) else v.split()
        if len(keys) != 2 or not all(isinstance(k, str) and len(k) == 1 for k in keys):
            raise ConfigError(f"teleop parameter '{name}' = {v!r} must be two single keys (plus, minus)")
        return keys[0], keys[1]

    lin = {n: pair(f"key_linear.{n}") for n in LINEAR}
    ang = {n: pair(f"key_angular.{n}") for n in ANGULAR}
    keys = {a: str(params[f"{a}_key"]) for a in ACTIONS if params.get(f"{a}_key") not in (None, "")}
    stop = str(params.get("stop_key", " "))
    timeout = _num(params, "key_timeout", 0.15)
    if timeout <= 0:
        raise ConfigError(f"key_timeout must be > 0 s, got {timeout}")
    layout = KeyboardLayout({k: v for k, v in lin.items() if v}, {k: v for k, v in ang.items() if v}, scales,
                            timeout, stop, keys, bool(params.get("turbo_shift", True)))
    used = list(layout.key_axes()) + list(keys.values()) + [stop]
    if layout.turbo_shift:
        used += [k.upper() for k in layout.key_axes() if k.upper() != k]
    dup = sorted({k for k in used if used.count(k) > 1})
    if dup or any(len(k) != 1 for k in used):
        raise ConfigError(f"keyboard layout: keys used twice or not single characters: {dup or used}")
    return layout


# --------------------------------------------------------------------------- keyboard
class KeyboardInput:
    """Terminal key presses -> Samples.

    A terminal reports presses and autorepeats, never releases. A motion key therefore counts as held
    (the keyboard's deadman) until ``key_timeout`` after its last press or repeat (autorepeat comes
    every 30-40 ms while a key is held); ``stop_key`` releases everything at once. The upper-case key
    (Shift) is turbo. Action keys are events.
    """

    def __init__(self, layout: KeyboardLayout):
        self.layout = layout
        self._axes = layout.key_axes()
        self._actions = {k: a for a, k in layout.keys.items()}
        self._until = np.full(6, -math.inf)  # [s] axis held until
        self._sign = np.zeros(6)
        self._turbo = False
        self._events: list[str] = []
        self.last_key = ""

    def on_key(self, key: str, t: float) -> None:
        """One key press (a character) at time ``t``."""
        self.last_key = key
        if key == self.layout.stop_key:
            self._until[:] = -math.inf
            return
        lower = key.lower() if self.layout.turbo_shift else key
        if lower in self._axes and (key == lower or key.isupper()):
            i, s = self._axes[lower]
            if self._sign[i] != s:  # reversing an axis drops the other direction at once
                self._until[i] = -math.inf
            self._sign[i], self._until[i] = s, t + self.layout.key_timeout
            self._turbo = key != lower
            return
        if key in self._actions:
            self._events.append(self._actions[key])

    def sample(self, t: float) -> Sample:
        """The state at ``t``; returns (and clears) the action events since the last sample."""
        held = self._until > t
        axes = np.where(held, self._sign, 0.0)
        ev, self._events = tuple(self._events), []
        return Sample(bool(held.any()), self._turbo and bool(held.any()), axes, events=ev)


class KeyDecoder:
    """Terminal bytes -> key characters; escape sequences (arrows, function keys) are dropped whole, so
    the ``A`` of ``ESC [ A`` (arrow up) never reads as a key."""

    def __init__(self):
        self._esc = ""  # the escape sequence read so far

    def feed(self, text: str) -> list[str]:
        """Decode ``text`` (may end inside an escape sequence; the rest comes with the next call)."""
        keys = []
        for ch in text:
            if self._esc:
                self._esc += ch
                # ESC x (Alt+x) ends at once; CSI / SS3 (ESC [ ..., ESC O x) end at a final byte @..~
                if len(self._esc) == 2 and ch not in "[O":
                    self._esc = ""
                elif len(self._esc) > 2 and ("@" <= ch <= "~" or len(self._esc) > 16):
                    self._esc = ""
                elif len(self._esc) == 3 and self._esc[1] == "O":
                    self._esc = ""
                continue
            if ch == "\x1b":
                self._esc = ch
            elif ch.isprintable():
                keys.append(ch)
        return keys


# --------------------------------------------------------------------------- the core
@dataclass(frozen=True)
class TeleopConfig:
    """Teleop node parameters (ROS parameters of the teleop node, same names); the device layout
    parameters (enable_button, axis_linear.x, ...) come from the device YAML on top of these."""

    device: str = "xbox"  # xbox | ps5 | ps4 | spacemouse | keyboard (config/teleop/<device>.yaml) or a YAML path
    robot: str = "fr3"  # fr3 | panda | wx250s: the twist's frame_id is its base link; finger for the gripper
    period: float = 0.1  # [s] output period: one twist per period while the deadman is held; the teleop
    #                      servo applies each twist for exactly this long (its step_period MUST be equal)
    input_timeout: float = 0.5  # [s] no Joy for this long (arrival time) = released; joy_node autorepeats
    #                             at 20 Hz, so a live joystick is never this quiet
    resume_retry: float = 3.0  # [s] hand-back: retry safety/resume_policy this long while the safety node
    #                            still sees teleop as fresh (its command_timeout after the last teleop command)
    status_period: float = 1.0  # [s] diagnostics (and, keyboard mode, at least one status line) this often

    def validate(self) -> TeleopConfig:
        """Raise ConfigError on values that make no sense; return self."""
        if not (self.period > 0 and math.isfinite(self.period)):
            raise ConfigError(f"teleop period must be > 0 s, got {self.period}")
        if not self.input_timeout > 0:
            raise ConfigError(f"teleop input_timeout must be > 0 s, got {self.input_timeout}")
        if self.resume_retry < 0 or not self.status_period > 0:
            raise ConfigError("teleop resume_retry must be >= 0 s and status_period > 0 s")
        return self


@dataclass(frozen=True)
class Twist:
    """A base-frame end-effector velocity to publish now."""

    linear: np.ndarray  # (3,) [m/s]
    angular: np.ndarray  # (3,) [rad/s] rotation-vector rate
    reason: str  # engaged | moving | deadman released | input stale | e-stop | invalid input

    @property
    def is_zero(self) -> bool:
        return not (np.any(self.linear) or np.any(self.angular))


@dataclass
class Step:
    """What one input or tick asks the node to do now."""

    twist: Twist | None = None  # publish on teleop/ee_twist
    gripper: float | None = None  # publish on teleop/gripper (0 closed ... 1 open)
    actions: list[str] = field(default_factory=list)  # resume_policy, start_episode, ..., estop
    notes: list[str] = field(default_factory=list)  # one-line explanations (refused buttons, ...)
    engaged_now: bool = False  # the deadman was just engaged (a new teleop session starts)


class TeleopCore:
    """The deadman state machine. All times in seconds on one clock (the node clock)."""

    def __init__(self, scales: Scales, params: TeleopConfig | None = None, rearm_after_stale: bool = True):
        self.scales = scales
        self.p = (params or TeleopConfig()).validate()
        self.rearm_after_stale = rearm_after_stale
        self.engaged = False  # the deadman is held and counts (armed, fresh, valid)
        self.armed = False  # the deadman has been seen released since start-up / e-stop / stale input
        self.turbo = False
        self.axes = ZERO6.copy()
        self.last_input_t = -math.inf
        self.gripper: float | None = None  # last gripper command sent (0 closed ... 1 open)
        self.problem = ""  # why the last sample could not enable
        self.reason = "waiting for input"  # why the arm is (not) driven now, for status lines
        self._prev_pressed: frozenset = frozenset()
        self._zeros_due = 0  # zero twists still to send at the next ticks after a stop
        self.published = 0  # twists published (counter for diagnostics)

    # ---------------------------------------------------------------- inputs
    def on_input(self, s: Sample, t: float) -> Step:
        """A new device sample at ``t``: may engage (twist now), release (zero now) or fire actions."""
        self.last_input_t = float(t)
        step = Step()
        self.problem = s.problem
        if not s.enable and not s.problem:  # really seen released (not a malformed message)
            self.armed = True
        self.turbo = bool(s.turbo and s.enable)
        self.axes = np.asarray(s.axes, dtype=float).copy() if s.enable else ZERO6.copy()
        want = bool(s.enable and self.armed)
        if self.engaged and not want:
            self._stop(step, "invalid input" if s.problem else "deadman released")
        elif want and not self.engaged:
            self.engaged = True
            self.reason = "engaged"
            step.engaged_now = True
            step.twist = self._twist("engaged")
        elif s.enable and not self.armed:
            self.reason = "release the deadman once first"
        elif not s.enable and not self.engaged:
            self.reason = s.problem or "deadman released"
        pressed = frozenset(s.pressed)
        edges = [a for a in ACTIONS if a in pressed and a not in self._prev_pressed]
        self._prev_pressed = pressed
        for a in edges:
            self._action(a, step)
        for a in s.events:  # a key press is a deliberate act of its own (keyboard)
            self._action(a, step, key=True)
        return step

    def on_safety_state(self, state: str) -> Step:
        """The safety node's state: an e-stop (from anywhere) stops teleop and needs a deadman re-press."""
        step = Step()
        if state in ("stopping", "estopped"):
            if self.engaged:
                self._stop(step, "e-stop")
            self.armed = False
        return step

    def tick(self, t: float) -> Step:
        """Called every output period: the twist to publish (or none), stale input detection."""
        step = Step()
        if self.engaged and t - self.last_input_t > self.p.input_timeout:
            self._stop(step, "input stale")
            if self.rearm_after_stale:
                self.armed = False
            return step
        if self.engaged:
            step.twist = self._twist("moving")
        elif self._zeros_due > 0:
            self._zeros_due -= 1
            step.twist = self._twist(self.reason, zero=True)
        if not self.engaged and t - self.last_input_t > self.p.input_timeout:
            self.reason = "no input" if not math.isfinite(self.last_input_t) else "input stale"
        return step

    # ---------------------------------------------------------------- internals
    def _stop(self, step: Step, reason: str) -> None:
        self.engaged = False
        self.axes = ZERO6.copy()
        self.turbo = False
        self.reason = reason
        step.twist = self._twist(reason, zero=True)
        self._zeros_due = 1  # once more at the next tick, in case the first one met a busy servo

    def _twist(self, reason: str, zero: bool = False) -> Twist:
        self.published += 1
        if zero:
            return Twist(np.zeros(3), np.zeros(3), reason)
        lin, ang = self.scales.twist(self.axes, self.turbo)
        return Twist(lin, ang, reason)

    def _action(self, a: str, step: Step, key: bool = False) -> None:
        if a in GRIPPER_ACTIONS:
            if not self.engaged and not key:
                step.notes.append(f"{a.replace('_', ' ')} ignored: hold the deadman to move the gripper")
                return
            if not self.engaged and step.twist is None:
                # a gripper key with no motion key held: a zero twist first, so the servo has a step at the
                # measured pose to carry the new finger value (with no step running it re-sends its last target)
                step.twist = self._twist("gripper", zero=True)
            if a == "gripper_toggle":
                g = 0.0 if self.gripper is None or self.gripper > 0.5 else 1.0
            else:
                g = 1.0 if a == "gripper_open" else 0.0
            self.gripper = g
            step.gripper = g
            return
        if a == "resume_policy" and self.engaged:
            step.notes.append("hand-back ignored: release the deadman first")
            return
        if a == "estop":
            if self.engaged:
                self._stop(step, "e-stop")
            self.armed = False
        step.actions.append(a)


def status_line(device: str, core: TeleopCore, safety_state: str = "", safety_source: str = "",
                recorder: str = "", last: str = "") -> str:
    """The one-line live status (keyboard mode), e.g.
    ``teleop[keyboard] MOVING lin +0.050 +0.000 +0.000 m/s | safety ok/teleop | rec recording 2 | ...``."""
    if core.engaged:
        lin, ang = core.scales.twist(core.axes, core.turbo)
        motion = (f"MOVING{' TURBO' if core.turbo else ''} lin {' '.join(f'{v:+.3f}' for v in lin)} m/s "
                  f"ang {' '.join(f'{v:+.2f}' for v in ang)} rad/s")
    else:
        motion = f"stopped ({core.reason})"
    parts = [f"teleop[{device}] {motion}",
             f"safety {safety_state or '?'}/{safety_source or '?'}",
             f"rec {recorder or '?'}",
             "gripper " + ("?" if core.gripper is None else ("open" if core.gripper > 0.5 else "closed"))]
    if last:
        parts.append(last)
    return " | ".join(parts)
