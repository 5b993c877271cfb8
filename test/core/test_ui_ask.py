"""Questions about the scene (core): uniform clip sampling, the frame ring, the answer queue, video files."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from magma_ros.core.ask import AskWorker, FrameRing, parse_question, read_video_frames, uniform_indices
from magma_ros.core.errors import ConfigError


def test_uniform_sampling_as_magmas_video_evaluation():
    assert uniform_indices(32, 8).tolist() == np.linspace(0, 31, 8, dtype=int).tolist() == [0, 4, 8, 13, 17, 22,
                                                                                            26, 31]
    assert uniform_indices(3, 8).tolist() == [0, 1, 2]
    assert uniform_indices(0, 4).tolist() == []


def test_frames_prefix():
    assert parse_question("[frames=4] what moved?", 1, 8) == ("what moved?", 4)
    assert parse_question("what moved?", 2, 8) == ("what moved?", 2)
    assert parse_question("[frames=99] q", 1, 8) == ("q", 8)


def test_ring_keeps_spaced_frames_and_the_newest():
    ring = FrameRing(capacity=4, spacing=1.0)
    for k in range(20):
        ring.offer(np.full((2, 2, 3), k, np.uint8), 0.5 * k)  # 2 Hz, ring keeps 1 Hz
    clip = ring.clip(3)
    stamps = [s for _, s in clip]
    assert stamps == [6.0, 8.0, 9.5]  # kept 6, 7, 8, 9 (+ newest 9.5): uniformly 3 of 5
    assert ring.clip(1)[0][1] == 9.5


def _worker(answer, **kw):
    ring = FrameRing(capacity=8, spacing=0.0)
    for k in range(5):
        ring.offer(np.full((4, 4, 3), k, np.uint8), float(k))
    out = []
    w = AskWorker(answer, ring, out.append, now=lambda: 10.0, **kw)
    return w, out


def test_questions_are_answered_in_order_with_their_frame_stamps():
    seen = []
    w, out = _worker(lambda imgs, q: seen.append((len(imgs), q)) or f"A:{q}", default_frames=1)
    w.ask("first?")
    w.ask("[frames=3] second?")
    assert w.step(0.01) and w.step(0.01)
    assert [a.answer for a in out] == ["A:first?", "A:second?"]
    assert out[0].stamps == [4.0] and out[1].stamps == [0.0, 2.0, 4.0]
    assert seen == [(1, "first?"), (3, "second?")]


def test_queue_full_empty_question_and_model_errors_are_answered_with_a_reason():
    def boom(imgs, q):
        raise RuntimeError("cuda out of memory")

    w, out = _worker(boom, queue=1)
    w.ask("a?")
    w.ask("b?")  # queue full: refused at once
    w.ask("   ")
    assert [a.error for a in out] == ["queue full (1 questions waiting)", "empty question"]
    assert w.step(0.01)
    assert out[-1].error == "RuntimeError: cuda out of memory" and out[-1].answer == ""


def test_shared_model_questions_wait_for_the_action_loop():
    """With the action model shared, a question starts only while no action runs and its cost fits the slack."""
    busy = threading.Event()
    slack = {"s": 0.0}
    w, out = _worker(lambda imgs, q: "ok", action_busy=busy, slack=lambda: slack["s"])
    w.ask("q?")
    busy.set()
    assert not w.step(0.01) and w.pending == 1
    busy.clear()
    slack["s"] = 0.0  # the next action is due now
    assert not w.step(0.01) and w.pending == 1
    slack["s"] = 0.5  # less than the first answer's assumed cost (first_estimate 1 s): still waits
    assert not w.step(0.01) and w.pending == 1
    slack["s"] = 1.5
    assert w.step(0.01) and out[0].answer == "ok"
    w.last_latency = 0.2  # measured: later questions fit in a 0.5 s gap
    w.ask("again?")
    slack["s"] = 0.5
    assert w.step(0.01) and out[1].answer == "ok"


def test_video_frames_sampled_uniformly_with_pyav(tmp_path):
    import av

    p = tmp_path / "clip.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for k in range(10):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, :, 0] = 25 * k  # red grows with the frame index
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    frames, idx, times = read_video_frames(p, 4)
    assert idx == [0, 3, 6, 9] and len(frames) == 4
    assert [int(round(f[:, :, 0].mean() / 25)) for f in frames] == [0, 3, 6, 9]
    assert np.allclose(times, [0.0, 0.3, 0.6, 0.9], atol=1e-6)
    with pytest.raises(ConfigError, match="not found"):
        read_video_frames(tmp_path / "none.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ConfigError, match="cannot read video"):
        read_video_frames(bad)
