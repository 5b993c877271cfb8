"""The policy loop without ROS: newest-frame mailbox, step gating, staleness, scripted policy.

Data flow (the policy node wires ROS topics to this):

    image callback --offer(Frame)--> Mailbox (one slot, newest wins) --> worker thread
        worker: wait for a frame >= one step period after the last acted-on frame (image time),
                drop it if older than image_timeout, policy.infer({"image", "instruction"}),
                valid -> publish(PolicyAction), invalid -> report(reason)

- The mailbox never queues: a frame that arrives while the worker is busy replaces the waiting
  one (counted as dropped). Inference always sees the newest frame.
- At most one action per ``step_period`` of image time: a frame stamped less than one step period
  after the frame of the last action is skipped, so deltas are never replayed at another rate.
  Slower inference just means fewer actions (the servo holds between them).
- A policy is anything with ``infer(obs: dict) -> dict`` (``MagmaPolicy``, ``RemotePolicy``,
  :class:`ScriptedPolicy`); its output ``{"action": (7,), "valid": bool, "reason": str}``.
- The node clock running back (a simulator reset, a looping bag under ``use_sim_time``) resets the
  step gating (reported once): otherwise every new frame would count as "within the step period" of
  the last action until the clock caught up. Frames stamped more than ``future_tolerance`` ahead of
  the clock (from before the reset) are dropped.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from magma_ros.core.actions import action_to_twist
from magma_ros.core.checks import stamp_age
from magma_ros.core.errors import ConfigError


@dataclass(frozen=True)
class Frame:
    """One camera image as the loop sees it."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    stamp: float  # [s] header stamp (camera clock = node clock; sim time under use_sim_time)
    received: float  # [s] node time when it arrived
    frame_id: str = ""


@dataclass(frozen=True)
class PolicyAction:
    """One valid action, ready for the wire (TwistStamped + Float64)."""

    stamp: float  # [s] the image's stamp (the action's age is measured from it)
    linear: np.ndarray  # (3,) [m/s] base frame = delta / step_period
    angular: np.ndarray  # (3,) [rad/s] rotation-vector rate = rotvec(droll, dpitch, dyaw) / step_period
    gripper: float  # 0 closed ... 1 open
    delta: np.ndarray  # (7,) the raw action [dx, dy, dz, droll, dpitch, dyaw, gripper]
    latency_s: float  # [s] inference time


class Mailbox:
    """A one-slot, thread-safe mailbox: ``put`` replaces whatever waits, ``get`` takes it."""

    def __init__(self):
        self._cv = threading.Condition()
        self._item = None
        self._closed = False
        self.put_count = 0
        self.dropped = 0  # items replaced before anyone took them

    def put(self, item) -> None:
        with self._cv:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.put_count += 1
            self._cv.notify_all()

    def get(self, timeout: float | None = None):
        """Wait up to ``timeout`` s for an item and take it; None on timeout or when closed."""
        with self._cv:
            self._cv.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def peek(self):
        with self._cv:
            return self._item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class ScriptedPolicy:
    """A fixed list of 7-D actions, one per call, behind the same ``infer`` contract as Magma.

    ``loop``: start over when the list ends; otherwise every further call returns
    ``valid=False`` ("script finished") so the arm holds.
    """

    def __init__(self, actions: Sequence[Sequence[float]], loop: bool = False, step_period: float = 0.2):
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 7 or a.shape[0] == 0:
            raise ConfigError(f"scripted actions must be a non-empty list of 7-vectors, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ConfigError("scripted actions contain NaN/inf")
        self.actions = a
        self.loop = loop
        self.step_period = float(step_period)
        self.index = 0
        self.calls = 0

    @classmethod
    def from_flat(cls, flat: Sequence[float], **kw) -> ScriptedPolicy:
        """Build from a flat list (a ROS double-array parameter), 7 values per action."""
        flat = list(flat)
        if len(flat) == 0 or len(flat) % 7:
            raise ConfigError(f"scripted_actions needs a multiple of 7 numbers, got {len(flat)}")
        return cls(np.asarray(flat, dtype=np.float64).reshape(-1, 7), **kw)

    def reset(self) -> None:
        self.index = 0

    def metadata(self) -> dict:
        """What a policy server reports to clients (the step period, like MagmaPolicy)."""
        return {"policy": "scripted", "step_period": self.step_period, "actions": len(self.actions)}

    def infer(self, obs: dict) -> dict:
        self.calls += 1
        t0 = time.perf_counter()
        img = obs.get("image")
        if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3):
            return {"action": np.zeros(7, np.float32), "valid": False, "reason": "no RGB image",
                    "tokens": [], "latency_s": 0.0}
        if self.index >= len(self.actions):
            if not self.loop:
                return {"action": np.zeros(7, np.float32), "valid": False, "reason": "script finished",
                        "tokens": [], "latency_s": time.perf_counter() - t0}
            self.index = 0
        a = self.actions[self.index].astype(np.float32)
        self.index += 1
        return {"action": a, "valid": True, "reason": "", "tokens": [], "latency_s": time.perf_counter() - t0}


