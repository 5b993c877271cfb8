"""Policy node over DDS in its own process: scripted and tiny-checkpoint policies, staleness, ToM."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from _geometry import exp_so3, rot

T = 0.2
SCRIPT = [[0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
          [0.0, -0.02, 0.004, 0.1, -0.05, 0.2, 0.0],
          [0.0, 0.0, -0.01, 0.0, 0.0, 0.0, 1.0]]


def script_param(rows) -> str:
    return "; ".join(",".join(str(v) for v in r) for r in rows)


def to_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def stamp_of(t: float):
    from builtin_interfaces.msg import Time

    sec = int(math.floor(t))
    return Time(sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


class Probe:
    """Camera + instruction publisher and collector of everything the policy node emits."""

    def __init__(self, node, instruction: str | None = "pick up the red cube", listen: bool = True):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float64, String
        from visualization_msgs.msg import MarkerArray

        self.node = node
        self.twists, self.grippers, self.diags, self.toms, self.tom_imgs = [], [], [], [], []
        self.sent: dict[float, int] = {}  # image stamp -> frame index
        self.img_pub = node.create_publisher(Image, "camera/camera/color/image_raw", 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.instr_pub = node.create_publisher(String, "magma/instruction", latched)
        if instruction is not None:
            self.instr_pub.publish(String(data=instruction))
        self._twist_sub = (lambda: node.create_subscription(TwistStamped, "magma/ee_twist", self.twists.append, 50))
        if listen:  # else the test subscribes later (`listen()`)
            self.listen()
        node.create_subscription(Float64, "magma/gripper", self.grippers.append, 50)
        node.create_subscription(DiagnosticArray, "diagnostics",
                                 lambda m: self.diags.extend(s for s in m.status if "policy" in s.name), 50)
        node.create_subscription(MarkerArray, "magma/tom", self.toms.append, 10)
        node.create_subscription(Image, "magma/tom/image", self.tom_imgs.append, 10)
        self._Image = Image
        self.k = 0
        self.camera_on = True
        self.age = 0.0  # publish images stamped this many seconds in the past
        self.encoding = "rgb8"
        self._last = 0.0

    def listen(self):
        self._twist_sub()

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def frame(self, stamp: float):
        m = self._Image()
        m.header.stamp = stamp_of(stamp)
        m.header.frame_id = "camera_color_optical_frame"
        h, w = 48, 64
        a = np.zeros((h, w, 3), np.uint8)
        a[8:20, 10:30] = (200, 30, 30)  # a red block: corners for ToM marks
        a[30:40, 40:60] = (30, 30, 200)
        a[0, 0] = (self.k % 256, 0, 0)
        m.height, m.width, m.encoding, m.step = h, w, self.encoding, w * 3
        m.data = (a[:, :, ::-1] if self.encoding == "bgr8" else a).tobytes()
        return m

    def tick(self):
        if self.camera_on and time.monotonic() - self._last >= 0.04:  # 25 Hz camera
            self._last = time.monotonic()
            self.k += 1
            stamp = round(self.now() - self.age, 6)
            self.sent[stamp] = self.k
            self.img_pub.publish(self.frame(stamp))

    def wait(self, pred, timeout):
        def p():
            self.tick()
            return pred()
        return self.node.spin_until(p, timeout, step=0.01)

    def diag_values(self) -> dict:
        return {kv.key: kv.value for kv in self.diags[-1].values} if self.diags else {}


def wait_ready(probe, nodes, proc, timeout=60.0):
    ok = probe.wait(lambda: probe.img_pub.get_subscription_count() > 0, timeout)
    assert ok and proc.poll() is None, nodes.dump()


def test_image_conversion_handles_bgr_padding_and_rejects_unknown_encodings():
    from sensor_msgs.msg import Image

    from magma_ros.nodes.policy import image_to_rgb

    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    m = Image(height=2, width=3, encoding="bgr8", step=12)  # 3 bytes of row padding
    rows = [np.concatenate([rgb[r, :, ::-1].ravel(), [0, 0, 0]]) for r in range(2)]
    m.data = np.concatenate(rows).astype(np.uint8).tobytes()
    assert np.array_equal(image_to_rgb(m), rgb)
    m2 = Image(height=2, width=3, encoding="rgb8", step=9, data=rgb.tobytes())
    assert np.array_equal(image_to_rgb(m2), rgb)
    with pytest.raises(ValueError, match="encoding"):
        image_to_rgb(Image(height=2, width=3, encoding="16UC1", step=6, data=bytes(12)))
    with pytest.raises(ValueError, match="does not match"):
        image_to_rgb(Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(10)))


def test_no_action_is_spent_before_a_servo_listens(nodes, rclpy_node):
    """With nobody subscribed to magma/ee_twist the node does not act (a twist published before DDS
    matched the servo is lost) and says why; the first subscriber gets the script's first action."""
    proc = nodes.start("policy", {"policy": "scripted", "robot": "fr3", "step_period": T,
                                  "scripted_actions": script_param(SCRIPT), "image_timeout": 0.5,
                                  "diagnostics_period": 0.2})
    probe = Probe(rclpy_node, listen=False)
    wait_ready(probe, nodes, proc)
    assert probe.wait(lambda: probe.diags and "waiting for a subscriber" in probe.diags[-1].message, 30.0), \
        nodes.dump()
    assert probe.diag_values()["published"] == "0" and probe.diag_values()["twist_subscribers"] == "0"
    probe.wait(lambda: False, 1.0)  # frames keep coming meanwhile
    assert probe.diag_values()["published"] == "0"
    probe.listen()
    assert probe.wait(lambda: len(probe.twists) >= 1, 30.0), nodes.dump()
    first = probe.twists[0].twist.linear
    assert np.allclose(np.array([first.x, first.y, first.z]) * T, SCRIPT[0][:3], atol=1e-9)


