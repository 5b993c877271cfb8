"""``make demo``: the whole graph in MuJoCo, driven by Magma, for a fixed number of steps.

``python -m magma_ros.demo [--robot fr3] [--steps 50] [--model PATH] [--instruction ...] [--out DIR]``

The graph (sim, safety, servo, policy) runs as separate processes through the launch runner with
``launch/sim.launch.yaml``, exactly as ``magma-ros launch sim.launch.yaml`` would start it. This
process only watches: it records the camera topic to an mp4, keeps the latest ToM overlay, checks
every command at the controller topic against the robot's limits and counts safety interventions.

With no weights (``--model`` and ``MAGMA_MODEL`` unset) a small random-weight Magma checkpoint is
generated locally (cached under ``~/.cache/magma_ros``) and the policy decodes constrained to the
action tokens: the actions are meaningless, the plumbing is real. The same :class:`GraphProbe`
serves the system test and the pipeline benchmark.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.limit_audit import LimitAudit
from magma_ros.core.robot import ROBOTS, RobotConfig, load_robot
from magma_ros.nodes._common import dds_defaults, to_seconds

CONTROLLERS = ("jtc", "forward", "isaac")
DEFAULT_INSTRUCTION = "pick up the red block"


def cache_dir() -> Path:
    """Where generated checkpoints are kept (``$MAGMA_ROS_CACHE`` or ``~/.cache/magma_ros``)."""
    if os.environ.get("MAGMA_ROS_CACHE"):
        return Path(os.environ["MAGMA_ROS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magma_ros"


def tiny_checkpoint(directory: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The random-weight checkpoint, written once (atomically) and reused afterwards."""
    from magma_ros.model.checkpoint import write_tiny_checkpoint

    out = Path(directory) if directory else cache_dir() / f"tiny-random-seed{seed}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_checkpoint(tmp, seed=seed)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def controller_topic(robot: RobotConfig, controller: str) -> str:
    """Relative topic the safety node publishes arm commands on for ``controller``."""
    choose(controller, CONTROLLERS, "controller")
    return {"jtc": f"{robot.arm_controller}/joint_trajectory",
            "forward": f"{robot.forward_controller}/commands", "isaac": "joint_command"}[controller]


