"""LeRobot v3.0 dataset writer (pyarrow + PyAV), crash-safe: every finished episode is durable on disk.

Layout and columns as LeRobot 0.4.x writes them (``lerobot/datasets/{lerobot_dataset,utils}.py``)::

    meta/info.json                                  codebase_version "v3.0", fps, features, totals, paths
    meta/stats.json                                 per-feature min/max/mean/std/count/q01..q99 (aggregated)
    meta/tasks.parquet                              task (pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode: length, tasks, data/ and
                                                    videos/<key>/ chunk+file indices, from/to timestamps,
                                                    dataset_from/to_index, stats/<feature>/<stat>
    data/chunk-000/file-000.parquet                 one row per frame: features + timestamp, frame_index,
                                                    episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4             episodes one after another (from_timestamp marks each)

Episodes are appended to the current data/video/episodes file until it reaches its size limit
(``data_files_size_in_mb``, ``video_files_size_in_mb``), then the next file index starts, as in LeRobot.

Crash safety (LeRobot keeps parquet writers open and writes footers at close, so a SIGKILL loses the
whole session: lerobot #3522, #2495). Here nothing in the dataset is open while an episode records:

1. :meth:`LeRobotWriter.begin_episode` stages the episode in ``.staging/episode-<n>-<id>/``: frames are
   appended to an Arrow IPC stream and fsync'd every ``sync_period``; video is encoded into the
   episode's own MP4 as frames arrive; ``manifest.json`` says ``recording``.
2. :meth:`EpisodeStage.finish` closes the stream and the MP4 (fsync) and marks the stage ``stopped``.
3. :meth:`LeRobotWriter.commit` builds every file the episode changes (data, video, episodes, tasks,
   stats, info) as new files in ``.staging/commit-<n>/`` (fsync), writes ``COMMIT.json`` (the list of
   renames; atomic), then renames them into place (data and videos first, info.json last).

:meth:`LeRobotWriter.recover` (run on open) replays a commit whose ``COMMIT.json`` exists, re-commits a
``stopped`` stage and moves a ``recording`` stage (killed mid-episode) to ``.staging/incomplete/``,
reporting it: a kill loses at most the episode being recorded, and says so. LeRobot's loader only
reads the paths above, so ``.staging/`` never disturbs it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError
from magma_ros.data.video import VideoConfig, VideoEncoder, concatenate, fsync_path, video_duration, video_info

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
STAGING = ".staging"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # LeRobot's DEFAULT_QUANTILES
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
NUMERIC = ("float32", "float64", "int64", "int32", "bool")


class DatasetIOError(RuntimeError):
    """Writing the dataset failed (disk full, unwritable path): the message names the path."""


def _io(what: str, path: Path, e: OSError) -> DatasetIOError:
    return DatasetIOError(f"cannot {what} {path}: {e.strerror or e}")


# ------------------------------------------------------------------------------------- durable files
def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _json_bytes(d) -> bytes:
    return (json.dumps(d, indent=4, ensure_ascii=False) + "\n").encode()


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")
    fsync_path(path)


# ------------------------------------------------------------------------------------------ features
def arrow_type(ft: dict):
    """The Arrow type of a non-video feature as LeRobot's HF ``datasets`` features expect it."""
    import pyarrow as pa

    base = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
            "bool": pa.bool_()}[ft["dtype"]]
    shape = list(ft["shape"])
    if shape == [1]:
        return base
    if len(shape) == 1:
        return pa.list_(base, shape[0])  # datasets Sequence(length=n) / List(length=n)
    raise ConfigError(f"feature shape {shape}: only scalars and vectors are written")