def test_scripted_policy_publishes_twists_with_the_image_stamp(nodes, rclpy_node):
    from magma_ros.core.robot import load_robot

    proc = nodes.start("policy", {"policy": "scripted", "robot": "wx250s", "step_period": T,
                                  "scripted_actions": script_param(SCRIPT), "image_timeout": 0.5})
    probe = Probe(rclpy_node)
    probe.encoding = "bgr8"
    wait_ready(probe, nodes, proc)
    assert probe.wait(lambda: len(probe.twists) >= 3 and len(probe.grippers) >= 3, 30.0), nodes.dump()
    base = load_robot("wx250s").base_link
    stamps = []
    for tw, g, a in zip(probe.twists, probe.grippers, SCRIPT):
        st = round(to_s(tw.header.stamp), 6)
        assert st in probe.sent, "twist stamp is not one of the image stamps"
        stamps.append(st)
        assert tw.header.frame_id == base
        lin = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z])
        ang = np.array([tw.twist.angular.x, tw.twist.angular.y, tw.twist.angular.z])
        assert np.allclose(lin * T, a[:3], atol=1e-9)
        want = rot("z", a[5]) @ rot("y", a[4]) @ rot("x", a[3])  # SimplerEnv euler2axangle (sxyz)
        assert np.allclose(exp_so3(ang * T), want, atol=1e-9)
        assert g.data == pytest.approx(a[6])
    assert np.all(np.diff(stamps) >= 0.9 * T)  # one action per step period, never faster
    # the script is over: the node holds (no more twists) and says why
    n = len(probe.twists)
    assert probe.wait(lambda: probe.diags and "script finished" in probe.diags[-1].message, 10.0)
    assert len(probe.twists) == n
    assert proc.poll() is None


