"""Headless data collection in MuJoCo with a scripted gamepad (``magma-ros collect --sim --scripted``).

Runs ``launch/collect.launch.yaml`` (sim, safety, servo, optional scripted policy, teleop with its servo,
recorder) under the project's launch runner and plays a person with a gamepad: a :class:`ScriptedJoy`
publishes ``sensor_msgs/Joy`` on ``joy`` exactly as ``joy_node`` would (button and axis indices from the
device's YAML in config/teleop/), so the same teleop node, deadman, servo, safety node and recorder do
the work. Per attempt: press *start episode*; let the policy drive; hold the deadman and push the stick
(teleop takes over); release; press *stop* (or *discard*); press *hand back to policy*.

It is for tests and for a lab to check its set-up before a person sits down at the gamepad.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from magma_ros.core.errors import ConfigError


@dataclass(frozen=True)
class CollectPlan:
    """What the scripted operator does (times are wall-clock seconds)."""

    episodes: int = 3  # episodes to save
    discard: tuple[int, ...] = ()  # attempt numbers (0-based) that are discarded instead of saved
    policy_seconds: float = 2.0  # the policy drives this long after the episode starts
    teleop_seconds: float = 2.0  # then the operator holds the deadman and pushes the stick this long
    hold_seconds: float = 0.5  # deadman released (arm holds) before the episode is stopped
    policy_frames: int = 5  # and at least this many frames recorded before the takeover (a slow sim
    teleop_frames: int = 5  # runs behind the wall clock), and this many more under teleop
    stick: tuple[tuple[str, float], ...] = ()  # (axis name, value) pushed during teleop; default linear.x 0.6
    #                                          (its sign alternates per attempt so the arm stays near home)
    joy_rate: float = 20.0  # [Hz] Joy messages (joy_node's autorepeat_rate)


class ScriptedJoy:
    """Publishes sensor_msgs/Joy on ``joy`` at ``rate`` from the current 'held' state (a gamepad)."""

    def __init__(self, node, params: dict, rate: float = 20.0):
        from sensor_msgs.msg import Joy

        self.node, self.p, self._Joy = node, params, Joy
        idx = [int(v) for k, v in params.items() if (k.endswith("_button") or k.startswith("axis_"))
               and isinstance(v, int) and v >= 0]
        self.n = max(idx) + 1 if idx else 12
        self.axes = [0.0] * self.n
        self.buttons = [0] * self.n
        self.lock = threading.Lock()
        self.sent = 0  # messages published so far
        self.pub = node.create_publisher(Joy, str(params.get("joy_topic", "joy")), 10)
        node.create_timer(1.0 / rate, self.publish)

    def publish(self) -> None:
        """One Joy message with what is held now."""
        m = self._Joy()
        m.header.stamp = self.node.get_clock().now().to_msg()
        with self.lock:
            m.axes, m.buttons = [float(a) for a in self.axes], [int(b) for b in self.buttons]
        self.pub.publish(m)
        self.sent += 1

    def hold(self, button: str, down: bool = True) -> None:
        """Hold or release the button named in the device YAML (e.g. ``enable``, ``start_episode``)."""
        i = self.p.get(f"{button}_button")
        if not isinstance(i, int) or i < 0:
            raise ConfigError(f"the device has no '{button}_button'")
        with self.lock:
            self.buttons[i] = 1 if down else 0

    def axis(self, name: str, value: float) -> None:
        """Push an axis (``linear.x``, ``angular.yaw`` ...) to ``value`` in [-1, 1]."""
        i = self.p.get(f"axis_{name}")
        if not isinstance(i, int) or i < 0:
            raise ConfigError(f"the device has no 'axis_{name}'")
        with self.lock:
            self.axes[i] = float(value)

    def release_all(self) -> None:
        with self.lock:
            self.axes = [0.0] * self.n
            self.buttons = [0] * self.n


@dataclass
class CollectResult:
    """Where the session went and what it holds."""

    out: Path
    dataset: Path
    mcap: Path
    episodes: list[dict] = field(default_factory=list)  # {"episode_index", "length"}
    events: list[str] = field(default_factory=list)  # what the operator saw, in order
    log_dir: Path | None = None


def collect(out: str | Path, plan: CollectPlan = CollectPlan(), robot: str = "fr3", device: str = "xbox",
            with_policy: bool = True, width: int = 320, height: int = 240, resume: bool = False,
            instruction: str = "pick up the red block", scripted_actions: str = "",
            timeout: float = 120.0, launch_args: dict | None = None, log=print) -> CollectResult:
    """Run the collection graph with a scripted gamepad; returns what was saved (see module docstring)."""
    import os

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from magma_ros.core.teleop import load_device_params
    from magma_ros.data.lerobot import read_info
    from magma_ros.launch_runner import LaunchRunner

    params = load_device_params(device)
    if params.get("input", "joy") != "joy":
        raise ConfigError(f"device '{device}' is not a Joy device; the scripted operator needs xbox, ps4 or ps5")
    out = Path(out).expanduser().resolve()
    # the scripted policy moves the TCP 4 mm down per step for 2 s, then back up (looped)
    scripted_actions = scripted_actions or "; ".join(["0,0,-0.004,0,0,0,1"] * 10 + ["0,0,0.004,0,0,0,1"] * 10)
    args = {"robot": robot, "sim": "true", "device": device, "driver": "false", "out": str(out),
            "resume": "true" if resume else "false", "with_policy": "true" if with_policy else "false",
            "policy": "scripted", "scripted_actions": scripted_actions, "scripted_loop": "true",
            "instruction": instruction, "width": str(width), "height": str(height)}
    args.update(launch_args or {})
    res = CollectResult(out, out / "lerobot", out / "mcap", log_dir=out / "logs")
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with LaunchRunner("collect.launch.yaml", args, log_dir=res.log_dir, echo=False) as run:
        ctx = rclpy.Context()
        rclpy.init(context=ctx)
        node = rclpy.create_node(f"scripted_operator_{random.randint(0, 999999)}", context=ctx)
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(node)
        st = {"recorder": "", "source": ""}
        node.create_subscription(String, "recorder/state", lambda m: st.__setitem__("recorder", m.data), latched)
        node.create_subscription(String, "safety/source", lambda m: st.__setitem__("source", m.data), latched)
        joy = ScriptedJoy(node, params, plan.joy_rate)
        stop = threading.Event()
        spin = threading.Thread(target=lambda: [ex.spin_once(timeout_sec=0.05) for _ in iter(stop.is_set, True)],
                                daemon=True)
        spin.start()

        def wait(what: str, pred, t: float = timeout) -> None:
            end = time.monotonic() + t
            while time.monotonic() < end:
                if run.returncode is not None:
                    raise RuntimeError(f"the launch stopped while waiting for {what}; logs in {res.log_dir}")
                if pred():
                    return
                time.sleep(0.05)
            raise RuntimeError(f"timed out waiting for {what} (recorder: '{st['recorder']}', safety source: "
                               f"'{st['source']}'); logs in {res.log_dir}")

        def press(button: str) -> None:
            # held for 3 published messages, then released for 3 (not a wall time: on a loaded machine
            # this process's own timer may publish late)
            for down in (True, False):
                joy.hold(button, down)
                n = joy.sent + 3
                wait(f"Joy messages with '{button}' {'held' if down else 'released'}", lambda n=n: joy.sent >= n, 30.0)

        def press_until(button: str, what: str, pred, tries: int = 3, each: float = 15.0) -> None:
            """Press ``button`` until ``pred`` holds: a press the teleop node missed under load is repeated,
            as a person would (a repeated press is refused harmlessly when the first one did arrive)."""
            for k in range(tries):
                press(button)
                try:
                    wait(what, pred, each if k < tries - 1 else timeout)
                    return
                except RuntimeError:
                    if k == tries - 1 or run.returncode is not None:
                        raise
                    note(f"no reaction to '{button}' yet: pressing it again")

        def frames() -> int:
            m = re.match(r"recording episode \d+: (\d+) frames", st["recorder"])
            return int(m.group(1)) if m else -1

        def note(text: str) -> None:
            res.events.append(text)
            log(f"[collect] {text}")

        try:
            wait("the recorder", lambda: st["recorder"].startswith("idle"))
            wait("the teleop node on 'joy'", lambda: joy.pub.get_subscription_count() > 0)
            if with_policy:
                wait("the policy to drive", lambda: st["source"] == "policy")
            attempt = 0
            while len(res.episodes) < plan.episodes:
                press_until("start_episode", "recording to start", lambda: st["recorder"].startswith("recording"))
                note(f"attempt {attempt}: {st['recorder']}")
                time.sleep(plan.policy_seconds)
                wait(f"{plan.policy_frames} frames", lambda: frames() >= plan.policy_frames, 60.0)
                note(f"source before takeover: {st['source']}")
                joy.hold("enable")
                sign = 1.0 if attempt % 2 == 0 else -1.0  # back and forth: the arm stays near home
                for name, v in (plan.stick or (("linear.x", 0.6),)):
                    joy.axis(name, sign * v)
                wait("teleop to take over", lambda: st["source"] == "teleop", 30.0)
                note("teleop took over")
                f0 = frames()
                time.sleep(plan.teleop_seconds)
                need = f0 + plan.teleop_frames
                wait(f"{plan.teleop_frames} teleop frames", lambda n=need: frames() >= n, 60.0)
                joy.release_all()
                time.sleep(plan.hold_seconds)
                discard = attempt in plan.discard
                press_until("discard_episode" if discard else "stop_episode", "the episode to end",
                            lambda: st["recorder"].startswith(("idle", "error")))
                if st["recorder"].startswith("error"):
                    raise RuntimeError(st["recorder"])
                note(f"attempt {attempt}: {'discarded' if discard else 'saved'}: {st['recorder']}")
                if not discard:
                    info = read_info(res.dataset)
                    res.episodes.append({"episode_index": info["total_episodes"] - 1})
                if with_policy:
                    press_until("resume_policy", "the policy to drive again", lambda: st["source"] == "policy")
                attempt += 1
        finally:
            stop.set()
            spin.join(timeout=2.0)
            ex.shutdown()
            node.destroy_node()
            rclpy.shutdown(context=ctx)
    import pyarrow.parquet as pq

    rows = []
    for f in sorted((res.dataset / "meta" / "episodes").glob("*/*.parquet")):
        rows += pq.read_table(f, columns=["episode_index", "length"]).to_pylist()
    res.episodes = rows
    return res