class GraphProbe:
    """An rclpy node (own context, background thread) that watches and pokes the running graph."""

    def __init__(self, robot: str, controller: str = "jtc", namespace: str = "", video: Path | None = None,
                 video_fps: float = 10.0, image_topic: str = "camera/camera/color/image_raw",
                 output_period: float = 0.01):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Empty, Float64MultiArray, String
        from std_srvs.srv import Trigger
        from trajectory_msgs.msg import JointTrajectory

        self.robot = load_robot(robot)
        self.controller = controller
        self.output_period = output_period  # [s] safety output period (1 / output_rate)
        # every command at the controller topic against the robot YAML's hard limits, on real elapsed
        # time (the outputs' stamps), as the controller executes it; audited lazily (see `limits`)
        # (the probe may join a stream that is already moving: the velocity before its first command is
        # unknown, not rest)
        self._audit = LimitAudit(self.robot, output_period, starts_at_rest=False)
        self._raw: list = []  # (start time, JointTrajectory | positions) not yet audited
        self.command_count = 0
        self.lock = threading.Lock()
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        ns = namespace.strip("/")
        self.node = rclpy.create_node(f"magma_demo_probe_{random.randint(0, 1_000_000)}", context=self.ctx,
                                      namespace="/" + ns if ns else "/")
        n = self.node
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        best = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.q: np.ndarray | None = None  # latest measured arm position
        self.js_stamp = None  # header stamp of the latest joint state (the sim/driver clock)
        self.q_log: list[tuple[float, np.ndarray]] = []  # (wall time, q)
        self.commands: list[tuple[float, np.ndarray]] = []  # (wall time, q) at the controller topic
        self.twists: list[float] = []  # wall times of policy actions (magma/ee_twist)
        self.twist_sim: list[float] = []  # [s] sim time (latest joint-state stamp) when each action arrived
        self.states: list[str] = []  # safety/state values in arrival order
        self.sources: list[str] = []
        self.safety_diag: list[tuple[int, str]] = []  # (level, message) changes of the safety node
        self.frames = 0  # camera images received
        self.video_frames = 0  # frames written to the video
        self.image_callbacks: list = []  # f(msg) per camera image (runs on the executor thread)
        self._image_msg = self._tom_msg = None
        self._new_image = threading.Event()
        self._writer = None
        if video is not None:
            import imageio.v2 as imageio

            video.parent.mkdir(parents=True, exist_ok=True)
            self._writer = imageio.get_writer(str(video), fps=video_fps, codec="libx264", quality=7,
                                              macro_block_size=8, ffmpeg_log_level="error")
        def to_q(names, values) -> np.ndarray | None:
            try:
                return np.array([values[list(names).index(j)] for j in self.robot.arm_joints], dtype=float)
            except (ValueError, IndexError):
                return None

        self._to_q = to_q

        def on_js(m):
            q = to_q(m.name, m.position)
            self.js_stamp = m.header.stamp
            if q is not None:
                with self.lock:
                    self.q = q
                    self.q_log.append((time.monotonic(), q))

        def on_traj(m):
            # JTC semantics: a message replaces the rest of the previous one at its stamp (zero: on
            # arrival), from where that path is then, through its points at stamp + time_from_start.
            stamp = to_seconds(m.header.stamp)
            start = stamp if stamp > 0 else self.node.get_clock().now().nanoseconds * 1e-9
            q = to_q(m.joint_names, m.points[0].positions) if m.points else None
            self._command(np.full(self.robot.dof, np.nan) if q is None else q, (start, m))

        def on_forward(m):  # no stamp: on-time ticks assumed (the nominal output period)
            q = np.asarray(m.data, dtype=float)
            self._command(q, (self.command_count * self.output_period, q))

        def on_isaac(m):
            q = to_q(m.name, m.position)
            q = np.full(self.robot.dof, np.nan) if q is None else q
            self._command(q, (to_seconds(m.header.stamp), q))

        def on_image(m):  # keep the executor light: conversion and encoding run in _encode
            self.frames += 1
            self._image_msg = m
            self._new_image.set()
            for cb in list(self.image_callbacks):
                cb(m)

        def on_tom(m):
            self._tom_msg = m

        def on_diag(m):
            for s in m.status:
                if "safety" in s.name.lower():
                    lvl = int.from_bytes(s.level, "little") if isinstance(s.level, bytes) else int(s.level)
                    with self.lock:
                        if not self.safety_diag or self.safety_diag[-1] != (lvl, s.message):
                            self.safety_diag.append((lvl, s.message))

        n.create_subscription(JointState, self.robot.joint_states_topic, on_js, best)
        topic = controller_topic(self.robot, controller)
        msg_type = {"jtc": JointTrajectory, "forward": Float64MultiArray, "isaac": JointState}[controller]
        cb = {"jtc": on_traj, "forward": on_forward, "isaac": on_isaac}[controller]
        n.create_subscription(msg_type, topic, cb, 100)
        def on_twist(m):
            self.twist_sim.append(to_seconds(self.js_stamp) if self.js_stamp is not None else float("nan"))
            self.twists.append(time.monotonic())

        n.create_subscription(TwistStamped, "magma/ee_twist", on_twist, 10)
        n.create_subscription(String, "safety/state", lambda m: self.states.append(m.data), latched)
        n.create_subscription(String, "safety/source", lambda m: self.sources.append(m.data), latched)
        n.create_subscription(DiagnosticArray, "diagnostics", on_diag, 50)
        # Images RELIABLE (the sim and camera nodes publish reliable): with Fast DDS LARGE_DATA a
        # best-effort reader loses most 640x480 frames (measured: 2 of 20 at 1 Hz; reliable 20 of 20).
        images = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)
        n.create_subscription(Image, image_topic, on_image, images)
        n.create_subscription(Image, "magma/tom/image", on_tom, images)
        self.estop_pub = n.create_publisher(Empty, "safety/estop", latched)
        self.instruction_pub = n.create_publisher(String, "magma/instruction", latched)
        self.reset_cli = n.create_client(Trigger, "safety/reset")
        self.resume_cli = n.create_client(Trigger, "safety/resume_policy")
        self._Empty, self._String, self._Trigger = Empty, String, Trigger
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self._thread = threading.Thread(target=self._spin, daemon=True, name="probe-spin")
        self._thread.start()
        self._encoder = None
        if self._writer is not None:
            self._encoder = threading.Thread(target=self._encode, daemon=True, name="probe-video")
            self._encoder.start()

    def _encode(self) -> None:
        from magma_ros.nodes.policy import image_to_rgb

        while self._writer is not None:
            if not self._new_image.wait(0.2):
                continue
            self._new_image.clear()
            m = self._image_msg
            try:
                rgb = image_to_rgb(m)
            except ValueError:
                continue
            w = self._writer
            if w is not None:
                w.append_data(rgb)
                self.video_frames += 1

    @property
    def tom_image(self) -> np.ndarray | None:
        """The latest ToM overlay (``magma/tom/image``) as RGB, or None."""
        from magma_ros.nodes.policy import image_to_rgb

        try:
            return None if self._tom_msg is None else image_to_rgb(self._tom_msg)
        except ValueError:
            return None

    @property
    def has_tom(self) -> bool:
        """True once a ToM overlay image arrived."""
        return self._tom_msg is not None

    @property
    def last_image(self) -> np.ndarray | None:
        """The latest camera image as RGB, or None."""
        from magma_ros.nodes.policy import image_to_rgb

        return None if self._image_msg is None else image_to_rgb(self._image_msg)

    def _command(self, q: np.ndarray, raw) -> None:
        with self.lock:
            self.command_count += 1
            self.commands.append((time.monotonic(), q))
            self._raw.append(raw)

    @property
    def limits(self) -> LimitAudit:
        """The limit audit of every command received so far (``violations``, ``pieces``, ...)."""
        to_q = self._to_q
        with self.lock:
            raw, self._raw = self._raw, []
        for start, m in raw:
            if isinstance(m, np.ndarray):
                self._audit.point(start, m)
                continue
            pts = [to_q(m.joint_names, p.positions) for p in m.points]
            if any(p is None for p in pts):
                pts = [np.full(self.robot.dof, np.nan)]
            self._audit.trajectory(start, [to_seconds(p.time_from_start) for p in m.points], pts)
        return self._audit

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self.ctx.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, Exception):  # noqa: BLE001 - shutting down
            pass

    # -- actions ----------------------------------------------------------------------------------
    def estop(self) -> None:
        self.estop_pub.publish(self._Empty())

    def instruct(self, text: str) -> None:
        self.instruction_pub.publish(self._String(data=text))

    def call(self, which: str, timeout: float = 10.0) -> tuple[bool, str]:
        """Call ``safety/reset`` or ``safety/resume_policy``; returns (success, message)."""
        cli = {"reset": self.reset_cli, "resume_policy": self.resume_cli}[which]
        if not cli.wait_for_service(timeout_sec=timeout):
            return False, f"service safety/{which} not available"
        fut = cli.call_async(self._Trigger.Request())
        end = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < end:
            time.sleep(0.02)
        if not fut.done():
            return False, f"safety/{which} timed out"
        r = fut.result()
        return bool(r.success), r.message

    # -- observations -------------------------------------------------------------------------------
    def wait_for(self, pred, timeout: float, alive=None, step: float = 0.05) -> bool:
        """Poll ``pred`` until true or ``timeout`` (or until ``alive()`` turns false)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            if alive is not None and not alive():
                return bool(pred())
            time.sleep(step)
        return bool(pred())

    @property
    def state(self) -> str:
        """Latest ``safety/state`` ('' before the first one)."""
        return self.states[-1] if self.states else ""

    def motion(self, since: float, until: float | None = None) -> float:
        """Largest joint displacement [rad] measured between ``since`` and ``until`` (wall times)."""
        with self.lock:
            qs = [q for t, q in self.q_log if t >= since and (until is None or t <= until)]
        if len(qs) < 2:
            return 0.0
        a = np.asarray(qs)
        return float(np.max(a.max(axis=0) - a.min(axis=0)))

    def interventions(self) -> dict[str, int]:
        """How often the safety node held or stopped: transitions into each non-ok state."""
        out: dict[str, int] = {}
        prev = None
        for s in self.states:
            if s != prev and s not in ("ok", "waiting"):
                key = s.split(":", 1)[0] if not s.startswith("holding") else s
                out[key] = out.get(key, 0) + 1
            prev = s
        return out

    def close(self) -> None:
        w, self._writer = self._writer, None
        if self._encoder is not None:
            self._encoder.join(5)
        if w is not None:
            w.close()
        try:
            self.executor.shutdown()
            self.node.destroy_node()
        finally:
            import rclpy

            rclpy.try_shutdown(context=self.ctx)
        self._thread.join(2)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time [s] a process has used so far (Linux ``/proc``); nan where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def step_rate(wall: list[float], sim: list[float]) -> tuple[float, float, float]:
    """(rate in sim time [Hz], rate in wall time [Hz], real-time factor) of actions received at ``wall``
    (monotonic seconds) and ``sim`` (the sim clock at the same moments); nan where undefined.

    The sim-time rate is what the arm experiences; with a real-time factor below 1 (a slow or busy
    host) the wall rate is lower by that factor while the policy still keeps its step.
    """
    nan = float("nan")
    if len(wall) < 2 or len(sim) != len(wall):
        return nan, nan, nan
    n, dw, ds = len(wall) - 1, wall[-1] - wall[0], sim[-1] - sim[0]
    return (n / ds if ds > 0 else nan), (n / dw if dw > 0 else nan), (ds / dw if dw > 0 else nan)


def _ros_defaults() -> int | None:
    """Isolate the demo on this host unless the user chose a ROS domain; returns the domain picked."""
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    dds_defaults()  # this process publishes too (the probe)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    if "ROS_DOMAIN_ID" in os.environ:
        return None
    d = random.randint(1, 100)
    os.environ["ROS_DOMAIN_ID"] = str(d)
    return d


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when the requested steps ran and no command broke a limit."""
    ap = argparse.ArgumentParser(prog="python -m magma_ros.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--robot", default="fr3", help=f"one of {', '.join(ROBOTS)}")
    ap.add_argument("--steps", type=int, default=50, help="policy steps (actions) to run")
    ap.add_argument("--model", default=os.environ.get("MAGMA_MODEL", ""),
                    help="Magma checkpoint dir or hub id (default: $MAGMA_MODEL, else a random-weight one)")
    ap.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="language instruction")
    ap.add_argument("--out", default="demo_out", help="output directory (video, ToM PNG, logs)")
    ap.add_argument("--controller", default="jtc", help=f"one of {', '.join(CONTROLLERS)}")
    ap.add_argument("--tom-rate", type=float, default=0.5, help="[Hz] ToM plans (0: off)")
    ap.add_argument("--timeout", type=float, default=600.0, help="[s] give up after this long")
    ap.add_argument("--verbose", action="store_true", help="show every node's output")
    a = ap.parse_args(argv)

    def on_term(signum, _frame):  # stop the graph (children run in their own process groups)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        choose(a.robot, ROBOTS, "robot")
        choose(a.controller, CONTROLLERS, "controller")
        if a.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {a.steps}")
        return _run(a)
    except ConfigError as e:
        print(f"[magma_ros] error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _run(a) -> int:
    from magma_ros.launch_runner import LaunchRunner

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    domain = _ros_defaults()
    model = a.model
    if model:
        if not Path(model).exists() and "/" not in model:
            raise ConfigError(f"--model '{model}' is neither a directory nor a hub id (owner/name)")
        _say(f"model: {model}")
        constrained = "false"
    else:
        _say("no --model / MAGMA_MODEL given: generating a small RANDOM-WEIGHT Magma checkpoint locally.")
        t0 = time.monotonic()
        model = str(tiny_checkpoint())
        _say(f"  -> {model} ({time.monotonic() - t0:.1f} s). Its actions are MEANINGLESS (random weights);")
        _say("     decoding is constrained to action tokens so the arm moves. This demo shows the plumbing;")
        _say("     set MAGMA_MODEL=/path/to/Magma-8B (or a hub id) for the real model.")
        constrained = "true"
    if domain is not None:
        _say(f"ROS_DOMAIN_ID={domain} (localhost only); export it to watch with ros2 topic echo")
    video, tom_png, log_dir = out / "camera.mp4", out / "tom_overlay.png", out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    args = {"robot": a.robot, "policy": "local", "model": model, "constrained": constrained,
            "instruction": a.instruction, "controller": a.controller, "tom_rate": str(a.tom_rate),
            "use_sim_time": "true"}
    robot = load_robot(a.robot)
    probe = GraphProbe(a.robot, a.controller, video=video)
    runner = LaunchRunner("sim.launch.yaml", args, log_dir=log_dir, echo=a.verbose,
                          required=("sim", "safety", "servo", "policy"))
    _say(f"starting sim, safety, servo, policy ({a.robot}, controller {a.controller}); logs in {log_dir}")
    t_start = time.monotonic()
    runner.start()
    ok = False
    try:
        alive = runner.running
        if not probe.wait_for(lambda: probe.twists, a.timeout, alive=alive):
            _say("no policy action arrived" + ("" if alive() else ": a node exited"))
            return _fail(runner)
        t_first = probe.twists[0]
        _say(f"first action after {t_first - t_start:.1f} s (model load + first inference); "
             f"instruction: '{a.instruction}'")
        n0 = len(probe.twists)
        cpu0 = graph_cpu_seconds(runner)
        last_report = time.monotonic()
        while len(probe.twists) < a.steps:
            if not alive():
                _say("a node exited before the demo finished")
                return _fail(runner)
            if time.monotonic() - t_start > a.timeout:
                _say(f"timeout after {a.timeout:.0f} s with {len(probe.twists)} steps")
                return _fail(runner)
            if time.monotonic() - last_report > 5.0:
                _say(f"  step {len(probe.twists)}/{a.steps}")
                last_report = time.monotonic()
            time.sleep(0.05)
        cpu1 = graph_cpu_seconds(runner)
        if a.tom_rate > 0 and not probe.has_tom:  # ToM runs only in the actions' slack: give it time
            _say("waiting up to 60 s for a ToM plan (it runs at low priority, between actions)")
            probe.wait_for(lambda: probe.has_tom, 60, alive=alive)
        ok = True
    finally:
        runner.stop()
        probe.close()
    steps = a.steps
    sim_hz, wall_hz, rtf = step_rate(probe.twists[n0 - 1:steps], probe.twist_sim[n0 - 1:steps])
    cpu = {k: (cpu1[k] - cpu0[k]) / max(steps - n0, 1) for k in cpu0 if k in cpu1}  # [s] per step
    if probe.tom_image is not None:
        import imageio.v2 as imageio

        imageio.imwrite(tom_png, probe.tom_image)
    tom_missing = "none received" + (" (--tom-rate 0)" if not a.tom_rate else "")
    moved = probe.motion(t_first)
    iv = probe.interventions()
    audit = probe.limits
    lines = [
        "",
        "==================== magma_ros demo summary ====================",
        f"robot            {robot.name} in MuJoCo, controller {a.controller}",
        f"model            {model}" + ("  (RANDOM WEIGHTS: meaningless actions)" if constrained == "true"
                                           else ""),
        f"steps            {steps} policy actions (magma/ee_twist)",
        f"control rate     {sim_hz:.2f} Hz achieved in sim time (the arm's clock; step period 0.2 s = 5 Hz "
        f"target); {wall_hz:.2f} Hz wall, real-time factor {rtf:.2f}",
        "cpu per step     " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in cpu.items())
        + f" (total {1e3 * sum(cpu.values()):.0f} ms; load average {os.getloadavg()[0]:.1f})",
        f"controller cmds  {probe.command_count} at /{controller_topic(robot, a.controller)}, "
        f"{len(audit.violations)} outside limits (position, velocity, acceleration on real elapsed time)",
        f"arm motion       {moved:.3f} rad largest joint excursion",
        "safety           " + (", ".join(f"{k} x{v}" for k, v in iv.items()) or "no interventions")
        + f"; final state '{probe.state or '?'}'",
        f"video            {video} ({probe.video_frames} of {probe.frames} camera frames)",
        f"ToM overlay      {tom_png if probe.tom_image is not None else tom_missing}",
        f"logs             {log_dir}",
        "================================================================",
    ]
    print("\n".join(lines), flush=True)
    for v in audit.violations[:5]:
        _say(f"LIMIT VIOLATION {v}")
    return 0 if ok and not audit.violations else 1


def graph_cpu_seconds(runner, this: str | None = "demo") -> dict[str, float]:
    """CPU seconds used so far by each process of the graph and, under the label ``this`` (None: not
    at all), by this one (probe, video)."""
    out = {label: process_cpu_seconds(p.pid) for label, p in runner.processes.items()}
    if this is not None:
        out[this] = process_cpu_seconds(os.getpid())
    return out


def _fail(runner) -> int:
    for label in runner.processes:
        tail = runner.log_text(label).strip().splitlines()[-6:]
        rc = runner.processes[label].poll()
        _say(f"--- {label} (exit code {rc}) ---")
        for line in tail:
            print(f"    {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