def test_stale_or_missing_camera_publishes_nothing_and_reports(nodes, rclpy_node):
    proc = nodes.start("policy", {"policy": "scripted", "robot": "fr3", "step_period": T,
                                  "scripted_actions": script_param(SCRIPT[:1]), "scripted_loop": True,
                                  "image_timeout": 0.5})
    probe = Probe(rclpy_node)
    probe.age = 1.0  # every frame 1 s old by its stamp (> image_timeout)
    wait_ready(probe, nodes, proc)
    assert probe.wait(lambda: any("stale image" in d.message for d in probe.diags), 20.0), nodes.dump()
    probe.wait(lambda: False, 1.0)
    assert probe.twists == []
    # fresh frames: actions flow at <= 1 per step period although the camera runs at 25 Hz
    probe.age = 0.0
    t0 = probe.now()
    assert probe.wait(lambda: len(probe.twists) >= 3, 20.0), nodes.dump()
    probe.wait(lambda: False, 1.0)
    span = probe.now() - t0
    assert len(probe.twists) <= span / T + 2
    vals = probe.diag_values()
    assert int(vals["dropped_frames"]) + int(vals["inferences"]) > 0 and float(vals["inference_rate_hz"]) > 0
    # camera stops: nothing more is published, diagnostics report a stale camera
    probe.camera_on = False
    probe.wait(lambda: False, 0.3)
    n = len(probe.twists)
    assert probe.wait(lambda: probe.diags and "camera stale" in probe.diags[-1].message, 10.0)
    assert len(probe.twists) == n
    assert proc.poll() is None


def test_remote_policy_takes_the_step_period_from_the_server(nodes, rclpy_node):
    from magma_ros.core.policy_loop import ScriptedPolicy
    from magma_ros.serve.server import PolicyServer, ServerConfig

    period = 1.0 / 3.0  # Google robot / RT-1 rate, known only to the server
    server = PolicyServer(ScriptedPolicy(SCRIPT, loop=True, step_period=period),
                          ServerConfig(port=0, token="node-test-token"))
    port = server.start_in_thread()
    try:
        proc = nodes.start("policy", {"policy": "remote", "host": "127.0.0.1", "port": port, "robot": "fr3"},
                           extra_env={"MAGMA_ROS_TOKEN": "node-test-token"})
        probe = Probe(rclpy_node)
        wait_ready(probe, nodes, proc)
        assert probe.wait(lambda: len(probe.twists) >= 2, 30.0), nodes.dump()
        for tw, a in zip(probe.twists, SCRIPT):
            lin = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z])
            assert np.allclose(lin * period, a[:3], atol=1e-9)
        st = [to_s(t.header.stamp) for t in probe.twists]
        assert np.all(np.diff(st) >= 0.9 * period)
        # the server goes away: nothing is published, the node stays up and reports
        server.stop()
        n = len(probe.twists)
        ok = probe.wait(lambda: any("policy error" in d.message for d in probe.diags), 30.0)
        assert ok, nodes.dump()
        assert len(probe.twists) <= n + 1 and proc.poll() is None
    finally:
        server.stop()


# ----------------------------------------------------------------------------- tiny real checkpoint
# (the session-wide `tiny_checkpoint` fixture from conftest.py)


@pytest.mark.slow
def test_tiny_checkpoint_invalid_actions_are_not_published_and_tom_is(nodes, rclpy_node, tiny_checkpoint):
    proc = nodes.start("policy", {"policy": "local", "model": str(tiny_checkpoint), "device": "cpu",
                                  "robot": "fr3", "image_timeout": 30.0, "tom_rate": 1.0, "tom_marks": 4,
                                  "tom_max_tokens": 24})
    probe = Probe(rclpy_node)
    wait_ready(probe, nodes, proc, timeout=180.0)
    ok = probe.wait(lambda: probe.diags and int(probe.diag_values().get("invalid", 0)) >= 2
                    and probe.toms and probe.tom_imgs, 240.0)
    assert ok, nodes.dump()
    assert probe.twists == [] and probe.grippers == []  # random weights: non-action tokens -> nothing
    assert any("non-action tokens" in d.message for d in probe.diags)
    assert float(probe.diag_values()["step_period_s"]) == pytest.approx(0.2)  # bridge_orig statistics
    # ToM: one LINE_STRIP per mark, in image pixel coordinates, and an overlay of the frame's size
    from visualization_msgs.msg import Marker

    ma = probe.toms[-1]
    assert len(ma.markers) == 4
    for mk in ma.markers:
        assert mk.type == Marker.LINE_STRIP and len(mk.points) >= 1
        assert all(0 <= p.x <= 64 and 0 <= p.y <= 48 for p in mk.points)
    im = probe.tom_imgs[-1]
    assert (im.width, im.height, im.encoding) == (64, 48, "rgb8")
    overlay = np.frombuffer(im.data, np.uint8).reshape(48, 64, 3)
    plain = np.frombuffer(probe.frame(0.0).data, np.uint8).reshape(48, 64, 3)
    assert np.abs(overlay.astype(int) - plain.astype(int)).sum() > 0  # marks drawn
    assert round(to_s(im.header.stamp), 6) in probe.sent
    assert proc.poll() is None


