"""Magma's 7-DoF action tokens -> end-effector deltas (numpy only, no torch, no ROS).

Contract (Magma / OpenVLA action tokenizer, MAGMA_FACTS §1.5-1.8):

* An action is 7 tokens, one per dimension ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``.
* Action tokens are the last 256 ids of the tokenizer's *base* vocabulary: ids in
  ``[vocab_size - 256, vocab_size)`` with ``vocab_size = tokenizer.vocab_size`` (128000 for
  Llama-3; added tokens such as ``<pad>``/``<image>`` and the embedding's padded row count do not
  count).
* Decoding: ``d = vocab_size - id``; ``d = clip(d - 1, 0, 254)``; ``normalized = bin_centers[d]``
  where ``bin_centers`` are the 255 centres of 256 uniform bin edges on [-1, 1]. So id 127744 ->
  +0.99608, id 127999 -> -0.99608, id 127872 -> 0.0.
* Un-normalization (BOUNDS_Q99): where ``mask``: ``raw = 0.5 (n + 1) (q99 - q01) + q01``; elsewhere
  ``raw = n`` (the gripper passes through: it was trained in {0, 1} / [0, 1], 1 = open).
* Frames and units of ``raw``: dims 0-2 are the end-effector position delta for ONE step of the
  dataset's control period (metres, robot base frame as the dataset defines it); dims 3-5 are the
  roll/pitch/yaw delta (radians, static-axes 'sxyz' Euler angles, i.e. ``R = Rz(yaw) Ry(pitch)
  Rx(roll)``), applied over the same step. Magma's SimplerEnv code turns them into an axis-angle
  with ``transforms3d.euler.euler2axangle(roll, pitch, yaw)``; :func:`euler2axangle` reproduces it.
* The project's gripper convention is normalized: 0 closed ... 1 open. :class:`BinarizeGripper`
  (Bridge) and :class:`StickyGripper` (Google robot / RT-1) map the raw gripper value to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError, choose

N_ACTION_BINS = 256  # uniform bins on [-1, 1]
ACTION_DIM = 7  # dx, dy, dz, droll, dpitch, dyaw, gripper
BASE_VOCAB_SIZE = 128000  # Llama-3 tokenizer.vocab_size (added tokens excluded)
BIN_EDGES = np.linspace(-1.0, 1.0, N_ACTION_BINS)  # (256,)
BIN_CENTERS = (BIN_EDGES[:-1] + BIN_EDGES[1:]) / 2.0  # (255,)
BUILTIN_STATS = ("bridge_orig", "google_robot")


# ----------------------------------------------------------------------------- tokens


def action_token_range(vocab_size: int = BASE_VOCAB_SIZE) -> range:
    """The 256 ids that encode action bins: ``range(vocab_size - 256, vocab_size)``."""
    return range(vocab_size - N_ACTION_BINS, vocab_size)


def is_action_token(ids, vocab_size: int = BASE_VOCAB_SIZE) -> np.ndarray:
    """Boolean mask, same shape as ``ids``: True where an id is an action token."""
    a = np.asarray(ids, dtype=np.int64)
    return (a >= vocab_size - N_ACTION_BINS) & (a < vocab_size)


def tokens_to_normalized(ids, vocab_size: int = BASE_VOCAB_SIZE) -> np.ndarray:
    """Action token ids (..., D) -> normalized values in [-1, 1] (..., D), float64.

    Ids outside the action range are clipped to the nearest bin exactly as Magma's code does;
    check :func:`is_action_token` first where that matters.
    """
    d = vocab_size - np.asarray(ids, dtype=np.int64)
    d = np.clip(d - 1, 0, N_ACTION_BINS - 2)
    return BIN_CENTERS[d]


def normalized_to_tokens(values, vocab_size: int = BASE_VOCAB_SIZE) -> np.ndarray:
    """Inverse used for training data (OpenVLA): ``vocab_size - digitize(clip(v, -1, 1), edges)``."""
    v = np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0)
    return (vocab_size - np.digitize(v, BIN_EDGES)).astype(np.int64)


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class GripperSpec:
    """How a dataset's raw gripper value maps to the normalized command (0 closed ... 1 open)."""

    mode: str = "binarize"  # binarize (Bridge) | sticky (Google robot/RT-1) | raw (clip to [0, 1])
    threshold: float = 0.5  # raw value above which the gripper is open
    repeat: int = 10  # sticky only: steps a gripper change is held (Magma 10; some ports use 15)
    initial: float = 1.0  # sticky only: normalized state before the first change (1 = open)


