"""Questions about the scene: recent frames, uniform clip sampling, a low-priority answer queue, video files.

ROS-free, torch-free. The policy node wires ``magma/ask`` -> :class:`AskWorker` -> ``magma/answer``.

- :class:`FrameRing` keeps the last ``capacity`` frames (at least ``spacing`` seconds apart, so a
  clip spans time and not just the last few camera frames).
- A clip of N frames is sampled uniformly over the ring, as Magma's video evaluation samples a
  video (``np.linspace(0, total - 1, N, dtype=int)``, MAGMA_FACTS §4); :func:`uniform_indices`.
- Several frames go to Magma as one ``<image>`` each at the start of the user turn (lmms-eval's
  multi-image/video path, §4; ``MagmaPolicy.ask``). How well Magma-8B answers about clips built
  this way is UNVERIFIED; ``frames`` is a parameter (1 = the newest frame only).
- :class:`AskWorker` answers questions one at a time, oldest first, in its own thread at a raised
  nice value. It never delays an action: with its own model instance it shares nothing with the
  action loop; sharing the action model (``action_busy``/``slack`` given) it starts a question only
  while no action inference runs and its previous answer's duration (before the first answer:
  ``first_estimate``) fits before the next action is due.
  The queue is bounded: a question that does not fit is answered at once with a refusal.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError

_FRAMES_PREFIX = re.compile(r"^\s*\[\s*frames\s*=\s*(\d+)\s*\]\s*", re.IGNORECASE)


def uniform_indices(total: int, n: int) -> np.ndarray:
    """``n`` indices spread uniformly over ``total`` items, first and last included (Magma's video sampling)."""
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    n = max(1, min(int(n), total))
    return np.linspace(0, total - 1, n, dtype=int)


def parse_question(text: str, default_frames: int, max_frames: int) -> tuple[str, int]:
    """``"[frames=N] question"`` -> (question, N); plain text -> (text, default_frames). N clipped to 1..max."""
    s = str(text)
    m = _FRAMES_PREFIX.match(s)
    n = int(m.group(1)) if m else int(default_frames)
    if m:
        s = s[m.end():]
    return s.strip(), max(1, min(n, int(max_frames)))


class FrameRing:
    """The last ``capacity`` frames (image, stamp), keeping one per ``spacing`` seconds of image time."""

    def __init__(self, capacity: int = 32, spacing: float = 0.25):
        if capacity < 1:
            raise ConfigError("frame ring capacity must be >= 1")
        self.spacing = float(spacing)
        self._frames: deque = deque(maxlen=int(capacity))
        self._newest = None
        self._lock = threading.Lock()

    def offer(self, image: np.ndarray, stamp: float) -> None:
        """A new frame (the newest is always kept for single-frame questions)."""
        with self._lock:
            self._newest = (image, float(stamp))
            if not self._frames or stamp - self._frames[-1][1] >= self.spacing:
                self._frames.append((image, float(stamp)))

    def clip(self, n: int) -> list[tuple[np.ndarray, float]]:
        """``n`` frames sampled uniformly over the ring, oldest first, ending with the newest frame."""
        with self._lock:
            if self._newest is None:
                return []
            frames = list(self._frames)
            if frames[-1][1] != self._newest[1]:
                frames.append(self._newest)
        if n <= 1:
            return [frames[-1]]
        return [frames[i] for i in uniform_indices(len(frames), n)]

    def __len__(self) -> int:
        return len(self._frames)


@dataclass
class Answer:
    """One answered (or refused) question."""

    question: str
    answer: str  # the model's text, or "" when refused
    stamps: list  # [s] image stamps of the frames used, oldest first
    latency_s: float = 0.0
    error: str = ""  # why there is no answer ('' when answered)
    asked: float = 0.0  # [s] node time the question arrived


class AskWorker:
    """Answers questions in a low-priority thread; ``answer(frames, question) -> str`` does the work."""

    def __init__(self, answer: Callable[[list, str], str], frames: FrameRing, publish: Callable[[Answer], None],
                 now: Callable[[], float], default_frames: int = 1, max_frames: int = 8, queue: int = 4,
                 action_busy: threading.Event | None = None, slack: Callable[[], float] | None = None,
                 nice: int = 19, first_estimate: float = 1.0):
        self.answer_fn = answer
        self.frames = frames
        self.publish = publish
        self.now = now
        self.default_frames = int(default_frames)
        self.max_frames = int(max_frames)
        self.action_busy = action_busy
        self.slack = slack
        self.nice = nice
        self._q: deque = deque()
        self._max_q = int(queue)
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.refused = 0
        self.last_latency = 0.0
        # shared model: the first answer's cost is unknown; assume this much [s] until one was measured,
        # so a question never starts in a gap it cannot fit (it waits, or is refused when the queue fills)
        self.first_estimate = float(first_estimate)

    def ask(self, text: str) -> None:
        """Queue a question (from the subscription callback; never blocks)."""
        q, n = parse_question(text, self.default_frames, self.max_frames)
        now = self.now()
        if not q:
            return self._refuse(Answer(text, "", [], error="empty question", asked=now))
        with self._cv:
            if len(self._q) >= self._max_q:
                full = True
            else:
                full = False
                self._q.append((q, n, now))
                self._cv.notify_all()
        if full:
            self._refuse(Answer(q, "", [], error=f"queue full ({self._max_q} questions waiting)", asked=now))

    def _refuse(self, a: Answer) -> None:
        self.refused += 1
        self.publish(a)

    @property
    def pending(self) -> int:
        return len(self._q)

    def _may_start(self) -> bool:
        if self.action_busy is not None and self.action_busy.is_set():
            return False
        need = self.last_latency if self.answered else self.first_estimate
        return self.slack is None or self.slack() >= max(need, 1e-3)

    def step(self, timeout: float = 0.2) -> bool:
        """Answer the oldest question once; True when an answer (or a refusal) was published."""
        with self._cv:
            if not self._q:
                self._cv.wait(timeout)
            if not self._q or self._stop:
                return False
            if not self._may_start():
                self._cv.wait(0.01)
                return False
            q, n, asked = self._q.popleft()
        clip = self.frames.clip(n)
        if not clip:
            self._refuse(Answer(q, "", [], error="no camera frame yet", asked=asked))
            return True
        stamps = [s for _, s in clip]
        t0 = time.monotonic()
        try:
            text = self.answer_fn([im for im, _ in clip], q)
        except Exception as e:  # noqa: BLE001 - a model error answers this question, never kills the worker
            self._refuse(Answer(q, "", stamps, time.monotonic() - t0, f"{type(e).__name__}: {e}", asked))
            return True
        self.last_latency = time.monotonic() - t0
        self.answered += 1
        self.publish(Answer(q, text, stamps, self.last_latency, "", asked))
        return True

    def _run(self) -> None:
        from magma_ros.core.policy_loop import _lower_thread_priority

        _lower_thread_priority(self.nice)
        while not self._stop:
            try:
                self.step()
            except Exception:  # noqa: BLE001 - keep answering
                time.sleep(0.1)

    def start(self) -> AskWorker:
        self._thread = threading.Thread(target=self._run, name="magma-ask", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


# ----------------------------------------------------------------------------- video files
def read_video_frames(path, n: int = 8) -> tuple[list[np.ndarray], list[int], list[float]]:
    """``n`` frames of a video file sampled uniformly -> (RGB frames, frame indices, times [s]).

    PyAV (``av``) decodes; OpenCV is the fallback when PyAV is missing. ConfigError for a missing,
    unreadable or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"video not found: {p}")
    if n < 1:
        raise ConfigError(f"need at least 1 frame, got {n}")
    try:
        import av  # noqa: F401
    except ImportError:
        return _read_cv2(p, n)
    return _read_av(p, n)


def _read_av(p: Path, n: int):
    import av

    try:
        with av.open(str(p)) as c:
            total = sum(1 for _ in c.decode(video=0))
        if total == 0:
            raise ConfigError(f"video {p}: no frames")
        want = set(uniform_indices(total, n).tolist())
        frames, idx, times = [], [], []
        with av.open(str(p)) as c:
            for i, fr in enumerate(c.decode(video=0)):
                if i in want:
                    frames.append(fr.to_ndarray(format="rgb24"))
                    idx.append(i)
                    times.append(float(fr.time) if fr.time is not None else math.nan)
        return frames, idx, times
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise ConfigError(f"cannot read video {p}: {e}") from None


def _read_cv2(p: Path, n: int):
    import cv2

    cap = cv2.VideoCapture(str(p))
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = cap.get(cv2.CAP_PROP_FPS) or math.nan
        if total <= 0:
            raise ConfigError(f"cannot read video {p} (no frames)")
        frames, idx, times = [], [], []
        for i in uniform_indices(total, n):
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
            ok, bgr = cap.read()
            if ok:
                frames.append(bgr[:, :, ::-1].copy())
                idx.append(int(i))
                times.append(float(i) / fps)
        if not frames:
            raise ConfigError(f"cannot read video {p}")
        return frames, idx, times
    finally:
        cap.release()