@pytest.mark.slow
def test_tiny_checkpoint_constrained_publishes_a_twist(nodes, rclpy_node, tiny_checkpoint):
    # sampled decoding as in Magma's evaluation (T 0.7, top-k 50), seeded: the node's sampling
    # parameters reach the policy and constrained sampling still yields action tokens
    proc = nodes.start("policy", {"policy": "local", "model": str(tiny_checkpoint), "device": "cpu",
                                  "robot": "panda", "constrained": True, "image_timeout": 30.0,
                                  "temperature": 0.7, "top_k": 50, "seed": 3})
    probe = Probe(rclpy_node)
    wait_ready(probe, nodes, proc, timeout=180.0)
    assert probe.wait(lambda: len(probe.twists) >= 1, 240.0), nodes.dump()
    tw = probe.twists[0]
    assert tw.header.frame_id == "panda_link0"
    assert round(to_s(tw.header.stamp), 6) in probe.sent
    lin = np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z])
    assert np.all(np.isfinite(lin)) and np.linalg.norm(lin * T) < 0.1  # within Bridge's q01..q99 box
    assert probe.wait(lambda: len(probe.grippers) >= 1, 10.0)
    assert probe.grippers[0].data in (0.0, 1.0)  # Bridge gripper is binarized


# --------------------------------------------------------------------------- questions, ToM in 3-D
def _answers(node):
    from std_msgs.msg import String

    out = []
    pub = node.create_publisher(String, "magma/ask", 10)
    node.create_subscription(String, "magma/answer", out.append, 10)
    return pub, out, String


def test_questions_on_the_topic_are_answered_on_recent_frames(nodes, rclpy_node, tiny_checkpoint):
    proc = nodes.start("policy", {"policy": "local", "model": str(tiny_checkpoint), "device": "cpu",
                                  "robot": "fr3", "image_timeout": 30.0, "ask_frame_spacing": 0.05,
                                  "ask_max_tokens": 3})
    probe = Probe(rclpy_node, instruction=None)
    pub, answers, String = _answers(rclpy_node)
    wait_ready(probe, nodes, proc, timeout=180.0)
    assert probe.wait(lambda: pub.get_subscription_count() > 0, 30.0), nodes.dump()
    probe.wait(lambda: False, 2.0)  # ~50 frames at 25 Hz reach the node: its clip ring fills
    pub.publish(String(data="[frames=3] What is on the table?"))
    pub.publish(String(data="   "))
    assert probe.wait(lambda: len(answers) >= 2, 240.0), nodes.dump()
    assert answers[0].data == "(no answer: empty question)"  # refused at once, never queued
    assert isinstance(answers[1].data, str) and not answers[1].data.startswith("(no answer")
    log = nodes.log(proc)
    line = next(x for x in log.splitlines() if "answer: 'What is on the table?'" in x)
    assert "on 3 frame(s)" in line
    stamps = [float(v) for v in line.split("[stamps ")[1].split("]")[0].split(", ")]
    assert len(stamps) == 3 and stamps == sorted(stamps)
    sent = np.array(sorted(probe.sent))
    assert all(np.abs(sent - s).min() < 1e-3 for s in stamps)  # real frames the node received
    assert probe.twists == []  # no instruction: no action, questions still answered