def validate_features(features: dict) -> dict:
    """Check user features (no default keys, known dtypes); returns them with DEFAULT_FEATURES added."""
    out = {}
    for k, ft in features.items():
        if k in DEFAULT_FEATURES:
            raise ConfigError(f"feature '{k}' is added by the writer")
        if "/" in k:
            raise ConfigError(f"feature name '{k}' must not contain '/' (LeRobot flattens stats with it)")
        dt = ft.get("dtype")
        if dt == "video":
            shp = list(ft["shape"])
            if len(shp) != 3 or shp[2] != 3:
                raise ConfigError(f"video feature '{k}' needs shape [height, width, 3], got {shp}")
        elif dt not in NUMERIC:
            raise ConfigError(f"feature '{k}': dtype '{dt}' not supported (video, {', '.join(NUMERIC)})")
        out[k] = {"dtype": dt, "shape": [int(s) for s in ft["shape"]], "names": ft.get("names")}
        if dt == "video":
            out[k]["names"] = ["height", "width", "channels"]
    out.update(json.loads(json.dumps(DEFAULT_FEATURES)))
    return out


# --------------------------------------------------------------------------------------- statistics
def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot per-episode statistics of a (N, ...) array over axis 0 (float64 arrays, count (1,))."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    s = {"min": a.min(0), "max": a.max(0), "mean": a.mean(0), "std": a.std(0), "count": np.array([len(a)])}
    for q in QUANTILES:
        s[f"q{int(round(q * 100)):02d}"] = np.quantile(a, q, axis=0)
    return s


