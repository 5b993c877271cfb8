"""Policy loop core: one-slot mailbox, step gating, staleness, scripted policy, action -> twist."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from _geometry import exp_so3, rot

from magma_ros.core.errors import ConfigError
from magma_ros.core.policy_loop import (
    Frame,
    Mailbox,
    PolicyLoop,
    ScriptedPolicy,
    TomResult,
    TomWorker,
    to_policy_action,
)


def img(v: int = 0) -> np.ndarray:
    return np.full((8, 8, 3), v, np.uint8)


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


class Recording:
    """A real ScriptedPolicy that also remembers the image values it saw (and can be slow)."""

    def __init__(self, n=50, delay=0.0):
        self.inner = ScriptedPolicy([[0.01, 0, 0, 0, 0, 0, 1.0]] * n)
        self.seen: list[int] = []
        self.delay = delay

    def infer(self, obs):
        self.seen.append(int(obs["image"][0, 0, 0]))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.infer(obs)


# ----------------------------------------------------------------------------- mailbox
def test_mailbox_keeps_only_the_newest_item_and_counts_drops():
    m = Mailbox()
    for i in range(5):
        m.put(i)
    assert m.get(0) == 4
    assert m.dropped == 4
    assert m.get(0.01) is None  # taken: empty again


def test_mailbox_close_wakes_a_waiting_reader():
    m = Mailbox()
    got = []
    t = threading.Thread(target=lambda: got.append(m.get(5.0)))
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    m.close()
    t.join(2.0)
    assert not t.is_alive() and got == [None] and time.monotonic() - t0 < 1.0


# ----------------------------------------------------------------------------- scripted policy
def test_scripted_policy_plays_the_list_once_then_holds():
    p = ScriptedPolicy([[0.01, 0, 0, 0, 0, 0, 1], [0, 0.02, 0, 0, 0, 0, 0]])
    a = [p.infer({"image": img()}) for _ in range(3)]
    assert a[0]["valid"] and np.allclose(a[0]["action"], [0.01, 0, 0, 0, 0, 0, 1])
    assert a[1]["valid"] and np.allclose(a[1]["action"], [0, 0.02, 0, 0, 0, 0, 0])
    assert not a[2]["valid"] and a[2]["reason"] == "script finished"


def test_scripted_policy_loop_and_bad_scripts():
    p = ScriptedPolicy([[1, 0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0]], loop=True)
    xs = [p.infer({"image": img()})["action"][0] for _ in range(5)]
    assert xs == [1, 2, 1, 2, 1]
    with pytest.raises(ConfigError):
        ScriptedPolicy.from_flat([0.1] * 8)
    with pytest.raises(ConfigError):
        ScriptedPolicy([[float("nan")] * 7])
    assert not p.infer({"image": np.zeros((4, 4))})["valid"]  # not RGB


# ----------------------------------------------------------------------------- action -> twist
def test_action_becomes_a_base_frame_twist_over_one_step_period():
    T = 0.2
    roll, pitch, yaw = 0.05, -0.03, 0.08
    a, why = to_policy_action({"action": [0.01, -0.02, 0.004, roll, pitch, yaw, 0.7], "valid": True},
                              stamp=12.5, step_period=T)
    assert why == "" and a.stamp == 12.5
    assert np.allclose(a.linear * T, [0.01, -0.02, 0.004])
    # SimplerEnv: euler2axangle(roll, pitch, yaw), static xyz axes: R = Rz(yaw) Ry(pitch) Rx(roll)
    want = rot("z", yaw) @ rot("y", pitch) @ rot("x", roll)
    assert np.allclose(exp_so3(a.angular * T), want, atol=1e-9)
    assert a.gripper == pytest.approx(0.7)


@pytest.mark.parametrize("out, part", [
    ({"action": np.zeros(7), "valid": False, "reason": "non-action tokens"}, "non-action tokens"),
    ({"action": np.zeros(6), "valid": True}, "7 values"),
    ({"action": [0, 0, float("nan"), 0, 0, 0, 1], "valid": True}, "NaN"),
    (None, "no dict"),
])
def test_invalid_outputs_give_no_action(out, part):
    a, why = to_policy_action(out, 1.0, 0.2)
    assert a is None and part in why


# ----------------------------------------------------------------------------- the loop
def make_loop(policy, clock, step_period=0.2, image_timeout=0.5, instruction="pick the can"):
    pub, rep = [], []
    loop = PolicyLoop(policy, step_period, image_timeout, clock, pub.append, rep.append, instruction)
    return loop, pub, rep


def test_loop_acts_on_the_newest_frame_and_keeps_its_stamp():
    clock, pol = Clock(100.0), Recording()
    loop, pub, _ = make_loop(pol, clock)
    for i in range(4):
        loop.offer(Frame(img(i), stamp=99.9 + 0.01 * i, received=100.0))
    assert loop.step(0) == "published"
    assert pol.seen == [3] and pub[0].stamp == pytest.approx(99.93)
    assert loop.mailbox.dropped == 3
    assert loop.step(0) == "no frame"  # nothing queued behind it


def test_loop_drops_stale_frames_and_reports():
    clock, pol = Clock(100.0), Recording()
    loop, pub, rep = make_loop(pol, clock, image_timeout=0.5)
    loop.offer(Frame(img(1), stamp=99.3, received=100.0))  # 0.7 s old by its stamp
    assert loop.step(0).startswith("stale image")
    assert pol.seen == [] and pub == [] and "image_timeout" in rep[-1]
    loop.offer(Frame(img(2), stamp=99.6, received=100.0))  # 0.4 s old: fine
    assert loop.step(0) == "published"


def test_clock_jumping_back_resets_the_step_gating_instead_of_stalling():
    """Isaac Sim reset / looping bag: sim time restarts near 0. Without the reset every new frame
    would count as 'within the step period' of the last action until the clock caught up."""
    clock, pol = Clock(100.0), Recording()
    loop, pub, rep = make_loop(pol, clock)
    loop.offer(Frame(img(1), stamp=100.0, received=100.0))
    assert loop.step(0) == "published"
    leftover = Frame(img(2), stamp=100.1, received=100.1)  # taken from the mailbox after the reset
    clock.t = 2.0
    loop.offer(leftover)
    assert loop.step(0).startswith("image stamped")  # from before the reset: dropped
    assert [r for r in rep if "clock jumped back" in r] == [rep[0]] and loop.stats.clock_resets == 1
    loop.offer(Frame(img(3), stamp=2.0, received=2.0))
    assert loop.step(0) == "published" and pub[-1].stamp == 2.0
    clock.t = 2.1
    loop.offer(Frame(img(4), stamp=2.1, received=2.1))
    assert loop.step(0) == "within step period"  # gating works on the new clock
    assert loop.stats.clock_resets == 1 and pol.seen == [1, 3]


def test_camera_watchdog_is_not_fooled_by_a_clock_reset():
    clock = Clock(50.0)
    loop, _, _ = make_loop(Recording(), clock, image_timeout=0.5)
    loop.offer(Frame(img(), 50.0, 50.0))
    assert loop.camera_stale(50.1) == ""
    assert loop.camera_stale(1.0) == "no image received yet"  # the last image was on the old clock


def test_camera_watchdog_uses_arrival_time_on_the_node_clock():
    clock = Clock(50.0)
    loop, _, _ = make_loop(Recording(), clock, image_timeout=0.5)
    assert loop.camera_stale(clock()) == "no image received yet"
    loop.offer(Frame(img(), 50.0, 50.0))
    assert loop.camera_stale(50.4) == ""
    assert "camera stale" in loop.camera_stale(50.6)


def test_one_action_per_step_period_of_image_time():
    clock, pol = Clock(10.0), Recording()
    loop, pub, _ = make_loop(pol, clock, step_period=0.2)
    results = []
    for k in range(13):  # 30 Hz camera for 0.4 s
        t = 10.0 + k / 30.0
        clock.t = t
        loop.offer(Frame(img(k), t, t))
        results.append(loop.step(0))
    stamps = [a.stamp for a in pub]
    assert len(stamps) == 3  # frames 0, 6, 12
    assert np.all(np.diff(stamps) >= 0.2 - 1e-9)


def test_waits_for_an_instruction():
    clock, pol = Clock(5.0), Recording()
    loop, pub, _ = make_loop(pol, clock, instruction="")
    loop.offer(Frame(img(), 5.0, 5.0))
    assert loop.step(0) == "waiting for an instruction" and pol.seen == []
    loop.set_instruction("  put the spoon on the towel ")
    loop.offer(Frame(img(), 5.3, 5.3))
    assert loop.step(0) == "published" and loop.instruction == "put the spoon on the towel"


def test_invalid_action_and_policy_errors_publish_nothing():
    class Broken:
        def __init__(self):
            self.n = 0

        def infer(self, obs):
            self.n += 1
            if self.n == 1:
                raise ConnectionError("server gone")
            return {"action": np.zeros(7), "valid": False, "reason": "non-action tokens at #0"}

    clock = Clock(1.0)
    loop, pub, rep = make_loop(Broken(), clock)
    loop.offer(Frame(img(), 1.0, 1.0))
    assert "ConnectionError" in loop.step(0)
    clock.t = 1.3
    loop.offer(Frame(img(), 1.3, 1.3))
    assert "non-action tokens" in loop.step(0)
    assert pub == [] and loop.stats.invalid == 1 and loop.stats.errors == 1 and len(rep) == 2


def test_worker_thread_never_queues_frames_behind_slow_inference():
    latest = {"k": 0}
    pol = Recording(delay=0.3)
    at_call = []
    infer = pol.infer
    pol.infer = lambda obs: (at_call.append(latest["k"] % 250), infer(obs))[1]
    loop, pub, _ = make_loop(pol, time.monotonic, step_period=0.05, image_timeout=5.0)
    loop.start()
    try:
        t_end = time.monotonic() + 1.2
        while time.monotonic() < t_end:  # ~100 Hz camera
            latest["k"] += 1
            loop.offer(Frame(img(latest["k"] % 250), time.monotonic(), time.monotonic()))
            time.sleep(0.01)
        time.sleep(0.5)
    finally:
        loop.stop()
    offered = loop.mailbox.put_count
    # ~1.2 s / 0.3 s per inference: a handful of inferences, not one per frame
    assert 2 <= len(pol.seen) <= 6 and offered >= 3 * len(pol.seen)
    # nothing queued: every frame was either acted on or replaced by a newer one (or still waits)
    assert offered - loop.mailbox.dropped - len(pol.seen) - loop.stats.skipped_step in (0, 1)
    # each inference got the newest frame offered when it started (one may race in just after)
    for seen, newest in zip(pol.seen, at_call):
        assert (newest - seen) % 250 <= 1
    assert len(pub) == len(pol.seen)


def test_tom_worker_yields_to_the_action_path():
    busy = threading.Event()
    done = []
    plans = []

    def plan(frame, instr):
        plans.append(frame.stamp)
        return TomResult(frame.stamp, np.zeros((1, 2)), [np.zeros((2, 2))], frame.image, 0.0)

    w = TomWorker(plan, rate=100.0, publish=done.append, instruction=lambda: "x", action_busy=busy)
    busy.set()
    w.offer(Frame(img(), 1.0, 1.0))
    assert w.step(0) is False and plans == []  # action inference running: ToM waits
    busy.clear()
    assert w.step(0) is True and plans == [1.0] and len(done) == 1


def test_tom_worker_stretches_its_period_to_stay_within_its_duty_cycle():
    def plan(frame, instr):
        return None

    w = TomWorker(plan, rate=2.0, publish=lambda r: None, instruction=lambda: "x", max_duty=0.25)
    assert w.pause_after(0.1) == pytest.approx(0.4)  # a quick plan: the rest of the 0.5 s period
    assert w.pause_after(1.0) == pytest.approx(3.0)  # a 1 s plan: 25 % of 4 s, not back to back
    assert TomWorker(plan, 2.0, lambda r: None, lambda: "x").pause_after(1.0) == 0.0  # no cap by default
    with pytest.raises(ConfigError):
        TomWorker(plan, 2.0, lambda r: None, lambda: "x", max_duty=0.0)


def test_a_new_instruction_resets_the_policy_episode_before_the_next_inference():
    pol = ScriptedPolicy([[0.01, 0, 0, 0, 0, 0, 1], [0.02, 0, 0, 0, 0, 0, 1]])
    clock = Clock(0.0)
    loop, pub, _ = make_loop(pol, clock, instruction="first task")
    for k in range(2):
        clock.t = 0.3 * k
        loop.offer(Frame(img(), clock.t, clock.t))
        loop.step(0)
    loop.set_instruction("first task")  # same text: no reset
    clock.t = 0.6
    loop.offer(Frame(img(), 0.6, 0.6))
    assert "script finished" in loop.step(0)
    loop.set_instruction("second task")
    clock.t = 0.9
    loop.offer(Frame(img(), 0.9, 0.9))
    assert loop.step(0) == "published"
    assert np.allclose([a.delta[0] for a in pub], [0.01, 0.02, 0.01])


def test_shared_model_tom_starts_only_when_the_last_plan_fits_before_the_next_action():
    clock = Clock(10.0)
    loop, _, _ = make_loop(ScriptedPolicy([[0.01, 0, 0, 0, 0, 0, 1]] * 5), clock, step_period=0.2)
    assert loop.slack() == 0.0  # no action yet: no known slack
    loop.offer(Frame(img(), 10.0, 10.0))
    loop.step(0)
    clock.t = 10.05
    assert loop.slack() == pytest.approx(0.15)  # next action due at 10.2
    plans = []

    def plan(frame, instr):
        plans.append(frame.stamp)
        return TomResult(frame.stamp, np.zeros((1, 2)), [np.zeros((1, 2))], frame.image, 0.0)

    w = TomWorker(plan, 1.0, lambda r: None, lambda: "x", loop.busy, slack=loop.slack)
    w.last_latency = 0.3  # the previous plan took 0.3 s > 0.15 s of slack: it would delay an action
    w.offer(Frame(img(), 10.05, 10.05))
    assert w.step(0) is False and plans == []
    w.last_latency = 0.1  # fits
    assert w.step(0) is True and plans == [10.05]


def test_no_action_while_its_consumer_is_not_connected():
    """ready() != '': the frame is not acted on (no inference, nothing published, reason reported),
    and the next frame is acted on as soon as the consumer is there (no step-period wait)."""
    clock, pol = Clock(7.0), Recording()
    state = {"why": "waiting for a subscriber on '/magma/ee_twist' (servo not connected yet)"}
    pub, rep = [], []
    loop = PolicyLoop(pol, 0.2, 0.5, clock, pub.append, rep.append, "pick the can", ready=lambda: state["why"])
    loop.offer(Frame(img(1), 7.0, 7.0))
    assert loop.step(0).startswith("waiting for a subscriber") and pol.seen == [] and pub == []
    assert "servo not connected" in rep[-1] and loop.stats.last_reason == rep[-1]
    state["why"] = ""
    clock.t = 7.05
    loop.offer(Frame(img(2), 7.05, 7.05))  # 50 ms later: still acted on, the first frame did not count
    assert loop.step(0) == "published" and pol.seen == [2] and pub[0].stamp == pytest.approx(7.05)
