"""Two policy nodes in different namespaces (two arms) share one policy server, each with its own state.

Real policy node processes over DDS (policy:=remote, token from $MAGMA_ROS_TOKEN) against a real
`PolicyServer`; the served policy keeps a sticky gripper per ``robot_id`` the way Magma does.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

TOKEN = "fleet-test-token"


class ArmStatePolicy:
    """Per-arm state like Magma's sticky gripper: ``close`` closes this arm's gripper until a reset."""

    def __init__(self):
        self.closed: set[str] = set()
        self.seen: set[str] = set()
        self.resets: list[str] = []
        self.lock = threading.Lock()

    def infer(self, obs):
        rid = obs["robot_id"]
        with self.lock:
            self.seen.add(rid)
            if "close" in obs["instruction"]:
                self.closed.add(rid)
            grip = 0.0 if rid in self.closed else 1.0
        return {"action": np.array([0.001, 0, 0, 0, 0, 0, grip], np.float32), "tokens": [], "latency_s": 0.0,
                "valid": True, "reason": ""}

    def reset(self, robot_id: str) -> None:
        with self.lock:
            self.resets.append(robot_id)
            self.closed.discard(robot_id)

    def metadata(self):
        return {"policy": "arm_state", "step_period": 0.2}


@pytest.mark.slow
def test_two_namespaced_policy_nodes_share_one_server_with_separate_state(nodes, rclpy_node):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64, String

    from magma_ros.serve.server import PolicyServer, ServerConfig

    pol = ArmStatePolicy()
    srv = PolicyServer(pol, ServerConfig(port=0, token=TOKEN))
    port = srv.start_in_thread()
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    arms = {}
    try:
        for ns, task in (("/left", "close the gripper"), ("/right", "wave")):
            proc = nodes.start("policy", {"policy": "remote", "host": "127.0.0.1", "port": port, "robot": "fr3",
                                          "remote_timeout": 30.0, "image_timeout": 5.0},
                               namespace=ns, extra_env={"MAGMA_ROS_TOKEN": TOKEN})
            a = {"proc": proc, "grips": [], "diags": [],
                 "img": rclpy_node.create_publisher(Image, f"{ns}/camera/camera/color/image_raw", 2),
                 "instr": rclpy_node.create_publisher(String, f"{ns}/magma/instruction", latched)}
            rclpy_node.create_subscription(Float64, f"{ns}/magma/gripper", a["grips"].append, 50)
            rclpy_node.create_subscription(DiagnosticArray, f"{ns}/diagnostics",
                                           lambda m, a=a: a["diags"].extend(s for s in m.status if "policy" in s.name),
                                           20)
            from geometry_msgs.msg import TwistStamped  # a twist subscriber: the node acts only when heard

            rclpy_node.create_subscription(TwistStamped, f"{ns}/magma/ee_twist", lambda m: None, 10)
            a["instr"].publish(String(data=task))
            arms[ns] = a

        last = [0.0]

        def tick():
            if time.monotonic() - last[0] >= 0.1:
                last[0] = time.monotonic()
                for a in arms.values():
                    m = Image(height=24, width=32, encoding="rgb8", step=96, data=bytes(24 * 32 * 3))
                    m.header.stamp = rclpy_node.get_clock().now().to_msg()
                    a["img"].publish(m)

        def wait(pred, timeout):
            return rclpy_node.spin_until(lambda: (tick(), pred())[1], timeout)

        ok = wait(lambda: all(len(a["grips"]) >= 3 for a in arms.values()), 120)
        assert ok, nodes.dump()
        assert pol.seen == {"/left", "/right"}  # each node sent its namespace as its robot_id
        assert arms["/left"]["grips"][-1].data == 0.0 and arms["/right"]["grips"][-1].data == 1.0
        # a new instruction resets the left arm's state on the server, and only the left arm's
        n_right = len(arms["/right"]["grips"])
        with pol.lock:
            pol.resets.clear()  # (each node reset its own arm once, for its first instruction)
        arms["/left"]["instr"].publish(String(data="wave"))
        ok = wait(lambda: pol.resets and arms["/left"]["grips"][-1].data == 1.0
                  and len(arms["/right"]["grips"]) > n_right + 2, 60)
        assert ok, nodes.dump()
        assert pol.resets == ["/left"]
        assert all(m.data == 1.0 for m in arms["/right"]["grips"])
        ok = wait(lambda: all(a["diags"] for a in arms.values()), 30)
        assert ok, nodes.dump()
        for ns, a in arms.items():
            vals = {kv.key: kv.value for kv in a["diags"][-1].values}
            assert vals["remote_state"] == "connected" and vals["remote_robot_id"] == ns
        assert all(a["proc"].poll() is None for a in arms.values())
    finally:
        srv.stop()
