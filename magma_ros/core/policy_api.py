"""The policy contract shared by the local engine (`MagmaPolicy`), the policy server and `RemotePolicy`.

An observation is ``{"image": HxWx3 uint8 RGB, "instruction": str}``; openpi clients may say
``"prompt"`` instead of ``"instruction"`` and ``"observation/image"`` instead of ``"image"``.
``"robot_id": str`` keeps per-arm state (the sticky gripper) apart. A result is ``{"action":
float32 (7,) [dx, dy, dz, droll, dpitch, dyaw, gripper 0 closed..1 open], "tokens": list[int],
"latency_s": float, "valid": bool, "reason": str}``; the server adds ``"actions"`` (float32
(H, 7), H = 1 for Magma) for openpi clients. Nothing here imports torch or ROS.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import numpy as np

MAX_IMAGE_SIDE = 4096  # pixels; larger frames are refused (memory, wire size)
MIN_IMAGE_SIDE = 8  # pixels
MAX_INSTRUCTION_CHARS = 2000
MAX_ROBOT_ID_CHARS = 128
DEFAULT_ROBOT_ID = "default"
_ROBOT_ID = re.compile(r"^[A-Za-z0-9_./:-]+$")  # a ROS namespace ("/left_arm") fits
IMAGE_KEYS = ("image", "observation/image")  # first present wins
TEXT_KEYS = ("instruction", "prompt")


@runtime_checkable
class BasePolicy(Protocol):
    """Anything with ``infer(obs) -> dict`` (numpy in and out, no ML dependencies for the caller)."""

    def infer(self, obs: dict) -> dict:
        """One observation -> one action result (see the module docstring)."""
        ...


def validate_image(image, what: str = "image") -> np.ndarray:
    """Return ``image`` as a C-contiguous HxWx3 uint8 array or raise ValueError saying what is wrong."""
    if image is None:
        raise ValueError(f"{what} is missing")
    a = np.asarray(image)
    if a.dtype == object:
        raise ValueError(f"{what} must be a numeric array, got objects")
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what} must be HxWx3 RGB, got shape {tuple(a.shape)}")
    h, w = a.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_IMAGE_SIDE:
        raise ValueError(f"{what} size {w}x{h} outside [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] pixels")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{what} contains NaN or inf")
        raise ValueError(f"{what} must be uint8 (0..255), got {a.dtype}; convert with "
                         "(img * 255).clip(0, 255).astype(np.uint8) for [0, 1] floats")
    return np.ascontiguousarray(a)


def validate_text(text, what: str = "instruction") -> str:
    """Return a non-empty, bounded string or raise ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    t = text.strip()
    if not t:
        raise ValueError(f"{what} is empty")
    if len(t) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"{what} longer than {MAX_INSTRUCTION_CHARS} characters")
    return t


def validate_robot_id(rid, what: str = "robot_id") -> str:
    """A short id of letters, digits and ``_./:-`` (a ROS namespace fits) or ValueError."""
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ROBOT_ID_CHARS or not _ROBOT_ID.match(rid):
        raise ValueError(f"{what} must be 1..{MAX_ROBOT_ID_CHARS} characters of letters, digits and _./:-")
    return rid


def _first(obs: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in obs:
            return k
    return None


def validate_observation(obs) -> tuple[np.ndarray, str, str]:
    """Check an observation dict -> (image HxWx3 uint8, instruction, robot_id); ValueError if malformed."""
    if not isinstance(obs, dict):
        raise ValueError(f"observation must be a dict with 'image' and 'instruction', got {type(obs).__name__}")
    ik, tk = _first(obs, IMAGE_KEYS), _first(obs, TEXT_KEYS)
    missing = [k for k, got in (("image", ik), ("instruction", tk)) if got is None]
    if missing:
        raise ValueError(f"observation is missing {', '.join(repr(k) for k in missing)}")
    rid = validate_robot_id(obs.get("robot_id", DEFAULT_ROBOT_ID))
    return validate_image(obs[ik], ik), validate_text(obs[tk], tk), rid


def canonical_observation(obs) -> dict:
    """A validated observation in this project's names: ``{"image", "instruction", "robot_id"}``."""
    image, text, rid = validate_observation(obs)
    return {"image": image, "instruction": text, "robot_id": rid}


def hold_result(reason: str, gripper: float = 1.0, latency_s: float = 0.0, tokens=()) -> dict:
    """A no-motion result (``valid=False``): zero deltas, the gripper held at ``gripper``."""
    action = np.zeros(7, dtype=np.float32)
    action[6] = gripper
    return {"action": action, "tokens": [int(t) for t in tokens], "latency_s": float(latency_s),
            "valid": False, "reason": reason}


__all__ = ["BasePolicy", "validate_image", "validate_text", "validate_robot_id", "validate_observation",
           "canonical_observation", "hold_result", "DEFAULT_ROBOT_ID"]
