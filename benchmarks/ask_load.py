"""Does a question every second delay the actions? The action loop's step rate with and without questions.

The real pieces, no ROS: ``core.policy_loop.PolicyLoop`` (newest-frame mailbox, step gating) on a
``MagmaPolicy`` and ``core.ask.AskWorker`` (its own low-priority thread) answering one question per
second about a clip of the last frames, the way the policy node wires them. Frames (320x240) are
offered at 30 Hz. Three runs of ``--seconds`` each, per step period:

* ``none``: no questions (the reference);
* ``own``: questions on a second model instance (the node's default, ``ask_shared:=false``);
* ``shared``: questions on the action model, started only while it idles and the answer fits
  before the next action is due (``ask_shared:=true``).

Figures: published actions per second, the gap between consecutive actions (p50 / p99), the
action inference latency (p50 / p99), questions answered and their latency. Two step periods:
0.2 s (Bridge's rate: the loop waits for the step) and a short one where the loop runs flat out,
so any CPU / GIL contention shows.

    python benchmarks/ask_load.py --checkpoint tiny --seconds 30

Writes the ``ask_load`` section of benchmarks/RESULTS.md with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import machine, write_section  # noqa: E402

from magma_ros.core.ask import AskWorker, FrameRing  # noqa: E402
from magma_ros.core.policy_loop import Frame, PolicyLoop  # noqa: E402

SECTION = "ask_load"


def _pct(a, q) -> float:
    return float(np.percentile(a, q)) * 1000 if len(a) else float("nan")


def run(policy, side, mode: str, step_period: float, seconds: float, frames_per_q: int, max_tokens: int) -> dict:
    """One timed run; ``mode`` none | own | shared."""
    published: list[float] = []
    latencies: list[float] = []
    loop = PolicyLoop(policy, step_period, image_timeout=5.0, now=time.monotonic,
                      publish=lambda a: (published.append(time.monotonic()), latencies.append(a.latency_s)),
                      instruction="pick up the red block")
    ring = FrameRing(capacity=32, spacing=0.25)
    answers = []
    asker = None
    if mode != "none":
        pol = side if mode == "own" else policy
        shared = mode == "shared"
        asker = AskWorker(lambda imgs, q: pol.ask(imgs, q, max_new_tokens=max_tokens), ring, answers.append,
                          time.monotonic, default_frames=frames_per_q, queue=2,
                          action_busy=loop.busy if shared else None,
                          slack=(lambda: loop.slack() if loop.stats.inferences else float("inf")) if shared else None)
        asker.start()
    stop = threading.Event()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)

    def feed():
        k = 0
        while not stop.is_set():
            img = base.copy()
            img[0, 0, 0] = k % 256
            t = time.monotonic()
            loop.offer(Frame(img, t, t))
            ring.offer(img, t)
            k += 1
            stop.wait(1 / 30)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    loop.start()
    time.sleep(2.0)  # warm-up (first inference, allocations)
    published.clear()
    latencies.clear()
    answers.clear()
    t0 = time.monotonic()
    asked = 0
    while time.monotonic() - t0 < seconds:
        if asker is not None and time.monotonic() - t0 >= asked:
            asker.ask("What is the robot doing?")
            asked += 1
        time.sleep(0.01)
    t1 = time.monotonic()
    loop.stop()
    stop.set()
    feeder.join(2)
    if asker is not None:
        asker.stop()
    acts = [t for t in published if t0 <= t <= t1]
    gaps = np.diff(acts)
    ok = [a for a in answers if not a.error]
    return {"mode": mode, "step_period_s": step_period, "actions_per_s": len(acts) / (t1 - t0),
            "gap_p50_ms": _pct(gaps, 50), "gap_p99_ms": _pct(gaps, 99),
            "infer_p50_ms": _pct(latencies, 50), "infer_p99_ms": _pct(latencies, 99),
            "questions": asked, "answered": len(ok), "refused": len(answers) - len(ok),
            "answer_p50_ms": _pct([a.latency_s for a in ok], 50)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="tiny", help="tiny (random weights, written to a temp dir) or a directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--step-periods", default="0.2,0.02")
    ap.add_argument("--frames", type=int, default=4, help="frames per question (a clip)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    from magma_ros.model.policy import MagmaPolicy

    ckpt = a.checkpoint
    if ckpt == "tiny":
        from magma_ros.model.checkpoint import write_tiny_checkpoint

        ckpt = str(write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=0))
    policy = MagmaPolicy(ckpt, device=a.device, constrained=True)
    side = MagmaPolicy(ckpt, device=a.device)
    load0 = os.getloadavg()
    rows = []
    for sp in (float(x) for x in a.step_periods.split(",")):
        for mode in ("none", "own", "shared"):
            r = run(policy, side, mode, sp, a.seconds, a.frames, a.max_tokens)
            print(json.dumps(r), flush=True)
            rows.append(r)
    load1 = os.getloadavg()
    md = ["## Questions vs actions (`benchmarks/ask_load.py`)\n",
          f"Does a question every second (a {a.frames}-frame clip, {a.max_tokens} new tokens) slow the action "
          f"loop? `PolicyLoop` + `AskWorker` on `MagmaPolicy` ({a.checkpoint} checkpoint, {a.device}, constrained "
          f"actions), 320x240 frames at 30 Hz, {a.seconds:g} s per run.",
          f"Machine: {machine()}; load average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} before, "
          f"{load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} after (a shared machine: other jobs inflate "
          f"every figure).\n",
          "| step period | questions | actions/s | gap p50 / p99 [ms] | inference p50 / p99 [ms] | answered "
          "(refused) | answer p50 [ms] |", "|---|---|---|---|---|---|---|"]
    names = {"none": "none", "own": "1/s, own instance", "shared": "1/s, shared model"}
    for r in rows:
        md.append(f"| {r['step_period_s']:g} s | {names[r['mode']]} | {r['actions_per_s']:.2f} | "
                  f"{r['gap_p50_ms']:.0f} / {r['gap_p99_ms']:.0f} | {r['infer_p50_ms']:.0f} / {r['infer_p99_ms']:.0f} "
                  f"| {r['answered']} ({r['refused']}) | {r['answer_p50_ms']:.0f} |")
    md.append(f"\nRun: `.venv/bin/python benchmarks/ask_load.py --checkpoint {a.checkpoint} --seconds {a.seconds:g}`.")
    if not a.no_write:
        write_section(SECTION, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
