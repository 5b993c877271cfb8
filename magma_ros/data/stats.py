"""Action statistics of a recorded dataset in the form the policy's ``stats:=`` parameter loads.

``action_stats(DATASET)`` reads the Magma-convention ``action`` column of every frame and returns the
project's statistics JSON (``core.actions.load_stats`` reads it): per-dimension ``q01``/``q99`` (what
Magma's BOUNDS_Q99 un-normalization uses), ``mean``/``std``/``min``/``max``, ``mask`` (the gripper is not
normalized, as in Bridge/RT-1), the dataset's ``step_period`` and the gripper rule (binarize at 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError
from magma_ros.data.episode import MAGMA_ACTION_NAMES
from magma_ros.data.lerobot import read_frames, read_info


def action_stats(root: str | Path, name: str | None = None) -> dict:
    """Statistics JSON (dict) of the ``action`` feature of the LeRobot dataset at ``root``."""
    root = Path(root)
    info = read_info(root)
    ft = info.get("features", {}).get("action")
    if ft is None or list(ft.get("shape", [])) != [7]:
        raise ConfigError(f"{root}: no 7-D 'action' feature (Magma convention); was it recorded by magma_ros?")
    period = (info.get("magma_ros") or {}).get("step_period")
    if period is None:
        raise ConfigError(f"{root}: info.json has no magma_ros.step_period (seconds per action)")
    a = read_frames(root, ["action"])["action"].astype(np.float64)
    if a.ndim != 2 or len(a) == 0:
        raise ConfigError(f"{root}: no frames")
    return {
        "name": name or root.name,
        "source": f"magma-ros stats {root} ({len(a)} frames, {info.get('total_episodes')} episodes, "
                  f"robot {info.get('robot_type')}, {info.get('fps')} fps)",
        "robot": info.get("robot_type"),
        "step_period": float(period),
        "gripper": {"mode": "binarize", "threshold": 0.5,
                    "note": "recorded as the normalized command, 0 closed ... 1 open"},
        "action": {
            "names": MAGMA_ACTION_NAMES,
            "mask": [True] * 6 + [False],
            "q01": np.quantile(a, 0.01, axis=0).tolist(),
            "q99": np.quantile(a, 0.99, axis=0).tolist(),
            "mean": a.mean(0).tolist(),
            "std": a.std(0).tolist(),
            "min": a.min(0).tolist(),
            "max": a.max(0).tolist(),
            "count": int(len(a)),
        },
    }
