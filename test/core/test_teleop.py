"""Teleop core: deadman, turbo only with the deadman, stop at release / stale input, re-arm, buttons, layouts."""

from __future__ import annotations

import numpy as np
import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.core.teleop import (
    DEVICES,
    KeyboardInput,
    KeyboardLayout,
    KeyDecoder,
    TeleopConfig,
    TeleopCore,
    apply_deadzone,
    load_device_params,
    parse_layout,
    status_line,
)

P = 0.1  # output period [s]
XBOX = parse_layout(load_device_params("xbox"), "xbox")
LB, RB = XBOX.enable_button, XBOX.enable_turbo_button


def joy(axes=None, buttons=()):
    """An Xbox Joy message (8 axes, 11 buttons) as joy_node sends it: sticks centred, triggers at rest (+1)."""
    a = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    for i, v in (axes or {}).items():
        a[i] = v
    b = [0] * 11
    for i in buttons:
        b[i] = 1
    return a, b


def core(**kw):
    return TeleopCore(XBOX.scales, TeleopConfig(period=P, input_timeout=0.5), **kw)


def feed(c, t, axes=None, buttons=()):
    return c.on_input(XBOX.sample(*joy(axes, buttons)), t)


def test_shipped_layouts_parse_and_name_the_teleop_twist_joy_parameters():
    for d in DEVICES:
        p = load_device_params(d)
        lay = parse_layout(p, d)
        if d == "keyboard":
            assert isinstance(lay, KeyboardLayout)
            continue
        assert "enable_button" in p and "axis_linear.x" in p and "scale_linear.x" in p and "axis_angular.yaw" in p
        assert lay.enable_button >= 0
    # the gamepads: a deadman, a turbo, and every button action mapped; the Xbox left stick drives x/y
    for d in ("xbox", "ps5", "ps4"):
        lay = parse_layout(load_device_params(d), d)
        assert lay.enable_turbo_button >= 0
        assert {"resume_policy", "start_episode", "stop_episode", "discard_episode", "estop"} <= set(lay.buttons)
    assert XBOX.axis_linear[:2] == (1, 0)


def test_no_deadman_no_motion_and_the_stick_maps_to_base_velocity():
    c = core()
    feed(c, 0.0)  # released once: armed
    step = feed(c, 0.05, axes={1: 1.0})  # stick full forward, no deadman
    assert step.twist is None and c.tick(0.1).twist is None
    step = feed(c, 0.15, axes={1: 1.0}, buttons=[LB])  # deadman: a twist at once (takeover)
    assert step.engaged_now and step.twist is not None
    np.testing.assert_allclose(step.twist.linear, [0.05, 0, 0])  # scale_linear.x = 0.05 m/s
    tw = c.tick(0.25).twist  # and one per period while held
    np.testing.assert_allclose(tw.linear, [0.05, 0, 0])
    np.testing.assert_allclose(tw.angular, [0, 0, 0])
    feed(c, 0.3, axes={3: -0.5, 4: 1.0}, buttons=[LB])  # right stick: z up, yaw right (negative)
    tw = c.tick(0.35).twist
    d = (0.5 - XBOX.deadzone) / (1 - XBOX.deadzone)
    np.testing.assert_allclose(tw.linear, [0, 0, 0.05])
    np.testing.assert_allclose(tw.angular, [0, 0, -0.3 * d])


def test_turbo_alone_moves_nothing_and_scales_only_with_the_deadman():
    c = core()
    feed(c, 0.0)
    for k in range(10):  # teleop_twist_joy would move here (turbo alone enables)
        step = feed(c, 0.01 + k * 0.05, axes={1: 1.0, 0: 1.0}, buttons=[RB])
        assert step.twist is None
        assert c.tick(0.02 + k * 0.05).twist is None
    assert not c.engaged and c.published == 0
    feed(c, 0.6, axes={1: 1.0}, buttons=[LB, RB])
    np.testing.assert_allclose(c.tick(0.7).twist.linear, [0.15, 0, 0])  # scale_linear_turbo.x
    feed(c, 0.75, axes={1: 1.0}, buttons=[RB])  # deadman let go, turbo still held: stop
    assert not c.engaged and c.tick(0.85).twist.is_zero and c.tick(0.95).twist is None


def test_release_stops_at_once_not_by_a_timeout():
    c = core()
    feed(c, 0.0)
    feed(c, 0.1, axes={1: 1.0}, buttons=[LB])
    assert not c.tick(0.2).twist.is_zero
    step = feed(c, 0.23, axes={1: 1.0})  # deadman released mid-period, stick still pushed
    assert step.twist is not None and step.twist.is_zero  # in the input callback itself: 0 s after release
    assert step.twist.reason == "deadman released"
    tw = c.tick(0.3).twist  # once more at the next tick, then silence (the servo and safety hold the arm)
    assert tw is not None and tw.is_zero
    assert all(c.tick(0.4 + k * P).twist is None for k in range(20))