@dataclass(frozen=True)
class ActionStats:
    """Per-dataset action statistics used to un-normalize Magma's actions."""

    name: str  # dataset key (bridge_orig, google_robot, or a user file's name)
    q01: np.ndarray  # (7,) 1st percentile per dimension [m, m, m, rad, rad, rad, gripper]
    q99: np.ndarray  # (7,) 99th percentile per dimension
    mask: np.ndarray  # (7,) bool: True where the dimension was normalized (gripper passes through)
    step_period: float  # [s] control period the dataset was recorded at; one action = one step
    gripper: GripperSpec = field(default_factory=GripperSpec)
    source: str = ""  # where the numbers come from

    def unnormalize(self, normalized) -> np.ndarray:
        """Normalized actions (..., 7) in [-1, 1] -> raw dataset units (..., 7), float64."""
        n = np.asarray(normalized, dtype=np.float64)
        if n.shape[-1:] != (ACTION_DIM,):
            raise ValueError(f"expected actions of shape (..., {ACTION_DIM}), got {n.shape}")
        return np.where(self.mask, 0.5 * (n + 1.0) * (self.q99 - self.q01) + self.q01, n)

    def normalize(self, raw) -> np.ndarray:
        """Raw actions (..., 7) -> [-1, 1] as training did (masked dims only)."""
        r = np.asarray(raw, dtype=np.float64)
        n = np.clip(2.0 * (r - self.q01) / (self.q99 - self.q01 + 1e-8) - 1.0, -1.0, 1.0)
        return np.where(self.mask, n, r)

    @property
    def rate_hz(self) -> float:
        return 1.0 / self.step_period


def _stats_from_dict(d: dict, name: str, src: str, step_period: float | None) -> ActionStats:
    act = d.get("action", d)
    try:
        q01 = np.asarray(act["q01"], dtype=np.float64)
        q99 = np.asarray(act["q99"], dtype=np.float64)
    except KeyError as e:
        raise ConfigError(f"{src}: statistics need 'q01' and 'q99' (missing {e})") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: 'q01'/'q99' must be lists of numbers") from None
    mask = np.asarray(act.get("mask", [True] * ACTION_DIM), dtype=bool)
    for k, a in (("q01", q01), ("q99", q99), ("mask", mask)):
        if a.shape != (ACTION_DIM,):
            raise ConfigError(f"{src}: '{k}' needs {ACTION_DIM} values, got {a.size}")
    if not (np.all(np.isfinite(q01)) and np.all(np.isfinite(q99))):
        raise ConfigError(f"{src}: q01/q99 must be finite")
    if np.any(q99[mask] < q01[mask]):
        raise ConfigError(f"{src}: q99 must not be below q01")
    period = step_period if step_period is not None else d.get("step_period")
    if period is None:
        raise ConfigError(
            f"{src}: no 'step_period' (seconds per action, e.g. 0.2 for 5 Hz); add it to the file "
            "or pass step_period=")
    try:
        period = float(period)
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: 'step_period' must be a number of seconds") from None
    if not (math.isfinite(period) and period > 0):
        raise ConfigError(f"{src}: 'step_period' must be > 0 s, got {period}")
    g = d.get("gripper", {}) or {}
    if not isinstance(g, dict):
        raise ConfigError(f"{src}: 'gripper' must be a mapping like {{\"mode\": \"binarize\"}}")
    unknown = set(g) - {"mode", "threshold", "repeat", "initial", "note"}
    if unknown:
        raise ConfigError(f"{src}: unknown gripper keys {sorted(unknown)}")
    spec = GripperSpec(
        mode=choose(str(g.get("mode", "binarize")), ("binarize", "sticky", "raw"), "gripper mode"),
        threshold=float(g.get("threshold", 0.5)),
        repeat=int(g.get("repeat", 10)),
        initial=float(g.get("initial", 1.0)),
    )
    if spec.repeat < 1:
        raise ConfigError(f"{src}: gripper 'repeat' must be >= 1")
    return ActionStats(name=name, q01=q01, q99=q99, mask=mask, step_period=period, gripper=spec,
                       source=str(d.get("source", src)))