def image_stats(samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel statistics (3, 1, 1) in [0, 1] of sampled (H, W, 3) uint8 frames, LeRobot style."""
    px = np.concatenate([s.reshape(-1, 3) for s in samples]).astype(np.float64) / 255.0
    s = feature_stats(px)
    count = np.array([len(samples)])
    return {k: (count if k == "count" else v.reshape(3, 1, 1)) for k, v in s.items()}


def aggregate_stats(stats_list: list[dict]) -> dict:
    """Combine per-episode statistics as LeRobot's ``aggregate_stats`` does (count-weighted)."""
    out = {}
    for key in {k for s in stats_list for k in s}:
        fl = [s[key] for s in stats_list if key in s]
        counts = np.stack([np.asarray(s["count"], np.float64) for s in fl])
        means = np.stack([np.asarray(s["mean"]) for s in fl])
        var = np.stack([np.asarray(s["std"]) ** 2 for s in fl])
        total = counts.sum(0)
        c = counts
        while c.ndim < means.ndim:
            c = c[..., None]
        mean = (means * c).sum(0) / total
        variance = ((var + (means - mean) ** 2) * c).sum(0) / total
        agg = {"min": np.min(np.stack([s["min"] for s in fl]), 0), "max": np.max(np.stack([s["max"] for s in fl]), 0),
               "mean": mean, "std": np.sqrt(variance), "count": total.astype(np.int64)}
        for q in [k for k in fl[0] if k.startswith("q") and k[1:].isdigit()]:
            if all(q in s for s in fl):
                agg[q] = (np.stack([s[q] for s in fl]) * c).sum(0) / total
        out[key] = agg
    return out


def _stats_to_json(stats: dict) -> dict:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def _stats_from_json(d: dict) -> dict:
    return {k: {s: np.asarray(v) for s, v in st.items()} for k, st in d.items()}


# ------------------------------------------------------------------------------------------ staging
@dataclass
class StagedEpisode:
    """What :meth:`LeRobotWriter.recover` found in ``.staging`` (for the log)."""

    path: Path
    episode_index: int
    frames: int
    state: str  # recording (incomplete: killed) | stopped (committed now) | committing (replayed)


class EpisodeStage:
    """One episode being recorded, in its own durable files (never inside the dataset's own paths)."""

    def __init__(self, writer: LeRobotWriter, task: str, sync_period: float = 1.0):
        import pyarrow as pa

        self.writer = writer
        self.task = str(task)
        self.index = writer.total_episodes
        self.dir = writer.root / STAGING / f"episode-{self.index:06d}-{uuid.uuid4().hex[:8]}"
        self.frames = 0
        self.sync_period = sync_period
        self._last_sync = time.monotonic()
        self._samples: dict[str, list[np.ndarray]] = {k: [] for k in writer.video_keys}
        self._closed = False
        self.schema = pa.schema([pa.field(k, arrow_type(writer.features[k])) for k in writer.frame_keys])
        try:
            self.dir.mkdir(parents=True)
            self._manifest("recording")
            self._file = open(self.dir / "frames.arrow", "wb")
            self._ipc = pa.ipc.new_stream(self._file, self.schema)
            self.video = {k: VideoEncoder(self.dir / f"{k}.mp4", writer.fps, writer.video_cfg)
                          for k in writer.video_keys}
        except OSError as e:
            raise _io("stage an episode in", self.dir, e) from None

    def _manifest(self, state: str, **extra) -> None:
        write_durable(self.dir / "manifest.json", _json_bytes(
            {"episode_index": self.index, "task": self.task, "state": state, "frames": self.frames,
             "fps": self.writer.fps, "time": time.time(), **extra}))

    def add_frame(self, frame: dict) -> None:
        """Append one frame: every feature of the dataset (video as (H, W, 3) uint8 RGB), no defaults.

        ``timestamp`` is ``frame_index / fps`` (the video's own frame time), as LeRobot requires.
        """
        import pyarrow as pa

        if self._closed:
            raise RuntimeError("episode already finished")
        w = self.writer
        missing = [k for k in w.user_keys if k not in frame]
        if missing:
            raise ValueError(f"frame lacks features {missing}")
        cols = {}
        for k in w.frame_keys:
            if k == "timestamp":
                cols[k] = [np.float32(self.frames / w.fps)]
            elif k == "frame_index":
                cols[k] = [self.frames]
            else:
                ft = w.features[k]
                v = np.asarray(frame[k], dtype=np.dtype(ft["dtype"]))
                if v.size != int(np.prod(ft["shape"])):
                    raise ValueError(f"feature '{k}' needs shape {ft['shape']}, got {v.shape}")
                if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                    raise ValueError(f"feature '{k}' has NaN/inf")
                cols[k] = [v.item() if ft["shape"] == [1] else v.reshape(-1).tolist()]
        for k in w.video_keys:
            img = np.asarray(frame[k])
            if list(img.shape) != w.features[k]["shape"]:
                raise ValueError(f"'{k}' needs shape {w.features[k]['shape']}, got {list(img.shape)}")
        try:
            for k in w.video_keys:
                self.video[k].put(np.asarray(frame[k]))
                if self.frames % 10 == 0:  # stats on a subsample, downsampled (LeRobot samples too)
                    self._samples[k].append(np.asarray(frame[k])[::8, ::8].copy())
            self._ipc.write_batch(pa.record_batch(cols, schema=self.schema))
            self.frames += 1
            if time.monotonic() - self._last_sync >= self.sync_period:
                self.sync()
        except OSError as e:
            raise _io("write", self.dir / "frames.arrow", e) from None
        except RuntimeError as e:  # the video encoder's error, naming its file
            raise DatasetIOError(str(e)) from None

    def sync(self) -> None:
        """Make the frames so far durable (the stream's bytes; video is synced at finish)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def finish(self) -> None:
        """Close the stream and the videos (fsync); mark the stage ``stopped`` (then commit it)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._ipc.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            for v in self.video.values():
                v.close()
            stats = {k: _stats_to_json({"s": image_stats(s)})["s"] for k, s in self._samples.items() if s}
            self._manifest("stopped", video_stats=stats)
        except OSError as e:
            raise _io("finish the episode in", self.dir, e) from None
        except RuntimeError as e:
            raise DatasetIOError(str(e)) from None

    def discard(self) -> None:
        """Drop the episode (nothing of it reaches the dataset)."""
        self._closed = True
        for v in getattr(self, "video", {}).values():
            v.abort()
        for f in ("_ipc", "_file"):
            try:
                getattr(self, f).close()
            except Exception:  # noqa: BLE001 - best effort, the directory goes anyway
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- writer
class LeRobotWriter:
    """A LeRobot v3.0 dataset on disk that grows by one durable episode at a time.

    Args:
        root: dataset directory (created; with ``resume`` an existing dataset is appended to).
        fps: frame rate [Hz] (integer, as LeRobot's ``info.json``).
        features: ``{name: {"dtype", "shape", "names"}}`` without the default index features;
            dtype ``video`` for cameras (shape [H, W, 3]).
        robot_type: stored in info.json.
        resume: append to an existing dataset (its features and fps must match).
        extra_info: more keys for info.json (LeRobot ignores unknown keys), e.g. ``{"magma_ros": {...}}``;
            on resume they must equal what the dataset has.
    """

    def __init__(self, root: str | Path, fps: int, features: dict, robot_type: str = "", resume: bool = False,
                 video: VideoConfig | None = None, data_files_size_in_mb: int = 100,
                 video_files_size_in_mb: int = 200, chunks_size: int = 1000, extra_info: dict | None = None):
        if int(fps) != fps or fps <= 0:
            raise ConfigError(f"LeRobot datasets need an integer fps > 0, got {fps}")
        self.root = Path(root).expanduser().resolve()
        self.fps = int(fps)
        self.video_cfg = video or VideoConfig()
        self.features = validate_features(features)
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.user_keys = [k for k in features]
        self.frame_keys = [k for k, f in self.features.items() if f["dtype"] != "video"
                           and k not in ("episode_index", "index", "task_index")]
        info_path = self.root / "meta" / "info.json"
        self.recovered: list[StagedEpisode] = []
        if info_path.exists():
            if not resume:
                raise ConfigError(f"a dataset already exists at {self.root}: resume to append to it, or choose "
                                  "another directory")
            self._load(info_path)
            for k, v in (extra_info or {}).items():
                if k in self.info and self.info[k] != v:
                    raise ConfigError(f"{self.root}: info.json '{k}' is {self.info[k]}, this session has {v}")
            self.recovered = self.recover()
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / ".write_probe"
                write_durable(probe, b"ok")
                probe.unlink()
            except OSError as e:
                raise _io("create the dataset at", self.root, e) from None
            self.info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type or None, "total_episodes": 0,
                         "total_frames": 0, "total_tasks": 0, "chunks_size": int(chunks_size),
                         "data_files_size_in_mb": int(data_files_size_in_mb),
                         "video_files_size_in_mb": int(video_files_size_in_mb), "fps": self.fps, "splits": {},
                         "data_path": DATA_PATH, "video_path": VIDEO_PATH if self.video_keys else None,
                         "features": self.features, **(extra_info or {})}
            self.tasks: list[str] = []
            self.stats: dict = {}
            self.last: dict | None = None  # last episode row (file indices, to_timestamp, dataset_to_index)
            self.episode_rows: list[dict] = []  # rows of the current episodes file
            write_durable(info_path, _json_bytes(self.info))

    # ---------------------------------------------------------------------------------- loading
    def _load(self, info_path: Path) -> None:
        import pyarrow.parquet as pq

        info = json.loads(info_path.read_text())
        if info.get("codebase_version") != CODEBASE_VERSION:
            raise ConfigError(f"{self.root}: codebase_version {info.get('codebase_version')}, can only append to "
                              f"{CODEBASE_VERSION}")
        if info["fps"] != self.fps:
            raise ConfigError(f"{self.root}: recorded at {info['fps']} fps, this session uses {self.fps} fps")
        old = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in info["features"].items()}
        new = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in self.features.items()}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"{self.root}: features differ from this session's ({', '.join(diff)})")
        self.info = info
        self.features = info["features"]
        tp = self.root / "meta" / "tasks.parquet"
        self.tasks = []
        if tp.exists():
            t = pq.read_table(tp).to_pydict()
            # the task strings are the pandas index: "__index_level_0__", or a named index ("task")
            name = next((k for k in t if k != "task_index"), None)
            if name is None:
                raise ConfigError(f"{tp}: no task column")
            order = sorted(range(len(t["task_index"])), key=lambda i: t["task_index"][i])
            self.tasks = [t[name][i] for i in order]
        sp = self.root / "meta" / "stats.json"
        self.stats = _stats_from_json(json.loads(sp.read_text())) if sp.exists() else {}
        files = sorted((self.root / "meta" / "episodes").glob("*/*.parquet"))
        self.last, self.episode_rows = None, []
        if files:
            rows = pq.read_table(files[-1]).to_pylist()
            self.episode_rows = rows
            self.last = rows[-1] if rows else None

    @property
    def total_episodes(self) -> int:
        return int(self.info["total_episodes"])

    @property
    def total_frames(self) -> int:
        return int(self.info["total_frames"])

    # ---------------------------------------------------------------------------------- episodes
    def begin_episode(self, task: str, sync_period: float = 1.0) -> EpisodeStage:
        """Start staging the next episode (index ``total_episodes``)."""
        return EpisodeStage(self, task, sync_period)

    def _file_for(self, key: str, add_mb: float, limit_mb: float, path_of) -> tuple[int, int, bool]:
        """(chunk, file, append) for the next episode's data in the series ``key``."""
        if self.last is None:
            return 0, 0, False
        c, f = int(self.last[f"{key}/chunk_index"]), int(self.last[f"{key}/file_index"])
        p = path_of(c, f)
        if p.exists() and p.stat().st_size / 2**20 + add_mb < limit_mb:
            return c, f, True
        f += 1
        if f >= self.info["chunks_size"]:
            c, f = c + 1, 0
        return c, f, False

    def commit(self, stage: EpisodeStage | Path) -> dict:
        """Move a finished (``stopped``) stage into the dataset; returns the episode's row."""
        sdir = stage.dir if isinstance(stage, EpisodeStage) else Path(stage)
        try:
            return self._commit(sdir)
        except OSError as e:
            raise _io("commit the episode into", self.root, e) from None

    def _commit(self, sdir: Path) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        man = json.loads((sdir / "manifest.json").read_text())
        if man["state"] != "stopped":
            raise RuntimeError(f"{sdir}: episode not finished (state {man['state']})")
        ep = self.total_episodes
        with pa.OSFile(str(sdir / "frames.arrow")) as f:
            table = pa.ipc.open_stream(f).read_all()
        n = table.num_rows
        if n == 0:
            raise ValueError("an episode needs at least one frame")
        if n != man["frames"]:
            raise RuntimeError(f"{sdir}: {n} frames staged, manifest says {man['frames']}")
        task = man["task"]
        tasks = list(self.tasks)
        if task not in tasks:
            tasks.append(task)
        tidx = tasks.index(task)
        start = self.total_frames
        table = table.append_column("episode_index", pa.array(np.full(n, ep, np.int64)))
        table = table.append_column("index", pa.array(np.arange(start, start + n, dtype=np.int64)))
        table = table.append_column("task_index", pa.array(np.full(n, tidx, np.int64)))
        order = [k for k in self.features if self.features[k]["dtype"] != "video"]
        table = table.select(order)

        cdir = self.root / STAGING / f"commit-{ep:06d}"
        shutil.rmtree(cdir, ignore_errors=True)
        cdir.mkdir(parents=True)
        moves: list[str] = []  # dataset-relative paths built in cdir, renamed in this order

        def out(rel: str) -> Path:
            moves.append(rel)
            p = cdir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            return p

        row: dict = {"episode_index": ep, "tasks": [task], "length": n}
        # data
        dpath = lambda c, f: self.root / DATA_PATH.format(chunk_index=c, file_index=f)  # noqa: E731
        c, f, append = self._file_for("data", table.nbytes / 2**20, self.info["data_files_size_in_mb"], dpath)
        new = pa.concat_tables([pq.read_table(dpath(c, f)).cast(table.schema), table]) if append else table
        _write_parquet(new, out(DATA_PATH.format(chunk_index=c, file_index=f)))
        row.update({"data/chunk_index": c, "data/file_index": f, "dataset_from_index": start,
                    "dataset_to_index": start + n})
        # videos
        for k in self.video_keys:
            src = sdir / f"{k}.mp4"
            vpath = lambda c, f, k=k: self.root / VIDEO_PATH.format(video_key=k, chunk_index=c, file_index=f)  # noqa: E731
            c, f, append = self._file_for(f"videos/{k}", src.stat().st_size / 2**20,
                                          self.info["video_files_size_in_mb"], vpath)
            dst = out(VIDEO_PATH.format(video_key=k, chunk_index=c, file_index=f))
            if append:
                t0 = video_duration(vpath(c, f))
                concatenate([vpath(c, f), src], dst)
            else:
                t0 = 0.0
                shutil.copyfile(src, dst)
                fsync_path(dst)
            row.update({f"videos/{k}/chunk_index": c, f"videos/{k}/file_index": f,
                        f"videos/{k}/from_timestamp": t0, f"videos/{k}/to_timestamp": t0 + n / self.fps})
            if not self.info["features"][k].get("info"):
                self.info["features"][k]["info"] = video_info(src)
        # per-episode stats
        ep_stats = {}
        for k in order:
            col = table.column(k).combine_chunks()
            ft = self.features[k]
            arr = np.asarray(col.to_pylist() if ft["shape"] != [1] else col.to_numpy(zero_copy_only=False))
            ep_stats[k] = feature_stats(arr.astype(np.float64))
        for k, s in (man.get("video_stats") or {}).items():
            ep_stats[k] = {kk: np.asarray(v) for kk, v in s.items()}
        for k, s in ep_stats.items():
            for sk, v in s.items():
                row[f"stats/{k}/{sk}"] = np.asarray(v).tolist()
        # episodes file
        epath = lambda c, f: self.root / EPISODES_PATH.format(chunk_index=c, file_index=f)  # noqa: E731
        c, f, append = self._file_for("meta/episodes", 0.01, self.info["data_files_size_in_mb"], epath)
        row.update({"meta/episodes/chunk_index": c, "meta/episodes/file_index": f})
        rows = (self.episode_rows if append else []) + [row]
        _write_parquet(pa.Table.from_pylist(rows), out(EPISODES_PATH.format(chunk_index=c, file_index=f)))
        # tasks, stats, info
        _write_parquet(tasks_table(tasks), out("meta/tasks.parquet"))
        stats = aggregate_stats([self.stats, ep_stats]) if self.stats else ep_stats
        p = out("meta/stats.json")
        p.write_bytes(_json_bytes(_stats_to_json(stats)))
        fsync_path(p)
        info = dict(self.info)
        info.update({"total_episodes": ep + 1, "total_frames": start + n, "total_tasks": len(tasks),
                     "splits": {"train": f"0:{ep + 1}"}})
        p = out("meta/info.json")
        p.write_bytes(_json_bytes(info))
        fsync_path(p)
        write_durable(cdir / "COMMIT.json", _json_bytes({"moves": moves, "stage": str(sdir.name)}))
        self._apply(cdir)
        self.info, self.tasks, self.stats, self.last, self.episode_rows = info, tasks, stats, row, rows
        return row

    def _apply(self, cdir: Path) -> None:
        """Rename a commit's files into the dataset (idempotent: a replay skips what already moved)."""
        c = json.loads((cdir / "COMMIT.json").read_text())
        for rel in c["moves"]:
            src, dst = cdir / rel, self.root / rel
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                fsync_path(dst.parent)
        shutil.rmtree(self.root / STAGING / c["stage"], ignore_errors=True)
        shutil.rmtree(cdir, ignore_errors=True)

    # ---------------------------------------------------------------------------------- recovery
    def recover(self) -> list[StagedEpisode]:
        """Finish what a crash interrupted (see the module docstring); returns what was found."""
        found: list[StagedEpisode] = []
        st = self.root / STAGING
        if not st.is_dir():
            return found
        for cdir in sorted(st.glob("commit-*")):
            if (cdir / "COMMIT.json").exists():
                self._apply(cdir)
                found.append(StagedEpisode(cdir, int(cdir.name.split("-")[1]), -1, "committing"))
            else:
                shutil.rmtree(cdir, ignore_errors=True)
        if found:
            self._load(self.root / "meta" / "info.json")
        for sdir in sorted(st.glob("episode-*")):
            try:
                man = json.loads((sdir / "manifest.json").read_text())
            except (OSError, ValueError):
                man = {"state": "recording", "episode_index": -1, "frames": 0}
            if man.get("state") == "stopped":
                try:
                    self.commit(sdir)
                    found.append(StagedEpisode(sdir, self.total_episodes - 1, int(man["frames"]), "stopped"))
                    continue
                except (OSError, ValueError, RuntimeError, KeyError):
                    man["state"] = "recording"
            frames = staged_frames(sdir / "frames.arrow")
            dest = st / "incomplete" / sdir.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(sdir, dest)
            found.append(StagedEpisode(dest, int(man.get("episode_index", -1)), frames, "recording"))
        return found

    def incomplete(self) -> list[Path]:
        """Stages of episodes that were being recorded when a session died (kept for inspection)."""
        return sorted((self.root / STAGING / "incomplete").glob("episode-*"))


