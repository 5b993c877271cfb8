"""launch/collect.launch.yaml as the launch_yaml runner plans it (the same file runs under ros2 launch)."""

from __future__ import annotations

import pytest

from magma_ros.launch_runner import plan


def procs(args):
    return {p.label: p for p in plan("collect.launch.yaml", args).processes}


def test_sim_collection_graph():
    p = procs({"robot": "panda", "with_policy": "true", "policy": "scripted", "device": "ps5", "driver": "false",
               "out": "/data/s1", "resume": "true", "width": "320", "height": "240"})
    assert {"sim", "safety", "servo", "policy", "teleop", "teleop_servo", "recorder"} <= set(p)
    rec = p["recorder"].parameters
    assert rec["out"] == "/data/s1" and rec["resume"] is True and rec["robot"] == "panda"
    assert rec["use_sim_time"] is True and (rec["width"], rec["height"]) == (320, 240)
    assert rec["step_period"] == p["policy"].parameters["step_period"] == 0.2
    assert p["teleop"].parameters["device"] == "ps5" and p["teleop"].parameters["use_sim_time"] is True
    assert p["sim"].parameters["width"] == 320


def test_real_arm_and_keyboard():
    p = procs({"robot": "fr3", "sim": "false", "camera": "external", "device": "keyboard", "out": "rec"})
    assert "sim" not in p and "recorder" in p and "teleop_servo" in p
    assert "teleop" not in p  # the keyboard teleop runs in a terminal (see teleop.launch.yaml)
    assert p["recorder"].parameters["use_sim_time"] is False
    assert p["safety"].parameters["use_sim_time"] is False


def test_unknown_device_is_refused():
    from magma_ros.core.errors import ConfigError

    with pytest.raises(ConfigError, match="device"):
        plan("collect.launch.yaml", {"device": "wiimote"})