def test_stale_input_stops_and_needs_a_new_press():
    c = core()
    feed(c, 0.0)
    feed(c, 0.1, axes={1: 1.0}, buttons=[LB])
    assert not c.tick(0.5).twist.is_zero  # 0.4 s quiet: still within input_timeout (joy_node autorepeats)
    tw = c.tick(0.7).twist  # 0.6 s: joy_node stopped
    assert tw.is_zero and tw.reason == "input stale" and not c.engaged
    assert c.tick(0.8).twist.is_zero and c.tick(0.9).twist is None
    # joy_node comes back with the deadman still held: no motion until released and pressed again
    assert feed(c, 1.0, axes={1: 1.0}, buttons=[LB]).twist is None and c.tick(1.05).twist is None
    assert c.reason == "release the deadman once first"
    feed(c, 1.1)
    assert feed(c, 1.2, axes={1: 1.0}, buttons=[LB]).engaged_now


def test_spacemouse_is_not_rearmed_after_silence():
    lay = parse_layout(load_device_params("spacemouse"), "spacemouse")
    c = TeleopCore(lay.scales, TeleopConfig(period=P), rearm_after_stale=lay.rearm_after_stale)
    axes = [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    c.on_input(lay.sample([0.0] * 6, [0, 0]), 0.0)
    c.on_input(lay.sample(axes, [1, 0]), 0.1)
    assert c.engaged
    assert c.tick(0.8).twist.reason == "input stale"  # spacenav_node is silent while the puck is still
    assert c.on_input(lay.sample(axes, [1, 0]), 1.0).engaged_now  # moves again on its next message


def test_deadman_held_at_start_or_through_an_estop_never_starts_motion():
    c = core()
    assert feed(c, 0.0, axes={1: 1.0}, buttons=[LB]).twist is None  # held at start-up (taped button)
    assert c.tick(0.1).twist is None
    feed(c, 0.2)
    assert feed(c, 0.3, axes={1: 1.0}, buttons=[LB]).engaged_now
    c.tick(0.4)
    step = c.on_safety_state("stopping")  # an e-stop from anywhere
    assert step.twist.is_zero and not c.engaged
    c.on_safety_state("holding:reset, waiting for command")
    assert feed(c, 0.5, axes={1: 1.0}, buttons=[LB]).twist is None  # still held after the reset
    feed(c, 0.6)
    assert feed(c, 0.7, axes={1: 1.0}, buttons=[LB]).engaged_now


def test_buttons_fire_on_press_with_their_rules():
    lay = XBOX.buttons
    c = core()
    feed(c, 0.0)
    step = feed(c, 0.1, buttons=[lay["start_episode"]])
    assert step.actions == ["start_episode"]
    assert feed(c, 0.15, buttons=[lay["start_episode"]]).actions == []  # held (joy autorepeat): no repeat
    assert feed(c, 0.2).actions == []
    assert feed(c, 0.25, buttons=[lay["gripper_close"]]).gripper is None  # gripper needs the deadman
    assert feed(c, 0.27, buttons=[LB, lay["gripper_close"]]).gripper is None  # still the refused press
    feed(c, 0.28, buttons=[LB])
    step = feed(c, 0.3, buttons=[LB, lay["gripper_close"]])
    assert step.gripper == 0.0 and not step.engaged_now
    step = feed(c, 0.35, buttons=[LB, lay["resume_policy"]])  # hand-back while driving: refused
    assert step.actions == [] and "release the deadman" in step.notes[0]
    step = feed(c, 0.4, buttons=[LB, lay["estop"]])  # e-stop: always, and it stops teleop
    assert step.actions == ["estop"] and step.twist.is_zero and not c.engaged
    step = feed(c, 0.5, buttons=[lay["resume_policy"], lay["discard_episode"]])
    assert step.actions == ["resume_policy", "discard_episode"]


def test_bad_joy_messages_stop_and_never_enable():
    c = core()
    feed(c, 0.0)
    feed(c, 0.1, axes={1: 1.0}, buttons=[LB])
    a, b = joy({1: float("nan")}, [LB])
    step = c.on_input(XBOX.sample(a, b), 0.2)
    assert step.twist.is_zero and step.twist.reason == "invalid input" and "NaN" in c.problem
    s = XBOX.sample([0.0, 1.0], [1, 1])  # a 2-button device on the Xbox layout: deadman index 4 missing
    assert not s.enable and "deadman button 4 not in the Joy message" in s.problem
    s = XBOX.sample(["x"], [1])
    assert not s.enable and "malformed" in s.problem
    s = XBOX.sample([0.0, 1.0], [0, 0, 0, 0, 1])  # short axes read 0 (teleop_twist_joy), deadman still counts
    assert s.enable and s.axes[0] == pytest.approx(1.0) and s.axes[2] == 0.0


def test_deadzone_is_continuous_and_reaches_full_scale():
    a = apply_deadzone(np.array([0.05, -0.05, 0.1, 0.55, -1.0, 1.5]), 0.1)
    np.testing.assert_allclose(a, [0, 0, 0, 0.5, -1.0, 1.0])


@pytest.mark.parametrize("override, message", [
    ({"enable_button": -1}, "needs a deadman"),
    ({"require_enable_button": False}, "needs a deadman"),
    ({"enable_turbo_button": 4}, "must differ"),
    ({"estop_button": 5}, "also the deadman or turbo"),
    ({"deadzone": 1.0}, "deadzone"),
    ({"axis_linear.x": 1.5}, "integer"),
    ({"scale_linear.x": "fast"}, "number"),
    ({"input": "mouse"}, "unknown teleop input 'mouse'"),
])
def test_bad_layouts_are_one_line_errors(override, message):
    p = dict(load_device_params("xbox"), **override)
    with pytest.raises(ConfigError, match=message):
        parse_layout(p, "xbox")


def test_unknown_device_names_the_valid_ones():
    with pytest.raises(ConfigError, match="did you mean 'xbox'"):
        load_device_params("xbxo")
    with pytest.raises(ConfigError, match="not found"):
        load_device_params("/no/such/pad.yaml")


def test_keyboard_hold_repeat_release_turbo_and_keys():
    lay = parse_layout(load_device_params("keyboard"), "keyboard")
    kb = KeyboardInput(lay)
    c = TeleopCore(lay.scales, TeleopConfig(period=P))
    c.on_input(kb.sample(0.0), 0.0)
    kb.on_key("w", 0.1)
    assert c.on_input(kb.sample(0.1), 0.1).twist.linear[0] == pytest.approx(0.05)
    for k in range(1, 10):  # autorepeat every 33 ms keeps it held
        kb.on_key("w", 0.1 + k * 0.033)
        c.on_input(kb.sample(0.1 + k * 0.033), 0.1 + k * 0.033)
        assert c.engaged
    t_last = 0.1 + 9 * 0.033
    step = c.on_input(kb.sample(t_last + lay.key_timeout + 1e-3), t_last + lay.key_timeout + 1e-3)
    assert step.twist.is_zero  # no repeat for key_timeout: released
    kb.on_key("W", 1.0)  # Shift: turbo
    np.testing.assert_allclose(c.on_input(kb.sample(1.0), 1.0).twist.linear, [0.15, 0, 0])
    kb.on_key(" ", 1.05)  # space stops at once
    assert c.on_input(kb.sample(1.05), 1.05).twist.is_zero
    kb.on_key("l", 1.1)  # yaw minus
    assert c.on_input(kb.sample(1.1), 1.1).twist.angular[2] == pytest.approx(-0.3)
    kb.on_key("p", 1.12)
    assert c.on_input(kb.sample(1.12), 1.12).notes  # hand-back while moving: refused
    kb.on_key(" ", 1.15)
    c.on_input(kb.sample(1.16), 1.16)
    assert c.tick(1.17).twist.is_zero and c.tick(1.18).twist is None  # stopped, silent
    kb.on_key("c", 1.19)  # a gripper key with no motion key: a zero twist (the servo's step), then the gripper
    step = c.on_input(kb.sample(1.19), 1.19)
    assert step.twist.is_zero and step.gripper == 0.0 and not c.engaged
    for key, action in (("p", "resume_policy"), ("b", "start_episode"), ("n", "stop_episode"),
                        ("x", "discard_episode"), ("e", "estop")):
        kb.on_key(key, 1.2)
        kb.on_key(key, 1.21)  # pressed twice: two events
        assert c.on_input(kb.sample(1.22), 1.22).actions == [action, action]


def test_key_decoder_drops_escape_sequences():
    d = KeyDecoder()
    assert d.feed("w\x1b[A") == ["w"]  # arrow up is not 'A' (+y turbo)
    assert d.feed("\x1b[1;5") == [] and d.feed("Cd") == ["d"]  # split across reads
    assert d.feed("\x1bOPs\x1bx") == ["s"]  # F1 (SS3), Alt+x
    assert d.feed("\x03\r\n a") == [" ", "a"]


def test_status_line_tells_what_happens():
    c = core()
    feed(c, 0.0)
    feed(c, 0.1, axes={1: 1.0}, buttons=[LB, RB])
    line = status_line("xbox", c, "ok", "teleop", "recording episode 2", "recorder/start: ok")
    assert line.startswith("teleop[xbox] MOVING TURBO lin +0.150") and "safety ok/teleop" in line
    assert "\n" not in line and "recording episode 2" in line
    feed(c, 0.2)
    assert "stopped (deadman released)" in status_line("xbox", c)