def test_questions_without_a_local_model_get_a_reason(nodes, rclpy_node):
    proc = nodes.start("policy", {"policy": "scripted", "scripted_actions": script_param(SCRIPT),
                                  "require_subscriber": False})
    pub, answers, String = _answers(rclpy_node)
    assert rclpy_node.spin_until(lambda: pub.get_subscription_count() > 0, 60.0), nodes.dump()
    time.sleep(1.0)
    pub.publish(String(data="what do you see?"))
    assert rclpy_node.spin_until(lambda: answers, 30.0), nodes.dump()
    assert answers[0].data == "(no answer: questions need policy:=local (policy:=scripted))"
    assert proc.poll() is None


def test_action_source_tom_needs_tom_plans(nodes):
    proc = nodes.start("policy", {"policy": "scripted", "scripted_actions": script_param(SCRIPT),
                                  "action_source": "tom"})
    assert proc.wait(60) == 2
    assert "action_source:=tom follows ToM plans in 3-D" in nodes.log(proc)


@pytest.mark.slow
def test_tom_plans_in_3d_from_the_simulated_camera(nodes, rclpy_node, tiny_checkpoint):
    """Sim camera (colour + aligned depth + camera_info) -> ToM -> base-frame markers and the gripper path.

    With random weights the traces are just the marks; mark 1 sits on the TCP's pixel and its 3-D start is
    the TCP; the other marks land on the rendered scene.
    """
    from nav_msgs.msg import Path
    from visualization_msgs.msg import MarkerArray

    from magma_ros.core.kinematics import Kinematics

    nodes.start("sim", {"robot": "fr3", "camera_fps": 5.0, "width": 320, "height": 240, "use_sim_time": True})
    proc = nodes.start("policy", {"policy": "local", "model": str(tiny_checkpoint), "device": "cpu",
                                  "robot": "fr3", "tom_rate": 1.0, "tom_marks": 4, "tom_max_tokens": 8,
                                  "image_timeout": 30.0, "use_sim_time": True,
                                  "instruction": "pick up the red cube"})
    from diagnostic_msgs.msg import DiagnosticArray

    paths, m3d, diags = [], [], []
    rclpy_node.create_subscription(DiagnosticArray, "diagnostics",
                                   lambda m: diags.extend(s for s in m.status if "policy" in s.name), 50)
    rclpy_node.create_subscription(Path, "magma/tom/path", paths.append, 10)
    rclpy_node.create_subscription(MarkerArray, "magma/tom/markers_3d", m3d.append, 10)
    assert rclpy_node.spin_until(lambda: paths and m3d and any(
        kv.key == "tom_3d_plans" and kv.value != "0" for s in diags for kv in s.values), 400.0), nodes.dump()
    assert proc.poll() is None
    ma = m3d[-1]
    assert ma.markers and all(mk.header.frame_id == "fr3_link0" for mk in ma.markers)
    pts = np.array([[p.x, p.y, p.z] for mk in ma.markers for p in mk.points])
    # on the table (z 0), the cubes, the arm or the floor (z -0.75) of the scene
    assert pts[:, 2].min() > -0.76 and np.abs(pts[:, :2]).max() < 3.5
    p = paths[-1]
    assert p.header.frame_id == "fr3_link0" and len(p.poses) >= 1
    start = np.array([p.poses[0].pose.position.x, p.poses[0].pose.position.y, p.poses[0].pose.position.z])
    kin = Kinematics("fr3")
    tcp = kin.fk(kin.robot.home)[:3, 3]  # no actions (random weights): the arm stays at home
    # mark 1 was placed on the gripper: its path starts at the TCP (the pixel itself sees past the fingers)
    assert np.linalg.norm(start - tcp) < 0.002, (start, tcp)
    green = [mk for mk in ma.markers if mk.color.g > 0.8]
    assert len(green) == 1  # the gripper mark's marker
    d = {kv.key: kv.value for s in diags for kv in s.values}
    assert int(d["tom_3d_plans"]) >= 1 and "tom_3d_points_dropped" in d
