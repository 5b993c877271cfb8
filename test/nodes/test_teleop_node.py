"""Teleop node in its own process over DDS: Joy in (as joy_node sends it), teleop/ee_twist out.

Deadman, turbo only with it, the stop at release and at stale input, button services and e-stop; the
keyboard mode in a pseudo-terminal (pexpect), typed like a person types; the start-up errors.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from magma_ros.core.teleop import load_device_params, parse_layout

XBOX = parse_layout(load_device_params("xbox"), "xbox")
LB, RB = XBOX.enable_button, XBOX.enable_turbo_button
BTN = XBOX.buttons
SERVICES = ("recorder/start", "recorder/stop", "recorder/discard", "safety/resume_policy")


class Probe:
    """Plays joy_node (20 Hz autorepeat of the current state) and the services teleop calls."""

    def __init__(self, node):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Joy
        from std_msgs.msg import Empty, Float64
        from std_srvs.srv import Trigger

        self.node = node
        self.twists: list[np.ndarray] = []  # (6,) linear + angular, in arrival order
        self.frames: list[str] = []
        self.grippers: list[float] = []
        self.estops = 0
        self.calls: list[str] = []
        self.resume_answers: list[tuple[bool, str]] = []  # scripted answers of safety/resume_policy
        self.joy_pub = node.create_publisher(Joy, "joy", 10)
        self._Joy = Joy
        self.axes = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        self.buttons = [0] * 11
        self.joy_on = True
        self._next_joy = 0.0

        def on_twist(m):
            t = m.twist
            self.twists.append(np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z]))
            self.frames.append(m.header.frame_id)

        node.create_subscription(TwistStamped, "teleop/ee_twist", on_twist, 50)
        node.create_subscription(Float64, "teleop/gripper", lambda m: self.grippers.append(m.data), 10)
        self.diag: dict[str, str] = {}  # the teleop node's latest diagnostics values

        def on_diag(m):
            for st in m.status:
                if st.name == "magma_ros: teleop":
                    self.diag = {kv.key: kv.value for kv in st.values}

        node.create_subscription(DiagnosticArray, "diagnostics", on_diag, 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(Empty, "safety/estop", lambda m: setattr(self, "estops", self.estops + 1), latched)
        for srv in SERVICES:
            def serve(req, resp, srv=srv):
                self.calls.append(srv)
                ok, msg = (self.resume_answers.pop(0) if srv == "safety/resume_policy" and self.resume_answers
                           else (True, "done"))
                resp.success, resp.message = ok, msg
                return resp
            node.create_service(Trigger, srv, serve)

    def set(self, axes=None, buttons=()):
        """The device state from now on (joy_node publishes it at once and then at 20 Hz)."""
        self.axes = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        for i, v in (axes or {}).items():
            self.axes[i] = v
        self.buttons = [1 if i in buttons else 0 for i in range(11)]
        self._next_joy = 0.0

    def _tick(self):
        now = time.monotonic()
        if self.joy_on and now >= self._next_joy:
            m = self._Joy(axes=[float(a) for a in self.axes], buttons=list(self.buttons))
            m.header.stamp = self.node.get_clock().now().to_msg()
            self.joy_pub.publish(m)
            self._next_joy = now + 0.05

    def wait(self, pred, timeout=10.0):
        def p():
            self._tick()
            return pred()
        return self.node.spin_until(p, timeout, step=0.01)

    def hold(self, seconds):
        self.wait(lambda: False, seconds)


def start_teleop(nodes, **params):
    return nodes.start("teleop", {"device": "xbox", "robot": "fr3", "period": 0.1, **params})


def connected(probe, p, nodes):
    ok = probe.wait(lambda: probe.joy_pub.get_subscription_count() > 0
                    and probe.node.count_publishers("teleop/ee_twist") > 0, 30)
    assert ok, nodes.log(p)


def test_joy_deadman_turbo_release_and_stale_input(nodes, rclpy_node):
    probe = Probe(rclpy_node)
    p = start_teleop(nodes)
    connected(probe, p, nodes)
    probe.set()
    probe.hold(0.5)  # released: armed, nothing sent
    assert probe.twists == []

    # turbo alone with the stick pushed: nothing moves (teleop_twist_joy would drive at turbo speed)
    probe.set(axes={1: 1.0, 0: 1.0}, buttons=[RB])
    probe.hold(1.5)
    assert probe.twists == [], nodes.log(p)

    # deadman + stick: base-frame x at scale_linear.x, in the robot's base frame
    probe.set(axes={1: 1.0}, buttons=[LB])
    assert probe.wait(lambda: len(probe.twists) >= 5, 10), nodes.log(p)
    np.testing.assert_allclose(probe.twists[-1], [0.05, 0, 0, 0, 0, 0], atol=1e-9)
    assert set(probe.frames) == {"fr3_link0"}
    assert probe.wait(lambda: probe.diag.get("engaged") == "True", 5), probe.diag
    # + turbo: the turbo scale, only because the deadman is held
    n = len(probe.twists)
    probe.set(axes={1: 1.0}, buttons=[LB, RB])
    assert probe.wait(lambda: len(probe.twists) >= n + 4, 10)
    np.testing.assert_allclose(probe.twists[-1][0], 0.15)

    # release the deadman, stick still pushed: a zero twist, once more, then nothing
    probe.set(axes={1: 1.0}, buttons=[RB])
    assert probe.wait(lambda: not np.any(probe.twists[-1]), 10), nodes.log(p)
    probe.hold(1.5)
    tail = [bool(np.any(t)) for t in probe.twists]
    first_zero = tail.index(False)
    assert not any(tail[first_zero:]), "motion after the deadman release"
    assert len(tail) - first_zero == 2, f"{len(tail) - first_zero} zero twists (one at once, one a period later)"

    # joy_node dies while the deadman is held: a zero twist, then silence
    probe.set()
    probe.hold(0.3)
    probe.set(axes={1: -1.0}, buttons=[LB])
    n = len(probe.twists)
    assert probe.wait(lambda: len(probe.twists) >= n + 3, 10)
    assert probe.twists[n][0] == pytest.approx(-0.05)
    probe.joy_on = False
    assert probe.wait(lambda: not np.any(probe.twists[-1]), 10), nodes.log(p)
    probe.hold(1.0)
    m = len(probe.twists)
    assert not any(np.any(t) for t in probe.twists[next(i for i in range(n, m) if not np.any(probe.twists[i])):])
    # ... and comes back with the deadman still held: no motion until it is released and pressed again
    probe.joy_on = True
    probe.hold(1.0)
    assert len(probe.twists) == m, "motion resumed without a new deadman press"
    probe.set()
    probe.hold(0.2)
    probe.set(axes={1: -1.0}, buttons=[LB])
    assert probe.wait(lambda: len(probe.twists) > m + 2, 10)
    assert probe.twists[-1][0] == pytest.approx(-0.05)
    probe.set()
    assert "deadman released" in nodes.log(p) and "input stale" in nodes.log(p)
    probe.joy_on = False
    assert probe.wait(lambda: probe.diag.get("reason") == "input stale", 5), probe.diag


def test_joy_buttons_call_the_services_and_estop(nodes, rclpy_node):
    probe = Probe(rclpy_node)
    p = start_teleop(nodes)
    connected(probe, p, nodes)
    assert probe.wait(lambda: all(probe.node.count_clients(s) > 0 for s in SERVICES), 20)
    time.sleep(1.0)  # service discovery on the client side

    def press(button, extra=()):
        probe.set(buttons=[button, *extra])
        probe.hold(0.25)
        probe.set(buttons=list(extra))
        probe.hold(0.25)

    probe.set()
    probe.hold(0.3)
    for b, srv in ((BTN["start_episode"], "recorder/start"), (BTN["stop_episode"], "recorder/stop"),
                   (BTN["discard_episode"], "recorder/discard")):
        press(b)
        assert probe.wait(lambda s=srv: s in probe.calls, 10), (srv, probe.calls, nodes.log(p))
    assert probe.calls == ["recorder/start", "recorder/stop", "recorder/discard"]  # one call per press

    # hand-back while the safety node still sees teleop: retried until accepted
    probe.resume_answers = [(False, "teleop is driving: let it go silent first")] * 2
    press(BTN["resume_policy"])
    assert probe.wait(lambda: probe.calls.count("safety/resume_policy") == 3, 10), (probe.calls, nodes.log(p))
    probe.hold(0.5)
    assert probe.calls.count("safety/resume_policy") == 3
    # a refusal that lasts (e-stop latched) is reported once resume_retry (3 s) is over
    probe.resume_answers = [(False, "e-stop latched: call safety/reset first")] * 100
    press(BTN["resume_policy"])
    assert probe.wait(lambda: "safety/resume_policy: refused: e-stop latched" in nodes.log(p), 15), nodes.log(p)
    n_calls = probe.calls.count("safety/resume_policy")
    probe.hold(1.0)
    assert probe.calls.count("safety/resume_policy") == n_calls  # no more retries
    probe.resume_answers = []
    # ... refused while the deadman is held
    press(BTN["resume_policy"], extra=[LB])
    probe.hold(0.5)
    assert probe.calls.count("safety/resume_policy") == n_calls and "release the deadman first" in nodes.log(p)

    # gripper: only with the deadman, after a twist (the servo anchors on the first twist of a session)
    probe.set()
    probe.hold(0.3)
    press(BTN["gripper_close"], extra=[LB])
    assert probe.wait(lambda: probe.grippers == [0.0], 5)
    press(BTN["gripper_open"])  # no deadman: ignored
    probe.hold(0.3)
    assert probe.grippers == [0.0]

    press(BTN["estop"])
    assert probe.wait(lambda: probe.estops == 1, 10), nodes.log(p)


def test_bad_device_and_keyboard_without_a_terminal_are_one_line_errors(ros_env):
    base = [sys.executable, "-m", "magma_ros.nodes.teleop", "--ros-args"]
    for params, text in ((["-p", "device:=xbxo"], "did you mean 'xbox'"),
                         (["-p", "device:=keyboard"], "needs a terminal"),
                         (["-p", "device:=xbox", "-p", "enable_button:=-1"], "needs a deadman")):
        r = subprocess.run(base + params, env=ros_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, (params, r.stdout, r.stderr)
        err = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(err) == 1 and text in err[0], r.stderr


def test_keyboard_mode_in_a_pseudo_terminal(ros_env, rclpy_node):
    import pexpect

    probe = Probe(rclpy_node)
    probe.joy_on = False
    child = pexpect.spawn(sys.executable, ["-m", "magma_ros.nodes.teleop", "--ros-args", "-p", "device:=keyboard",
                                           "-p", "robot:=panda", "-p", "period:=0.1"],
                          env=ros_env, encoding="utf-8", timeout=30, dimensions=(24, 200))
    out = []

    def drain():
        try:
            while True:
                out.append(child.read_nonblocking(4096, timeout=0))
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass

    def wait(pred, timeout=10.0):
        return probe.wait(lambda: (drain(), pred())[1], timeout)

    def text():
        return "".join(out)

    def hold(key, seconds, every=0.033):  # a held key: the terminal's autorepeat
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            child.send(key)
            wait(lambda: False, every)

    try:
        assert wait(lambda: "hold a key to move" in text(), 60), text()
        assert wait(lambda: probe.node.count_publishers("teleop/ee_twist") > 0, 30)
        assert wait(lambda: probe.node.count_clients("recorder/start") > 0, 30)
        wait(lambda: False, 2.0)  # discovery both ways

        hold("w", 1.0)  # w held: +x
        assert wait(lambda: sum(bool(np.any(t)) for t in probe.twists) >= 3, 10), text()
        # (a key repeat delayed past key_timeout by the load reads as a release: zeros may be mixed in)
        assert all(np.allclose(t, [0.05, 0, 0, 0, 0, 0]) for t in probe.twists if np.any(t))
        assert "panda_link0" in probe.frames
        assert wait(lambda: not np.any(probe.twists[-1]), 5)  # let go: stops
        assert wait(lambda: "stopped (deadman released)" in text(), 5), text()
        wait(lambda: False, 0.5)
        n = len(probe.twists)
        wait(lambda: False, 1.0)
        assert len(probe.twists) == n, "twists while no key is held"

        hold("L", 0.6)  # Shift+l: yaw minus at the turbo scale; the status line says so
        assert wait(lambda: "MOVING TURBO" in text(), 5), text()
        moving = [t for t in probe.twists[n:] if np.any(t)]
        assert moving and all(np.allclose(t, [0, 0, 0, 0, 0, -0.8]) for t in moving)
        child.send(" ")  # space: stop at once
        assert wait(lambda: not np.any(probe.twists[-1]), 5)

        hold("\x1b[A", 0.3)  # arrow keys are not 'A' (+y turbo)
        wait(lambda: False, 0.5)
        assert not any(abs(t[1]) > 0 for t in probe.twists)

        n = len(probe.twists)
        child.send("c")  # gripper key, no motion key: a zero twist (the servo's step) and the gripper
        assert wait(lambda: probe.grippers == [0.0] and len(probe.twists) > n, 10), text()
        assert not np.any(probe.twists[-1])

        for key, srv in (("b", "recorder/start"), ("n", "recorder/stop"), ("x", "recorder/discard"),
                         ("p", "safety/resume_policy")):
            child.send(key)
            assert wait(lambda s=srv: s in probe.calls, 10), (srv, probe.calls, text())
        assert wait(lambda: "safety/resume_policy: ok" in text(), 5), text()
        child.send("e")
        assert wait(lambda: probe.estops == 1, 10), text()
        assert wait(lambda: "E-STOP sent" in text(), 5)
        last = text().split("\r")[-1]
        assert last.count("teleop[keyboard]") == 1 and "\n" not in last  # one live status line
    finally:
        child.sendintr()  # Ctrl-C: a clean exit, the terminal restored
        child.expect(pexpect.EOF, timeout=20)
        child.close()
    assert child.exitstatus == 0, text()


def test_spacemouse_twist_input_needs_the_joy_deadman(nodes, rclpy_node):
    """spacenav_node's Twist as the motion source: scaled like the Joy axes, still nothing without the button."""
    from geometry_msgs.msg import Twist
    from sensor_msgs.msg import Joy

    probe = Probe(rclpy_node)
    joy = rclpy_node.create_publisher(Joy, "spacenav/joy", 10)
    twist = rclpy_node.create_publisher(Twist, "spacenav/twist", 10)
    p = nodes.start("teleop", {"device": "spacemouse", "twist_topic": "spacenav/twist", "period": 0.1})
    assert probe.wait(lambda: joy.get_subscription_count() > 0 and twist.get_subscription_count() > 0
                      and probe.node.count_publishers("teleop/ee_twist") > 0, 30), nodes.log(p)
    probe.joy_on = False
    state = {"button": 0}

    def pump(seconds):  # spacenav_node while the puck is pushed: Twist and Joy keep coming
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            m = Twist()
            m.linear.z, m.angular.x = 0.6, -1.0
            twist.publish(m)
            joy.publish(Joy(axes=[0.0] * 6, buttons=[state["button"], 0]))  # motion only in the Twist
            probe.wait(lambda: False, 0.03)

    pump(1.0)  # no button: no motion
    assert probe.twists == []
    state["button"] = 1
    pump(1.0)
    assert probe.twists, nodes.log(p)
    dz = (0.6 - 0.1) / 0.9  # deadzone 0.1, rescaled
    np.testing.assert_allclose(probe.twists[-1], [0, 0, 0.1 * dz, -0.5, 0, 0], atol=1e-9)
    state["button"] = 0
    pump(0.5)
    assert not np.any(probe.twists[-1])
