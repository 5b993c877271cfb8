"""A recording session without ROS: the episode state machine behind the recorder node.

:class:`RecorderCore` owns the LeRobot writer and the episode's MCAP bag: ``start`` / ``stop`` /
``discard`` return ``(ok, message)``, ``add`` takes one sampled frame, ``record_message`` one ROS message
for the bag. A write error (disk full, unwritable path) ends the episode with ``error`` set to one line
naming the path; episodes already saved are untouched.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from magma_ros.core.errors import ConfigError, choose

CONTROLLERS = ("jtc", "forward", "isaac")


@dataclass(frozen=True)
class RecorderConfig:
    """Recorder parameters (same names as the ROS parameters)."""

    robot: str = "fr3"  # fr3 | panda | wx250s: joints, gripper mapping, controller topics, kinematics
    controller: str = "jtc"  # jtc | forward | isaac: which controller topic carries the safety output
    out: str = "recordings"  # session directory: <out>/lerobot (dataset) and <out>/mcap (bags)
    dataset: str = ""  # dataset directory ("" = <out>/lerobot)
    mcap: bool = True  # also write one MCAP bag per episode to <out>/mcap
    resume: bool = False  # append to an existing dataset (else an existing one is an error)
    repo_id: str = "local/magma_ros"  # only for the log / LeRobot's repo_id argument
    fps: int = 10  # [Hz] dataset frame rate (integer, LeRobot's info.json)
    step_period: float = 0.2  # [s] Magma action = TCP delta over this period (a whole number of frames)
    camera: str = "color"  # feature name: observation.images.<camera>
    image_topic: str = "camera/camera/color/image_raw"  # colour image (rgb8/bgr8/...)
    depth_topic: str = ""  # "" = no depth; else recorded into the MCAP bag (e.g. .../aligned_depth_to_color/...)
    width: int = 640  # [px] expected image width (the video's size)
    height: int = 480  # [px] expected image height
    instruction: str = ""  # task text until magma/instruction says otherwise
    state_timeout: float = 1.0  # [s] an image is not recorded while the newest joint state is older than this
    codec: str = "libx264"  # video encoder (PyAV name)
    crf: int = 23  # video quality (lower = better)
    status_period: float = 0.5  # [s] console status line / diagnostics period

    def __post_init__(self):
        choose(self.controller, CONTROLLERS, "controller")
        if self.fps <= 0 or self.step_period <= 0:
            raise ConfigError("recorder: fps and step_period must be > 0")


class RecorderCore:
    """The recording state machine without ROS (the node feeds it; tests may drive it directly).

    ``start(task)`` / ``stop()`` / ``discard()`` return ``(ok, message)``; ``add(sample)`` adds one frame.
    Write errors set ``error`` (one line naming the path) and end the episode; finished episodes stay.
    """

    def __init__(self, cfg: RecorderConfig, arm_joints: list[str], robot_type: str):
        from magma_ros.data.episode import recording_features, step_frames
        from magma_ros.data.lerobot import LeRobotWriter
        from magma_ros.data.video import VideoConfig

        self.cfg = cfg
        self.k = step_frames(cfg.step_period, cfg.fps)
        self.out = Path(cfg.out).expanduser()
        self.root = Path(cfg.dataset).expanduser() if cfg.dataset else self.out / "lerobot"
        self.mcap_dir = self.out / "mcap"
        self.features = recording_features(cfg.camera, cfg.height, cfg.width, arm_joints)
        self._writer_args = dict(fps=cfg.fps, features=self.features, robot_type=robot_type, resume=cfg.resume,
                                 video=VideoConfig(codec=cfg.codec, crf=cfg.crf),
                                 extra_info={"magma_ros": {"step_period": cfg.step_period,
                                                           "action": "magma: dx dy dz droll dpitch dyaw (sxyz) "
                                                                     "gripper, base frame, per step_period"}})
        self._LeRobotWriter = LeRobotWriter
        self.writer = None
        self.stage = None
        self.bag = None
        self.lookahead = None
        self.lock = threading.RLock()
        self.error = ""
        self.task = cfg.instruction
        self.t_start = 0.0
        self.frames = 0
        self.skipped = 0  # images not recorded (no fresh joint state)
        self.gaps = 0  # frames more than 1.5/fps after the previous one (camera slower than fps, or lost images)
        self.last_saved = ""
        self.recovered: list = []
        self.timing: dict[str, float] = {}  # [s] phases of the last stop: frames, finish, commit, bag

    # ----------------------------------------------------------------------------------- control
    @property
    def recording(self) -> bool:
        return self.stage is not None

    @property
    def episode(self) -> int:
        """Index of the episode being (or next to be) recorded."""
        if self.stage is not None:
            return self.stage.index
        return self.writer.total_episodes if self.writer is not None else 0

    def open(self) -> None:
        """Open (or create) the dataset; recovers what a crash left (reported in ``recovered``)."""
        from magma_ros.data.lerobot import DatasetIOError

        if self.writer is None:
            try:
                self.writer = self._LeRobotWriter(self.root, **self._writer_args)
            except OSError as e:
                raise DatasetIOError(f"cannot open the dataset at {self.root}: {e.strerror or e}") from None
            self.recovered = self.writer.recovered

    def start(self, task: str | None = None, now: float = 0.0) -> tuple[bool, str]:
        """Begin an episode (``task`` defaults to the current instruction)."""
        from magma_ros.data.bag import BagWriter
        from magma_ros.data.episode import ActionLookahead
        from magma_ros.data.lerobot import DatasetIOError

        with self.lock:
            if self.stage is not None:
                return False, f"already recording episode {self.stage.index}"
            task = self.task if task is None else task
            if not task:
                return False, "no task: publish magma/instruction or set the instruction parameter first"
            try:
                self.open()
                self.stage = self.writer.begin_episode(task)
                if self.cfg.mcap:
                    self.bag = BagWriter(self.mcap_dir / f"episode_{self.stage.index:06d}.mcap")
            except (DatasetIOError, OSError, ConfigError) as e:
                self._fail(e)
                return False, self.error
            self.lookahead = ActionLookahead(self.k)
            self.error = ""
            self.frames = self.skipped = self.gaps = 0
            self.t_start = now
            return True, f"recording episode {self.stage.index}: '{task}'"

    def add(self, sample) -> None:
        """One sampled frame (a :class:`magma_ros.data.episode.Sample`)."""
        with self.lock:
            if self.stage is None:
                return
            try:
                for frame in self.lookahead.push(sample):
                    self.stage.add_frame(frame)
                self.frames += 1
            except (OSError, RuntimeError, ValueError) as e:
                self._fail(e)

    def record_message(self, topic: str, msg, t_ns: int) -> None:
        """Write one message to the episode's bag (while recording)."""
        bag = self.bag
        if bag is None:
            return
        try:
            bag.write(topic, msg, t_ns)
        except (OSError, RuntimeError) as e:
            with self.lock:
                if self.bag is bag:
                    self._fail(e)

    def stop(self) -> tuple[bool, str]:
        """Finish the episode and make it durable (dataset + bag). Returns when it is on disk."""
        with self.lock:
            if self.stage is None:
                return False, "not recording"
            t0 = time.monotonic()
            stage, bag = self.stage, self.bag
            try:
                for frame in self.lookahead.flush():
                    stage.add_frame(frame)
                if stage.frames == 0:
                    stage.discard()
                    if bag is not None:
                        bag.discard()
                    self.stage = self.bag = None
                    return False, "no frames recorded (no images or joint states?): nothing saved"
                t1 = time.monotonic()
                stage.finish()  # flushes the encoder: waits only for frames it has not encoded yet
                t2 = time.monotonic()
                row = self.writer.commit(stage)
                t3 = time.monotonic()
                bag_path = bag.close() if bag is not None else None
                self.timing = {"frames": t1 - t0, "finish": t2 - t1, "commit": t3 - t2,
                               "bag": time.monotonic() - t3}
            except (OSError, RuntimeError, ValueError) as e:
                self._fail(e)
                return False, self.error
            self.stage = self.bag = None
            dt = time.monotonic() - t0
            self.last_saved = (f"episode {row['episode_index']} saved: {row['length']} frames in {dt:.2f} s"
                               + (f" ({self.skipped} images skipped: no fresh joint state)" if self.skipped else "")
                               + (f" ({self.gaps} gaps over 1.5/fps: camera slower than fps or images lost)"
                                  if self.gaps else "") + (f"; bag {bag_path}" if bag_path else ""))
            return True, self.last_saved

    def discard(self) -> tuple[bool, str]:
        """Drop the episode being recorded."""
        with self.lock:
            if self.stage is None:
                return False, "not recording"
            idx = self.stage.index
            self._drop()
            return True, f"episode {idx} discarded"

    def _drop(self) -> None:
        if self.stage is not None:
            self.stage.discard()
        if self.bag is not None:
            self.bag.discard()
        self.stage = self.bag = self.lookahead = None

    def _fail(self, e: BaseException) -> None:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        self.error = f"recording stopped: {msg}"
        stage = self.stage
        self.stage = None
        if stage is not None:
            try:
                stage.discard()
            except Exception:  # noqa: BLE001 - already failing; the message above is what counts
                pass
        if self.bag is not None:
            try:
                self.bag.discard()
            except Exception:  # noqa: BLE001
                pass
        self.bag = self.lookahead = None

    def close(self) -> None:
        """Node shutdown: an episode still open is finished and saved (a clean exit loses nothing)."""
        if self.stage is not None:
            self.stop()

    def state_text(self, now: float) -> str:
        """One line: what the recorder does."""
        if self.recording:
            return (f"recording episode {self.stage.index}: {self.frames} frames, {now - self.t_start:.1f} s"
                    f"{f', {self.skipped} skipped' if self.skipped else ''}"
                    f"{f', {self.gaps} gaps' if self.gaps else ''}")
        if self.error:
            return f"error: {self.error}"
        return f"idle: next episode {self.episode}" + (f" ({self.last_saved})" if self.last_saved else "")
