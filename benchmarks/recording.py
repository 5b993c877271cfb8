"""Recording: how long finishing an episode takes against the episode's duration (target: at most half).

Frames are fed in real time (``--fps``, default 10) through the recorder's session core
(:class:`magma_ros.data.session.RecorderCore`: LeRobot stage with the incremental video encoder, Magma
action lookahead, the episode's MCAP bag with every image as a raw sensor_msgs/Image), from MuJoCo-rendered
640x480 images of the moving arm. "Finish" is what ``recorder/stop`` waits for: the last frames, the
encoder flush, the commit into the dataset (parquet, video concatenation, metadata, fsync) and the bag.

    MUJOCO_GL=egl python benchmarks/recording.py [--durations 10,10,30] [--width 640 --height 480]

Writes the ``recording`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import machine, write_section  # noqa: E402


def render_frames(n: int, width: int, height: int, robot: str = "fr3") -> tuple[list, list]:
    """``n`` camera images of the arm sweeping its first joint, and the joint positions."""
    from magma_ros.sim.arm import ArmSim

    sim = ArmSim(robot, width=width, height=height)
    q0 = sim.q().copy()
    imgs, qs = [], []
    for i in range(n):
        q = q0.copy()
        q[0] += 0.4 * np.sin(2 * np.pi * i / n)
        sim.set_targets(q)
        sim.step(50)
        imgs.append(sim.render_color().copy())
        qs.append(sim.q().copy())
    sim.close()
    return imgs, qs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durations", default="10,10,30", help="episode durations [s], comma-separated")
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    a = ap.parse_args(argv)
    from sensor_msgs.msg import Image

    from magma_ros.core.kinematics import Kinematics
    from magma_ros.core.robot import load_robot
    from magma_ros.data.episode import Sample, pose_to_vector
    from magma_ros.data.session import RecorderConfig, RecorderCore

    durations = [float(x) for x in a.durations.split(",")]
    load_before = os.getloadavg()
    imgs, qs = render_frames(60, a.width, a.height)
    robot = load_robot("fr3")
    kin = Kinematics(robot)
    tmp = Path(tempfile.mkdtemp(prefix="magma_rec_bench_"))
    cfg = RecorderConfig(robot="fr3", out=str(tmp), fps=a.fps, step_period=2.0 / a.fps, width=a.width,
                         height=a.height, instruction="pick up the red block")
    core = RecorderCore(cfg, list(robot.arm_joints), "fr3")
    rows = []
    try:
        for ep, dur in enumerate(durations):
            ok, msg = core.start(now=0.0)
            assert ok, msg
            n = int(round(dur * a.fps))
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            late = 0.0
            for i in range(n):
                target = t0 + i / a.fps
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    late = max(late, -delay)
                rgb, q = imgs[i % len(imgs)], qs[i % len(qs)]
                pose = kin.fk(q)
                im = Image(height=a.height, width=a.width, encoding="rgb8", step=3 * a.width, data=rgb.tobytes())
                core.record_message("/camera/camera/color/image_raw", im, int(i * 1e9 / a.fps))
                core.add(Sample({"observation.images.color": rgb,
                                 "observation.state": np.append(q, 1.0).astype(np.float32),
                                 "observation.ee_pose": pose_to_vector(pose).astype(np.float32),
                                 "action.joints": np.append(q, 1.0).astype(np.float32),
                                 "teleop.intent": np.zeros(7, np.float32), "safety.source": 1,
                                 "intervention": False, "observation.stamp": i / a.fps}, pose, 1.0))
            t_stop = time.perf_counter()
            cpu1 = time.process_time()
            ok, msg = core.stop()
            assert ok, msg
            finish = time.perf_counter() - t_stop
            cpu_finish = time.process_time() - cpu1
            cpu = time.process_time() - cpu0
            tm = core.timing
            rows.append((ep, dur, n, finish, finish / dur, cpu_finish, late, cpu / (t_stop - t0 + finish),
                         f"{tm['finish']:.2f} / {tm['commit']:.2f} / {tm['bag']:.2f}"))
            print(f"episode {ep}: {dur:.0f} s, {n} frames: finish {finish:.2f} s ({100 * finish / dur:.1f} % of "
                  f"the duration), feeding at most {late * 1000:.0f} ms late; {msg}")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    lines = [
        "## Recording (`benchmarks/recording.py`)",
        "",
        f"Machine: {machine()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        "(a shared machine: other jobs compete for the 2 cores).",
        "",
        f"{a.width}x{a.height} MuJoCo images at {a.fps} fps through the recorder's session core: LeRobot stage "
        "with the incremental H.264 encoder (libx264 veryfast, GOP 2, 1 thread), the MCAP bag with every raw "
        "image, Magma-action lookahead. *Finish* = what `recorder/stop` waits for (last frames, encoder flush, "
        "commit with video concatenation and fsync, bag close). Target: at most half the episode's duration.",
        "",
        "| episode | duration [s] | frames | finish [s] | finish / duration | of which encoder flush / commit "
        "/ bag [s] | finish CPU [s] | feeder max lateness [ms] | CPU while recording |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ep, dur, n, fin, ratio, cpu_fin, late, share, parts in rows:
        lines.append(f"| {ep} | {dur:.0f} | {n} | {fin:.2f} | {100 * ratio:.1f} % | {parts} | {cpu_fin:.2f} | "
                     f"{1000 * late:.0f} | {share:.2f} cores |")
    lines += ["", f"Session on disk: {size / 2**20:.1f} MiB (dataset + bags)."]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("recording", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
