"""MP4 video for LeRobot datasets: an incremental encoder thread and a stream-copy concatenation (PyAV).

* :class:`VideoEncoder` encodes RGB frames into one episode's MP4 *while the episode is recorded*: frames
  go through a bounded queue to a worker thread (PyAV's encoder releases the GIL), so the recorder's
  callbacks never wait for the codec, and finishing an episode only flushes the last frames.
* Frame ``i`` gets ``pts = i`` in a ``1/fps`` time base, so its time in the file is exactly ``i / fps``:
  LeRobot's reader looks frames up by ``from_timestamp + timestamp`` within ``tolerance_s`` (1e-4 s).
* :func:`concatenate` appends episode files to a dataset file by stream copy (ffmpeg's concat demuxer,
  as LeRobot's own ``concatenate_video_files``): no re-encoding, cost proportional to the bytes copied.

Codec defaults: H.264 (libx264), GOP 2 (a key frame every 2 frames: LeRobot's ``g=2``, cheap random
access for training), no B-frames, ``yuv420p`` (what every player and Foxglove decode).
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoConfig:
    """Encoder settings (the same for every episode of a dataset, so files can be concatenated)."""

    codec: str = "libx264"  # PyAV encoder name (libx264 | libsvtav1 | mpeg4 ...)
    crf: int = 23  # constant rate factor: lower = better quality, bigger files
    gop: int = 2  # key frame interval [frames] (LeRobot: 2)
    preset: str = "veryfast"  # libx264 speed/size trade-off (ultrafast ... veryslow); "" = codec default
    pix_fmt: str = "yuv420p"  # stored pixel format
    threads: int = 1  # encoder threads per camera (the machine has other work to do)
    queue_size: int = 64  # frames buffered between the recorder and the encoder thread

    def options(self) -> dict:
        """The codec options PyAV passes to FFmpeg."""
        o = {"g": str(self.gop), "threads": str(self.threads)}
        if self.codec in ("libx264", "libx265", "h264", "hevc", "libsvtav1"):
            o["crf"] = str(self.crf)
        if self.codec in ("libx264", "libx265", "h264", "hevc"):
            o["bf"] = "0"
            if self.preset:
                o["preset"] = self.preset
        return o


class VideoEncoder:
    """Encode RGB frames (H, W, 3) uint8 into ``path`` on a worker thread.

    :meth:`put` never blocks longer than ``put_timeout``; a full queue (encoder behind) raises
    ``RuntimeError`` so the caller can stop the episode instead of stalling. Errors of the worker
    (disk full, codec failure) are raised by the next :meth:`put` or by :meth:`close`.
    """

    def __init__(self, path: Path, fps: int, cfg: VideoConfig | None = None, put_timeout: float = 2.0):
        import av

        cfg = cfg or VideoConfig()
        if fps <= 0:
            raise ConfigError(f"video fps must be > 0, got {fps}")
        if cfg.codec not in av.codecs_available:
            raise ConfigError(f"video codec '{cfg.codec}' is not in this PyAV build")
        self.path = Path(path)
        self.fps = int(fps)
        self.cfg = cfg = cfg or VideoConfig()
        self.put_timeout = put_timeout
        self.frames = 0  # frames accepted
        self.encoded = 0  # frames encoded by the worker
        self.shape: tuple[int, int] | None = None
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"video:{self.path.name}", daemon=True)
        self._thread.start()

    def put(self, rgb: np.ndarray) -> None:
        """Queue one frame; all frames of a file must have the same size."""
        self._raise()
        a = np.asarray(rgb)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"video frames must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
        if self.shape is None:
            self.shape = (a.shape[0], a.shape[1])
        elif a.shape[:2] != self.shape:
            raise ValueError(f"frame size changed from {self.shape} to {a.shape[:2]} within an episode")
        try:
            self._q.put(a, timeout=self.put_timeout)
        except queue.Full:
            raise RuntimeError(f"video encoder for {self.path} fell {self._q.qsize()} frames behind") from None
        self.frames += 1

    def close(self) -> None:
        """Flush and close the file (waits for the worker); raises the worker's error if any."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the worker without caring about the file (discarded episode)."""
        if self._thread.is_alive():
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._q.put(None)
            self._thread.join(timeout=10.0)

    def _raise(self) -> None:
        if self._error is not None:
            e = self._error
            why = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise RuntimeError(f"cannot write video {self.path}: {why}") from e

    def _run(self) -> None:
        import av

        container = stream = None
        try:
            while True:
                a = self._q.get()
                if a is None:
                    break
                if self._error is not None:
                    continue  # drain after an error
                if container is None:
                    container = av.open(str(self.path), "w", format="mp4")
                    stream = container.add_stream(self.cfg.codec, rate=self.fps, options=self.cfg.options())
                    stream.height, stream.width = a.shape[0], a.shape[1]
                    stream.pix_fmt = self.cfg.pix_fmt
                    stream.codec_context.time_base = Fraction(1, self.fps)
                f = av.VideoFrame.from_ndarray(a, format="rgb24")
                f.pts = self.encoded
                f.time_base = Fraction(1, self.fps)
                for p in stream.encode(f):
                    container.mux(p)
                self.encoded += 1
            if container is not None and self._error is None:
                for p in stream.encode():
                    container.mux(p)
        except BaseException as e:  # noqa: BLE001 - handed to the recorder thread
            self._error = e
        finally:
            if container is not None:
                try:
                    container.close()
                except BaseException as e:  # noqa: BLE001
                    self._error = self._error or e
        if self._error is None and self.path.exists():
            try:
                fsync_path(self.path)
            except OSError as e:
                self._error = e


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (new names, renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def video_duration(path: Path) -> float:
    """Duration [s] of the first video stream (as LeRobot's ``get_video_duration_in_s``)."""
    import av

    with av.open(str(path)) as c:
        st = c.streams.video[0]
        if st.duration is not None:
            return float(st.duration * st.time_base)
        return float(c.duration / av.time_base)


def video_info(path: Path) -> dict:
    """The ``info`` block LeRobot stores per video feature in meta/info.json."""
    import av

    with av.open(str(path)) as c:
        st = c.streams.video[0]
        rate = st.base_rate or st.average_rate
        return {"video.height": st.height, "video.width": st.width, "video.codec": st.codec_context.codec.canonical_name
                if hasattr(st.codec_context.codec, "canonical_name") else st.codec_context.name,
                "video.pix_fmt": st.pix_fmt or st.codec_context.pix_fmt, "video.is_depth_map": False,
                "video.fps": int(round(float(rate))) if rate else None, "video.channels": 3, "has_audio": False}


def concatenate(inputs: list[Path], output: Path) -> None:
    """Stream-copy ``inputs`` (same codec and size) into ``output`` (overwritten), fsync'd.

    Uses the concat demuxer so each file's timestamps continue where the previous file ended.
    """
    import av

    if not inputs:
        raise ValueError("nothing to concatenate")
    output = Path(output)
    with tempfile.NamedTemporaryFile("w", suffix=".ffconcat", dir=output.parent, delete=False) as lst:
        lst.write("ffconcat version 1.0\n")
        for p in inputs:
            lst.write(f"file '{Path(p).resolve()}'\n")
        list_path = Path(lst.name)
    try:
        src = av.open(str(list_path), "r", format="concat", options={"safe": "0"})
        dst = av.open(str(output), "w", format="mp4", options={"movflags": "faststart"})
        try:
            vin = src.streams.video[0]
            vout = dst.add_stream_from_template(template=vin, opaque=True)
            vout.time_base = vin.time_base
            for pkt in src.demux(vin):
                if pkt.dts is None:
                    continue
                pkt.stream = vout
                dst.mux(pkt)
        finally:
            src.close()
            dst.close()
        fsync_path(output)
    finally:
        list_path.unlink(missing_ok=True)
