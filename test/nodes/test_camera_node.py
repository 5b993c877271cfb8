"""Camera node over DDS: publishing + reconnect with the fake device; no-device behaviour (pyrealsense2)."""

from __future__ import annotations

import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import CameraInfo, Image

from magma_ros.core.realsense import DeviceError, FakeRealSense, RealSenseDevice, StreamConfig

WAIT = 60.0  # [s wall], generous for a loaded machine


def _t(stamp) -> float:
    return stamp.sec + 1e-9 * stamp.nanosec


class Probe:
    def __init__(self, node):
        self.node = node
        self.color: list[tuple[float, Image]] = []
        self.depth: list[Image] = []
        self.info: list[CameraInfo] = []
        self.diag: list[DiagnosticArray] = []
        node.create_subscription(Image, "camera/camera/color/image_raw",
                                 lambda m: self.color.append((time.monotonic(), m)), 50)
        node.create_subscription(Image, "camera/camera/aligned_depth_to_color/image_raw",
                                 self.depth.append, 50)
        node.create_subscription(CameraInfo, "camera/camera/color/camera_info", self.info.append, 50)
        node.create_subscription(DiagnosticArray, "diagnostics", self.diag.append, 10)


def test_fake_device_publishes_consistent_frames_and_reconnects_after_unplug(nodes, rclpy_node):
    proc = nodes.start("camera", {"device": "fake", "width": 160, "height": 120, "fps": 15,
                                  "fake_unplug_after": 20, "fake_unplug_for": 1.5, "reconnect_period": 0.2,
                                  "frame_timeout": 0.5})
    pr = Probe(rclpy_node)
    # frames before the unplug, then (after a gap) frames again from the reconnected device
    first = rclpy_node.spin_until(lambda: min(len(pr.color), len(pr.depth), len(pr.info)) >= 5, WAIT)
    assert first, nodes.log(proc)

    # the fake unplugs every 20 frames: the node logs the loss, reconnects, and frames flow again
    # (count connections from now on: discovery may have taken longer than the first cycle)
    k = nodes.log(proc).count("streaming from FakeRealSense")
    assert rclpy_node.spin_until(lambda: nodes.log(proc).count("streaming from FakeRealSense") > k, WAIT), \
        nodes.log(proc)
    n_at_reconnect = len(pr.color)
    assert rclpy_node.spin_until(lambda: len(pr.color) >= n_at_reconnect + 3, WAIT), nodes.log(proc)
    assert proc.poll() is None
    log = nodes.log(proc)
    assert log.index("device lost") < log.rindex("streaming from FakeRealSense")
    arrivals = np.array([a for a, _ in pr.color])
    assert np.diff(arrivals).max() > 1.0  # the unplug really interrupted the stream (1.5 s)

    # the three topics of one frame carry the same stamp; encodings, sizes, units as realsense2_camera
    c_stamps = {_t(m.header.stamp) for _, m in pr.color}
    d_stamps = {_t(m.header.stamp) for m in pr.depth}
    i_stamps = {_t(m.header.stamp) for m in pr.info}
    common = c_stamps & d_stamps & i_stamps
    assert len(common) >= 0.8 * min(len(c_stamps), len(d_stamps), len(i_stamps))
    last = max(common)
    c = next(m for _, m in pr.color if _t(m.header.stamp) == last)
    d = next(m for m in pr.depth if _t(m.header.stamp) == last)
    assert (c.width, c.height, c.encoding, c.step) == (160, 120, "rgb8", 480)
    assert (d.width, d.height, d.encoding, d.step) == (160, 120, "16UC1", 320)
    assert c.header.frame_id == d.header.frame_id == "camera_color_optical_frame"
    depth = np.frombuffer(bytes(d.data), np.uint16).reshape(120, 160)
    assert np.median(depth) == 800  # the fake's plane, in mm
    K = np.array(pr.info[-1].k).reshape(3, 3)
    assert K[0, 0] > 0 and K[0, 2] == (160 - 1) / 2
    # diagnostics reported the loss and the recovery
    states = [v.value for a in pr.diag for s in a.status for v in s.values if v.key == "state"]
    assert "lost" in states and "streaming" in states


def test_no_device_is_a_clear_waiting_state(nodes, rclpy_node):
    proc = nodes.start("camera", {"device": "realsense", "reconnect_period": 0.5})
    pr = Probe(rclpy_node)
    assert rclpy_node.spin_until(lambda: any(s.level == b"\x02" for a in pr.diag for s in a.status), WAIT), \
        nodes.log(proc)
    rclpy_node.spin_until(lambda: False, 2.0)
    assert proc.poll() is None  # waits and retries, does not crash
    assert not pr.color
    log = nodes.log(proc)
    lines = [ln for ln in log.splitlines() if "no RealSense device connected" in ln]
    assert len(lines) == 1 and "retrying every 0.5 s" in lines[0]  # one line, not one per retry
    assert "Traceback" not in log


def test_realsense_device_without_hardware_raises_device_error():
    dev = RealSenseDevice(StreamConfig(width=640, height=480, fps=30))
    try:
        dev.start()
    except DeviceError as e:
        assert "no RealSense device" in str(e)
    else:  # a camera is plugged into this machine
        dev.stop()


def test_fake_device_unplug_and_replug():
    dev = FakeRealSense(StreamConfig(width=32, height=24, fps=200))
    dev.start()
    f = dev.wait_frames(1.0)
    assert f.color.shape == (24, 32, 3) and f.depth.shape == (24, 32) and f.depth.dtype == np.uint16
    dev.unplug()
    for call in (lambda: dev.wait_frames(1.0), dev.start):
        try:
            call()
        except DeviceError:
            pass
        else:
            raise AssertionError("an unplugged device must raise DeviceError")
    dev.plug()
    dev.start()
    assert dev.wait_frames(1.0).frame_number == 2
    assert dev.starts == 2