def to_policy_action(out: dict, stamp: float, step_period: float) -> tuple[PolicyAction | None, str]:
    """Check a policy output and turn it into a :class:`PolicyAction` (or None and why not)."""
    if not isinstance(out, dict):
        return None, "policy returned no dict"
    if not out.get("valid", False):
        return None, f"invalid action: {out.get('reason') or 'no reason given'}"
    try:
        a = np.asarray(out["action"], dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        return None, "invalid action: no numeric 'action'"
    if a.shape != (7,):
        return None, f"invalid action: expected 7 values, got {a.size}"
    if not np.all(np.isfinite(a)):
        return None, "invalid action: NaN/inf"
    lin, ang = action_to_twist(a, step_period)
    return PolicyAction(stamp=stamp, linear=lin, angular=ang, gripper=float(np.clip(a[6], 0.0, 1.0)),
                        delta=a, latency_s=float(out.get("latency_s", 0.0) or 0.0)), ""


@dataclass
class LoopStats:
    """Counters and a rate estimate for the diagnostics."""

    inferences: int = 0
    published: int = 0
    invalid: int = 0
    stale: int = 0
    future: int = 0  # frames stamped ahead of the clock (from before a clock reset)
    clock_resets: int = 0  # the node clock jumped back: step gating reset
    skipped_step: int = 0  # frames inside the current step period (not acted on)
    errors: int = 0
    last_reason: str = ""
    last_latency: float = 0.0
    _t: deque = field(default_factory=lambda: deque(maxlen=20))  # wall times of recent inferences

    def rate(self) -> float:
        """Achieved inference rate [Hz] over the recent window (wall clock)."""
        if len(self._t) < 2:
            return 0.0
        span = self._t[-1] - self._t[0]
        return (len(self._t) - 1) / span if span > 0 else 0.0


class PolicyLoop:
    """Runs ``policy.infer`` on the newest frame in a worker thread and hands valid actions on.

    ``now()`` returns the node clock in seconds; ``publish(PolicyAction)`` and ``report(str)`` are
    called from the worker thread. ``ready()`` (optional) returns '' when an action would reach
    its consumer, else why not (e.g. no servo matched yet on DDS): the frame is then not acted on
    and the next one is, so the first action after start-up is not published into the void.
    """

    def __init__(self, policy, step_period: float, image_timeout: float, now: Callable[[], float],
                 publish: Callable[[PolicyAction], None], report: Callable[[str], None] | None = None,
                 instruction: str = "", nice: int = 0, ready: Callable[[], str] | None = None,
                 clock_jump: float = 0.1, future_tolerance: float = 0.5):
        if not step_period > 0:
            raise ConfigError(f"step_period must be > 0 s, got {step_period}")
        self.policy = policy
        self.step_period = float(step_period)
        self.image_timeout = float(image_timeout)
        self.now = now
        self.publish = publish
        self.report = report or (lambda s: None)
        self.ready = ready or (lambda: "")
        self.nice = nice
        self.mailbox = Mailbox()
        self.stats = LoopStats()
        self._instruction = instruction
        self._reset_pending = False
        self._last_action_stamp = -math.inf
        self._last_received = None  # node time of the last frame offered
        self.clock_jump = float(clock_jump)  # [s] the clock running back by more than this = a reset
        self.future_tolerance = float(future_tolerance)  # [s] frames stamped further ahead are dropped
        self._clock = -math.inf  # latest node time seen
        self._thread: threading.Thread | None = None
        self.busy = threading.Event()  # set while infer() runs

    # -------------------------------------------------------------- inputs
    def offer(self, frame: Frame) -> None:
        """Hand over a new frame (from the image callback); never blocks."""
        self.check_clock(frame.received)
        self._last_received = frame.received
        self.mailbox.put(frame)

    def check_clock(self, now: float) -> bool:
        """Detect the node clock jumping back (True once per jump) and reset the stamp state.

        The last action's stamp and the last arrival time are on the old clock: kept, every new frame
        would be "within the step period" (no action until the clock caught up) and the camera would
        look fresh whatever happened. Both are dropped; one line goes to ``report``.
        """
        now = float(now)
        if now < self._clock - self.clock_jump:
            back = self._clock - now
            self._clock = now
            self._last_action_stamp = -math.inf
            self._last_received = None
            self.stats.clock_resets += 1
            self.report(f"clock jumped back {back:.3f} s (to {now:.3f} s): step gating reset")
            return True
        self._clock = max(self._clock, now)
        return False

    def set_instruction(self, text: str) -> None:
        """New task: used from the next inference on; a changed text also resets the policy's
        per-episode state (``policy.reset()``, e.g. the sticky gripper) in the worker thread."""
        text = str(text).strip()
        if text != self._instruction:
            self._reset_pending = True
        self._instruction = text

    @property
    def instruction(self) -> str:
        return self._instruction

    def camera_stale(self, now: float) -> str:
        """'' if frames arrive; else why the camera counts as stale (node clock)."""
        self.check_clock(now)
        if self._last_received is None:
            return "no image received yet"
        age = now - self._last_received
        if age > self.image_timeout:
            return f"camera stale: last image {age:.2f} s ago > image_timeout {self.image_timeout} s"
        return ""

    def slack(self) -> float:
        """Seconds until the next action is due (0 when it is due now or inference is running)."""
        if self.busy.is_set() or not math.isfinite(self._last_action_stamp):
            return 0.0
        return max(0.0, self._last_action_stamp + self.step_period - self.now())

    # -------------------------------------------------------------- the work
    def step(self, timeout: float = 0.1) -> str:
        """Take the newest frame (waiting up to ``timeout``) and act on it. Returns what happened."""
        frame: Frame | None = self.mailbox.get(timeout)
        if frame is None:
            return "no frame"
        now = self.now()
        self.check_clock(now)
        kind, age = stamp_age(frame.stamp if frame.stamp > 0.0 else frame.received, now, self.image_timeout,
                              self.future_tolerance)
        if kind:
            if kind == "future":
                self.stats.future += 1
                why = f"image stamped {-age:.2f} s ahead of the clock (from before a clock reset?): dropped"
            else:
                self.stats.stale += 1
                why = f"stale image: {age:.2f} s old > image_timeout {self.image_timeout} s"
            self.stats.last_reason = why
            self.report(why)
            return why
        stamp = frame.stamp if frame.stamp > 0.0 else frame.received
        if stamp < self._last_action_stamp + 0.9 * self.step_period:
            self.stats.skipped_step += 1
            return "within step period"
        if not self._instruction:
            self.stats.last_reason = "waiting for an instruction"
            return "waiting for an instruction"
        why = self.ready()
        if why:
            self.stats.last_reason = why
            self.report(why)
            return why
        self._last_action_stamp = stamp
        self.busy.set()
        try:
            if self._reset_pending and hasattr(self.policy, "reset"):
                self._reset_pending = False
                self.policy.reset()
            out = self.policy.infer({"image": frame.image, "instruction": self._instruction})
        except Exception as e:  # the policy (network, model) must never kill the loop
            self.stats.errors += 1
            why = f"policy error: {type(e).__name__}: {e}"
            self.stats.last_reason = why
            self.report(why)
            return why
        finally:
            self.busy.clear()
        self.stats.inferences += 1
        self.stats._t.append(time.monotonic())
        action, why = to_policy_action(out, stamp, self.step_period)
        if action is None:
            self.stats.invalid += 1
            self.stats.last_reason = why
            self.report(why)
            return why
        self.stats.last_latency = action.latency_s
        self.publish(action)
        self.stats.published += 1
        self.stats.last_reason = "ok"
        return "published"

    def _run(self) -> None:
        _lower_thread_priority(self.nice)
        while not self.mailbox.closed:
            try:
                self.step(0.2)
            except Exception as e:  # keep the worker alive whatever a callback does
                self.stats.errors += 1
                self.report(f"policy loop error: {type(e).__name__}: {e}")

    def start(self) -> PolicyLoop:
        self._thread = threading.Thread(target=self._run, name="magma-policy", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.mailbox.close()
        if self._thread is not None:
            self._thread.join(timeout)


def _lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux threads have their own)."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError, PermissionError):
        pass


@dataclass(frozen=True)
class TomResult:
    """A ToM plan for one frame: traces per mark in image pixels."""

    stamp: float  # [s] the image's stamp
    marks: np.ndarray  # (K, 2) start points [x, y] px
    traces: list  # K arrays (T_k, 2) [x, y] px, starting at the mark
    image: np.ndarray  # (H, W, 3) uint8 RGB frame the plan is for
    latency_s: float
    note: str = ""  # why there are no traces (model answer not parseable), "" when fine


class TomWorker:
    """Trace-of-Mark plans at ``rate`` Hz in a low-priority thread that never delays an action.

    ``plan(frame, instruction) -> TomResult | None`` does the work (mark placement + the model's
    ``predict_tom``). The thread runs at a raised nice value. With its own model instance (the
    default in the node) it shares nothing with the action path. When it shares the action model
    (``action_busy`` and ``slack`` given), a plan only *starts* while no action inference runs and
    the previous plan's duration fits in ``slack()`` (seconds until the next action is due).
    ``max_duty`` caps the fraction of wall time spent planning: after a plan that took ``d`` seconds
    the next one starts no sooner than ``d / max_duty`` after it began (and not before ``1 / rate``),
    so a slow plan (a busy host, a long answer) stretches the period instead of taking a core.
    """

    def __init__(self, plan: Callable[[Frame, str], TomResult | None], rate: float,
                 publish: Callable[[TomResult], None], instruction: Callable[[], str],
                 action_busy: threading.Event | None = None, report: Callable[[str], None] | None = None,
                 nice: int = 10, slack: Callable[[], float] | None = None, max_duty: float = 1.0):
        if not 0.0 < max_duty <= 1.0:
            raise ConfigError(f"tom max_duty must be in (0, 1], got {max_duty}")
        self.plan = plan
        self.period = 1.0 / rate if rate > 0 else math.inf
        self.max_duty = float(max_duty)
        self.publish = publish
        self.instruction = instruction
        self.action_busy = action_busy
        self.slack = slack
        self.report = report or (lambda s: None)
        self.nice = nice
        self.mailbox = Mailbox()
        self.count = 0
        self.errors = 0
        self.last_latency = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def offer(self, frame: Frame) -> None:
        self.mailbox.put(frame)

    def step(self, timeout: float = 0.2) -> bool:
        """Plan on the newest frame once; True when a plan was published."""
        if (self.action_busy is not None and self.action_busy.is_set()) or (
                self.slack is not None and self.slack() < max(self.last_latency, 1e-3)):
            time.sleep(0.01)
            return False
        frame = self.mailbox.get(timeout)
        if frame is None or not self.instruction():
            return False
        t0 = time.monotonic()
        try:
            res = self.plan(frame, self.instruction())
        except Exception as e:
            self.errors += 1
            self.report(f"tom error: {type(e).__name__}: {e}")
            return False
        self.last_latency = time.monotonic() - t0
        if res is None:
            return False
        self.publish(res)
        self.count += 1
        return True

    def pause_after(self, spent: float) -> float:
        """Seconds to wait after a plan that took ``spent`` s: the rest of the period, or longer so that
        planning stays within ``max_duty`` of the time."""
        return max(self.period, spent / self.max_duty) - spent

    def _run(self) -> None:
        _lower_thread_priority(self.nice)
        while not self._stop.is_set():
            t0 = time.monotonic()
            done = self.step()
            if done:
                rest = self.pause_after(time.monotonic() - t0)
                if rest > 0:
                    self._stop.wait(rest)

    def start(self) -> TomWorker:
        if math.isfinite(self.period):
            self._thread = threading.Thread(target=self._run, name="magma-tom", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.mailbox.close()
        if self._thread is not None:
            self._thread.join(timeout)
