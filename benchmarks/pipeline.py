"""Pipeline latency: image published -> command at the controller topic, without model time.

The graph of ``launch/sim.launch.yaml`` runs in separate processes (MuJoCo sim rendering its camera at
``--camera-fps``, 10 by default, as in the demo; safety, servo, and the policy node with ``policy:=scripted``,
so inference costs ~0). This script
publishes a 640x480 rgb8 image on the policy's image topic (stamped with the sim clock), then waits
for the first command at the controller topic that differs from the one before the image. Stages
are timed on the way: image -> ``magma/ee_twist`` (policy node), -> ``magma/joint_command`` (servo),
-> ``<arm_controller>/joint_trajectory`` (safety; an accepted command goes out at once, at most once
between two output ticks, else at the next one). All times are arrival times in this process.

    .venv/bin/python benchmarks/pipeline.py [--robot fr3] [--samples 60] [--camera-fps 10]
                                            [--nodes-from OLD_CHECKOUT] [--no-write] [--json out.json]

Per process CPU time over the measurement is reported beside the latencies (load-independent).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _results import machine, write_section  # noqa: E402

IMAGE_TOPIC = "bench/image_raw"
SCRIPT = "0.01,0,0,0,0,0,1; -0.01,0,0,0,0,0,1"  # +-1 cm in x, alternating, gripper open


def pct(a, q) -> float:
    return float(np.percentile(np.asarray(a) * 1e3, q)) if len(a) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--robot", default="fr3")
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--period", type=float, default=1.0, help="[s] between images (the arm settles)")
    ap.add_argument("--sizes", default="640x480,320x240", help="image sizes (rgb8) to measure, WxH,...")
    ap.add_argument("--camera-fps", type=float, default=10.0, help="[Hz, sim time] the sim's own camera (0: off)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    ap.add_argument("--nodes-from", default="", help="run the nodes from this checkout (their working directory "
                    "and PYTHONPATH), e.g. the commit before a change, for a before/after comparison in one run")
    a = ap.parse_args(argv)
    a.json = str(Path(a.json).resolve()) if a.json else ""  # (the working directory may change below)

    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 200)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
    os.environ.setdefault("MUJOCO_GL", "egl")
    # the image publisher here uses the nodes' DDS settings: another checkout's nodes run with the ones
    # they had (the profile came with config/fastdds.xml)
    if not a.nodes_from or (Path(a.nodes_from) / "config" / "fastdds.xml").exists():
        from magma_ros.nodes._common import dds_defaults

        dds_defaults()

    from sensor_msgs.msg import Image
    from trajectory_msgs.msg import JointTrajectory

    from magma_ros.demo import GraphProbe
    from magma_ros.launch_runner import LaunchRunner

    load = os.getloadavg()
    probe = GraphProbe(a.robot, "jtc")
    n = probe.node
    joint_cmds: list[float] = []
    n.create_subscription(JointTrajectory, "magma/joint_command",
                          lambda m: joint_cmds.append(time.monotonic()), 10)
    pub = n.create_publisher(Image, IMAGE_TOPIC, 2)
    try:
        sizes = [tuple(int(v) for v in wh.lower().split("x")) for wh in a.sizes.split(",")]
    except ValueError:
        print(f"error: --sizes must look like 640x480,320x240, got '{a.sizes}'", file=sys.stderr)
        return 2

    args = {"robot": a.robot, "policy": "scripted", "scripted_actions": SCRIPT, "scripted_loop": "true",
            "step_period": "0.2", "image_topic": IMAGE_TOPIC, "camera_fps": str(a.camera_fps), "tom_rate": "0.0",
            "image_timeout": "5.0"}  # images carry the sim time this process last saw, which lags under load
    logs = Path(tempfile.mkdtemp(prefix="magma_pipeline_"))
    env = None
    if a.nodes_from:  # python -m puts the working directory first on sys.path: start the nodes there
        env = dict(os.environ, PYTHONPATH=str(Path(a.nodes_from).resolve()))
        os.chdir(Path(a.nodes_from).resolve())
    runner = LaunchRunner("sim.launch.yaml", args, env=env, log_dir=logs, echo=False,
                          required=("sim", "safety", "servo", "policy"))
    runner.start()
    results = {}
    cpu, rtf = {}, float("nan")
    try:
        def up():
            return probe.js_stamp is not None and probe.command_count > 0

        if not probe.wait_for(up, 120, alive=runner.running):
            print(f"graph did not come up (logs: {logs})", file=sys.stderr)
            return 1
        from magma_ros.demo import graph_cpu_seconds
        from magma_ros.nodes._common import to_seconds

        cpu0 = graph_cpu_seconds(runner, this=None)
        t_cpu, sim0 = time.monotonic(), to_seconds(probe.js_stamp)
        for w, h in sizes:
            results[(w, h)] = measure(probe, pub, joint_cmds, runner, w, h, a.samples, a.period)
        span, sim_span = time.monotonic() - t_cpu, to_seconds(probe.js_stamp) - sim0
        cpu = {k: (v - cpu0[k]) / span for k, v in graph_cpu_seconds(runner, this=None).items()}
        rtf = sim_span / span
    finally:
        runner.stop()
        probe.close()
    end_load = os.getloadavg()
    cam = f"rendering its camera at {a.camera_fps:g} fps" if a.camera_fps > 0 else "rendering off"
    md = [f"Pipeline latency, {a.robot}, scripted policy (no model time), jtc controller, MuJoCo sim {cam}, "
          "all nodes in separate processes over Fast DDS (localhost)"
          + (f", nodes from {a.nodes_from}" if a.nodes_from else "") + ", one "
          f"rgb8 image every {a.period:g} s on the policy's image topic.",
          f"Machine: {machine()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"(1/5/15 min) before the run, {end_load[0]:.1f} after — other jobs on this host inflate every figure.",
          f"Sim real-time factor while measuring {rtf:.2f}; CPU [% of one core, per wall second]: "
          + ", ".join(f"{k} {100 * v:.0f}" for k, v in cpu.items())
          + "; per sim second: " + ", ".join(f"{k} {100 * v / rtf:.0f}" for k, v in cpu.items()) + ".", ""]
    for (w, h), (stages, misses, reasons) in results.items():
        md.append(f"{w}x{h}: {len(stages['total'])} images timed, {misses} gave no new command within 5 s"
                  + (" (" + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + ")" if reasons else "") + ".")
        md += ["", "| stage | p50 [ms] | p99 [ms] | max [ms] |", "|---|---|---|---|"]
        for key, name in STAGES:
            v = stages[key]
            md.append(f"| {name} | {pct(v, 50):.1f} | {pct(v, 99):.1f} | {pct(v, 100):.1f} |")
        md.append("")
    md.append("Run: `.venv/bin/python benchmarks/pipeline.py`.")
    text = "\n".join(md)
    print(text)
    if not any(r[0]["total"] for r in results.values()):
        print(f"no samples (logs: {logs})", file=sys.stderr)
        return 1
    if not a.no_write:
        write_section("pipeline", "## Pipeline latency (image -> controller command)\n\n" + text)
    if a.json:
        import json

        Path(a.json).write_text(json.dumps({
            "load_before": load, "load_after": end_load, "nodes_from": a.nodes_from, "camera_fps": a.camera_fps,
            "cpu_fraction": cpu, "rtf": rtf, "sizes": {f"{w}x{h}": {"misses": m, "stages": {
                k: {"p50": pct(v, 50), "p99": pct(v, 99), "max": pct(v, 100), "n": len(v)}
                for k, v in st.items()}} for (w, h), (st, m, _r) in results.items()}}, indent=1))
    return 0


STAGES = [("total", "image -> controller command (total)"),
          ("policy", "image -> magma/ee_twist (policy node)"),
          ("servo", "ee_twist -> magma/joint_command (servo)"),
          ("safety", "joint_command -> controller topic (safety, 100 Hz output)")]


def measure(probe, pub, joint_cmds, runner, w, h, samples, period):
    """Publish ``samples`` images of w x h (after 3 warm-ups); returns (stage lists, misses, reasons)."""
    from sensor_msgs.msg import Image

    img = Image(height=h, width=w, encoding="rgb8", step=w * 3)
    img.header.frame_id = "camera_color_optical_frame"
    img.data = np.random.default_rng(0).integers(0, 255, h * w * 3, dtype=np.uint8).tobytes()
    stages = {k: [] for k, _ in STAGES}
    misses = 0
    reasons: dict[str, int] = {}
    for i in range(samples + 3):  # the first 3 warm up
        time.sleep(period)
        with probe.lock:
            before = probe.commands[-1][1] if probe.commands else None
            k_cmd = len(probe.commands)
        k_tw, k_jc = len(probe.twists), len(joint_cmds)
        img.header.stamp = probe.js_stamp  # sim time of the latest joint state (no /clock flood here)
        t0 = time.monotonic()
        pub.publish(img)

        def changed(k_cmd=k_cmd, before=before):
            with probe.lock:
                for t, q in probe.commands[k_cmd:]:
                    if before is None or np.max(np.abs(q - before)) > 1e-7:
                        return t
            return None

        if not probe.wait_for(lambda: changed() is not None, 5.0, alive=runner.running, step=0.001):
            if i >= 3:
                misses += 1
                why = ("no policy action (image lost or judged stale)" if len(probe.twists) == k_tw else
                       "servo produced no joint command" if len(joint_cmds) == k_jc else
                       "safety did not follow (holding, e.g. stale joint states)")
                reasons[why] = reasons.get(why, 0) + 1
            continue
        if i < 3:
            continue
        t_cmd = changed()
        stages["total"].append(t_cmd - t0)
        if len(probe.twists) > k_tw and len(joint_cmds) > k_jc:
            t_tw, t_jc = probe.twists[k_tw], joint_cmds[k_jc]
            stages["policy"].append(t_tw - t0)
            stages["servo"].append(t_jc - t_tw)
            stages["safety"].append(t_cmd - t_jc)
    return stages, misses, reasons


if __name__ == "__main__":
    sys.exit(main())