def load_stats(name_or_path: str | Path, key: str | None = None,
               step_period: float | None = None) -> ActionStats:
    """Load action statistics: a built-in name (``bridge_orig``, ``google_robot``) or a JSON path.

    A user JSON file is either this project's format (``{"action": {q01, q99, mask}, "step_period":
    s, "gripper": {...}}``) or an OpenVLA/Magma ``dataset_statistics.json`` (``{dataset_key:
    {"action": {...}}}``); pick the dataset with ``key`` (or ``path.json:key``) when it holds several.
    OpenVLA files carry no rate: pass ``step_period`` (seconds per action).
    """
    s = str(name_or_path)
    if s in BUILTIN_STATS:
        from magma_ros.core.paths import data_path

        p = data_path("config", "stats", f"{s}.json")
    else:
        if key is None and ":" in s and not Path(s).is_file():
            s, key = s.rsplit(":", 1)
        p = Path(s)
        if p.suffix != ".json":
                    choose(s, BUILTIN_STATS + ("<path>.json",), "statistics")
        if not p.is_file():
            raise ConfigError(f"statistics file not found: {p}")
    try:
        d = json.loads(Path(p).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: malformed JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    name = str(d.get("name", Path(p).stem))
    if "action" not in d and "q01" not in d:  # OpenVLA layout: {dataset: {"action": {...}}}
        keys = [k for k, v in d.items() if isinstance(v, dict) and "action" in v]
        if not keys:
            raise ConfigError(f"{p}: no 'action' statistics found")
        if key is None:
            if len(keys) > 1:
                raise ConfigError(f"{p}: holds several datasets; pick one with 'file.json:KEY'; "
                                  f"valid: {', '.join(keys)}")
            key = keys[0]
        choose(key, keys, "dataset key")
        name, d = key, d[key]
    elif key is not None:
        raise ConfigError(f"{p}: holds one dataset; no key '{key}' needed")
    return _stats_from_dict(d, name, str(p), step_period)


# ----------------------------------------------------------------------------- gripper


@dataclass(frozen=True)
class BinarizeGripper:
    """Bridge/WidowX (SimplerEnv): open iff raw > threshold. Returns 1.0 (open) or 0.0 (closed).

    SimplerEnv sends ``2 (raw > 0.5) - 1`` (+1 open, -1 close); this is the same decision in the
    project's 0 closed ... 1 open convention. Stateless.
    """

    threshold: float = 0.5

    def __call__(self, raw: float) -> float:
        return 1.0 if float(raw) > self.threshold else 0.0

    def reset(self) -> None:
        """Nothing to reset (stateless); present so all gripper maps share one interface."""


@dataclass(frozen=True)
class RawGripper:
    """Pass the raw gripper value through, clipped to [0, 1] (datasets with a continuous gripper)."""

    def __call__(self, raw: float) -> float:
        return float(np.clip(raw, 0.0, 1.0))

    def reset(self) -> None:
        """Nothing to reset (stateless)."""


class StickyGripper:
    """Google robot / RT-1 gripper (SimplerEnv's sticky logic), as an absolute normalized command.

    SimplerEnv computes a *relative* command ``rel = previous_raw - current_raw`` (0 on the first
    step; +1 closes, -1 opens); once ``|rel| > 0.5`` it latches that value and repeats it for
    ``repeat`` steps (Magma: 10), then releases. The robot integrates the relative command into its
    gripper state; this class does the same integration so the output is the gripper's normalized
    state (0 closed ... 1 open) starting from ``initial``. Stateful: call :meth:`reset` per episode.
    ``last_relative`` keeps SimplerEnv's relative value for parity checks.
    """

    def __init__(self, repeat: int = 10, threshold: float = 0.5, initial: float = 1.0):
        if repeat < 1:
            raise ValueError("sticky gripper repeat must be >= 1")
        self.repeat = int(repeat)
        self.threshold = float(threshold)
        self.initial = float(initial)
        self.reset()

    def reset(self) -> None:
        """Forget the previous raw value and any latched change (new episode)."""
        self._prev: float | None = None
        self._sticky_on = False
        self._sticky_value = 0.0
        self._count = 0
        self.state = self.initial
        self.last_relative = 0.0

    def __call__(self, raw: float) -> float:
        cur = float(raw)
        rel = 0.0 if self._prev is None else self._prev - cur
        self._prev = cur
        if abs(rel) > self.threshold and not self._sticky_on:
            self._sticky_on = True
            self._sticky_value = rel
        if self._sticky_on:
            self._count += 1
            rel = self._sticky_value
        if self._count == self.repeat:
            self._sticky_on = False
            self._count = 0
            self._sticky_value = 0.0
        self.last_relative = rel
        self.state = float(np.clip(self.state - rel, 0.0, 1.0))
        return self.state


def make_gripper(spec: GripperSpec):
    """Build the gripper map for a :class:`GripperSpec` (``__call__(raw) -> 0..1``, ``reset()``)."""
    if spec.mode == "binarize":
        return BinarizeGripper(spec.threshold)
    if spec.mode == "sticky":
        return StickyGripper(spec.repeat, spec.threshold, spec.initial)
    if spec.mode == "raw":
        return RawGripper()
    raise ConfigError(f"unknown gripper mode '{spec.mode}'; valid: binarize, sticky, raw")


# ----------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class DecodedAction:
    """Result of decoding one generated sequence."""

    valid: bool  # True when 7 action tokens were found
    reason: str  # "" when valid, else why the action is a zero hold
    tokens: tuple[int, ...]  # the generated ids that were inspected (first 7 when valid)
    normalized: np.ndarray  # (7,) in [-1, 1]; zeros when invalid
    raw: np.ndarray  # (7,) dataset units (gripper raw); zeros when invalid


@dataclass(frozen=True)
class ActionDecoder:
    """Generated token ids -> un-normalized 7-D action, robust to non-action output.

    Takes the first 7 generated tokens when all are action tokens (Magma emits exactly 7 action
    tokens then ``<|eot_id|>``). Anything else (random weights, text, too few tokens) gives
    ``valid=False``, a zero action and the reason: never a garbage action.
    """

    stats: ActionStats
    vocab_size: int = BASE_VOCAB_SIZE  # tokenizer.vocab_size (base vocabulary)

    def __call__(self, generated) -> DecodedAction:
        ids = [int(t) for t in np.asarray(generated, dtype=np.int64).reshape(-1)]
        zero = np.zeros(ACTION_DIM)
        head = tuple(ids[:ACTION_DIM])
        if len(ids) < ACTION_DIM:
            return DecodedAction(False, f"only {len(ids)} tokens generated, need {ACTION_DIM} action tokens",
                                 tuple(ids), zero, zero)
        ok = is_action_token(head, self.vocab_size)
        if not ok.all():
            lo, hi = self.vocab_size - N_ACTION_BINS, self.vocab_size - 1
            bad = [f"#{i}={t}" for i, t in enumerate(head) if not ok[i]]
            return DecodedAction(False, f"non-action tokens at positions {', '.join(bad)} "
                                        f"(action tokens are {lo}..{hi})", head, zero, zero)
        n = tokens_to_normalized(head, self.vocab_size)
        return DecodedAction(True, "", head, n, self.stats.unnormalize(n))


# ----------------------------------------------------------------------------- rotations

_EPS = np.finfo(np.float64).eps


def euler2quat(ai: float, aj: float, ak: float) -> np.ndarray:
    """Static-axes 'sxyz' Euler angles (rad) -> quaternion (4,) ``[w, x, y, z]``.

    Rotation ``R = Rz(ak) @ Ry(aj) @ Rx(ai)``: first ``ai`` about the fixed x axis, then ``aj``
    about fixed y, then ``ak`` about fixed z (transforms3d's default ``axes='sxyz'``).
    """
    ai, aj, ak = ai / 2.0, aj / 2.0, ak / 2.0
    ci, si = math.cos(ai), math.sin(ai)
    cj, sj = math.cos(aj), math.sin(aj)
    ck, sk = math.cos(ak), math.sin(ak)
    cc, cs, sc, ss = ci * ck, ci * sk, si * ck, si * sk
    return np.array([cj * cc + sj * ss, cj * sc - sj * cs, cj * ss + sj * cc, cj * cs - sj * sc])


def quat2axangle(q) -> tuple[np.ndarray, float]:
    """Quaternion ``[w, x, y, z]`` -> (unit axis (3,), angle in [0, 2 pi]) as transforms3d does.

    The identity (or a degenerate quaternion) gives axis ``[1, 0, 0]`` and angle 0.
    """
    w, x, y, z = (float(v) for v in q)
    nq = w * w + x * x + y * y + z * z
    if not math.isfinite(nq):
        return np.array([1.0, 0.0, 0.0]), float("nan")
    if nq < _EPS**2:
        return np.array([1.0, 0.0, 0.0]), 0.0
    if nq != 1.0:
        s = math.sqrt(nq)
        w, x, y, z = w / s, x / s, y / s, z / s
    len2 = x * x + y * y + z * z
    if len2 < (3 * _EPS) ** 2:
        return np.array([1.0, 0.0, 0.0]), 0.0
    theta = 2.0 * math.acos(max(min(w, 1.0), -1.0))
    return np.array([x, y, z]) / math.sqrt(len2), theta


def euler2axangle(ai: float, aj: float, ak: float) -> tuple[np.ndarray, float]:
    """``transforms3d.euler.euler2axangle(ai, aj, ak)`` (axes 'sxyz') in numpy.

    Magma's roll/pitch/yaw deltas (``ai`` = roll about x, ``aj`` = pitch about y, ``ak`` = yaw
    about z, static axes, radians) -> (unit axis (3,), angle rad in [0, 2 pi]) of the same rotation,
    expressed in the frame the Euler angles are in (the robot base frame for Magma's datasets).
    """
    return quat2axangle(euler2quat(ai, aj, ak))


def euler_to_rotvec(rpy) -> np.ndarray:
    """Roll/pitch/yaw (3,) 'sxyz' -> rotation vector (3,) = axis * angle with angle in [0, pi].

    Same rotation as :func:`euler2axangle`; angles above pi are wrapped to the shorter way round
    (identical for Magma's small per-step deltas). Use this for a twist: rate = rotvec / step_period.
    """
    r = np.asarray(rpy, dtype=np.float64).reshape(-1)
    if r.shape != (3,):
        raise ValueError(f"expected roll, pitch, yaw (3,), got shape {r.shape}")
    axis, angle = euler2axangle(*r)
    if angle > math.pi:
        axis, angle = -axis, 2.0 * math.pi - angle
    return axis * angle


def euler2mat(ai: float, aj: float, ak: float) -> np.ndarray:
    """'sxyz' Euler angles -> rotation matrix (3, 3) = ``Rz(ak) @ Ry(aj) @ Rx(ai)``."""
    ci, si = math.cos(ai), math.sin(ai)
    cj, sj = math.cos(aj), math.sin(aj)
    ck, sk = math.cos(ak), math.sin(ak)
    rx = np.array([[1, 0, 0], [0, ci, -si], [0, si, ci]])
    ry = np.array([[cj, 0, sj], [0, 1, 0], [-sj, 0, cj]])
    rz = np.array([[ck, -sk, 0], [sk, ck, 0], [0, 0, 1]])
    return rz @ ry @ rx


def action_to_twist(action, step_period: float) -> tuple[np.ndarray, np.ndarray]:
    """7-D action -> (linear velocity (3,) m/s, angular velocity (3,) rad/s as a rotation-vector rate).

    The delta is spread over one ``step_period`` (seconds) of the dataset the action came from.
    """
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape[0] < 6:
        raise ValueError(f"expected an action with at least 6 values, got {a.shape[0]}")
    if not step_period > 0:
        raise ValueError(f"step_period must be > 0 s, got {step_period}")
    return a[:3] / step_period, euler_to_rotvec(a[3:6]) / step_period