def staged_frames(path: Path) -> int:
    """Frames readable from a (possibly truncated) staged Arrow stream."""
    import pyarrow as pa

    n = 0
    try:
        with pa.OSFile(str(path)) as f:
            r = pa.ipc.open_stream(f)
            while True:
                try:
                    n += r.read_next_batch().num_rows
                except StopIteration:
                    break
    except (OSError, pa.ArrowInvalid):
        pass
    return n


def tasks_table(tasks: list[str]):
    """meta/tasks.parquet as pandas writes ``DataFrame({"task_index": ...}, index=tasks)`` (LeRobot reads it
    with ``pd.read_parquet``: the task strings come back as the index)."""
    import pyarrow as pa

    pandas_meta = {"index_columns": ["__index_level_0__"],
                   "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                       "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
                   "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                                "numpy_type": "int64", "metadata": None},
                               {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                                "numpy_type": "object", "metadata": None}],
                   "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    schema = pa.schema([("task_index", pa.int64()), ("__index_level_0__", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    return pa.table({"task_index": list(range(len(tasks))), "__index_level_0__": list(tasks)}, schema=schema)


@dataclass
class DatasetSummary:
    """What a dataset holds (read with pyarrow only; used by the CLI and tests)."""

    root: Path
    fps: int
    episodes: list[dict] = field(default_factory=list)  # episode rows without stats
    total_frames: int = 0


def read_frames(root: str | Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """All frames of a dataset's data files, column -> array (N, ...), ordered by ``index``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    files = sorted((root / "data").glob("*/*.parquet"))
    if not files:
        raise ConfigError(f"{root}: no data/*/*.parquet files (not a LeRobot v3.0 dataset?)")
    t = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    out = {}
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        out[name] = (np.asarray(col.to_pylist()) if pa.types.is_fixed_size_list(col.type)
                     else col.to_numpy(zero_copy_only=False))
    if "index" in out:
        order = np.argsort(out["index"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
    return out


def read_info(root: str | Path) -> dict:
    """meta/info.json of a dataset (ConfigError when it is not one)."""
    p = Path(root) / "meta" / "info.json"
    if not p.is_file():
        raise ConfigError(f"{root}: no meta/info.json (not a LeRobot dataset)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"{p}: malformed JSON ({e})") from None
