"""Open a dataset with LeRobot's own loader (run with the lerobot venv's python) and print it as JSON.

    python lerobot_reader.py DATASET_DIR [--images]

Prints {"num_episodes", "num_frames", "fps", "tasks", "episodes": [{index, length, from, to}],
"frames": [{feature: value, ...}]} where video features are given as their per-channel mean (0..255)
and, with --images, a subsampled pixel block. Any failure of LeRobot's loader exits non-zero.
"""

import json
import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset


def main() -> None:
    root = sys.argv[1]
    ds = LeRobotDataset("local/test", root=root, video_backend="pyav")
    out = {"num_episodes": ds.num_episodes, "num_frames": ds.num_frames, "fps": ds.fps,
           "video_keys": list(ds.meta.video_keys), "tasks": [str(t) for t in ds.meta.tasks.index],
           "episodes": [], "frames": []}
    for e in range(ds.meta.total_episodes):
        ep = ds.meta.episodes[e]
        out["episodes"].append({"index": int(ep["episode_index"]), "length": int(ep["length"]),
                                "from": int(ep["dataset_from_index"]), "to": int(ep["dataset_to_index"])})
    for i in range(len(ds)):
        item = ds[i]
        row = {}
        for k, v in item.items():
            if k in ds.meta.video_keys:
                img = (v.numpy() * 255.0)  # (3, H, W) float in [0, 1]
                row[k] = img.reshape(3, -1).mean(1).tolist()
                if "--images" in sys.argv:
                    row[k + ":pixels"] = np.round(img[:, ::16, ::16]).astype(int).tolist()
            elif isinstance(v, str):
                row[k] = v
            else:
                row[k] = v.numpy().tolist()
        out["frames"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
