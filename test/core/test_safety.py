"""Safety filter core: property tests (hypothesis) and the rules of issues 3 and 10, on the real robot YAMLs.

Every output stream is checked by the independent :class:`LimitAudit` (built from the robot YAML,
on the real elapsed time of each step), never restarted at a reset.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from magma_ros.core.errors import ConfigError
from magma_ros.core.limit_audit import LimitAudit
from magma_ros.core.robot import NORMALIZED_GRIPPER, load_robot
from magma_ros.core.safety import SafetyConfig, SafetyFilter, brake_speed

ROBOTS = {name: load_robot(name) for name in ("fr3", "panda", "wx250s")}
DT = 0.01


def make(robot="fr3", **kw):
    r = ROBOTS[robot]
    f = SafetyFilter(r, SafetyConfig(robot=robot, **kw))
    return r, f


class Oracle:
    """What the node would publish for each step, fed to an independent LimitAudit."""

    def __init__(self, f, tol=1e-5):
        c = f.cfg
        r = f.robot
        margin = r.position_margin if c.position_margin < 0 else c.position_margin
        self.f = f
        self.audit = LimitAudit(r.name if r.name in ROBOTS else r, 1.0 / c.output_rate, position_margin=margin,
                                velocity_scale=c.velocity_scale, acceleration_scale=c.acceleration_scale,
                                max_gap=c.max_output_gap, tol=tol)

    def check(self, t, out) -> list:
        if out is None:
            return []
        if self.f.cfg.controller == "jtc":
            pts = self.f.jtc_points()
            return self.audit.trajectory(t, [(i + 1) * self.f.dt for i in range(len(pts))], pts)
        return self.audit.point(t, out.positions)


def start(f, q=None, t=0.0):
    """Fresh joint states + first output (the hold at the measured position)."""
    r = f.robot
    q = r.home.copy() if q is None else np.asarray(q, float)
    f.on_joint_state(r.arm_joints, q, t)
    out = f.step(t)
    assert out is not None
    return out


# ----------------------------------------------------------------------------------- brake distance
@given(v=st.floats(0, 10), a=st.floats(0.5, 30))
def test_brake_speed_is_exact_discrete_stopping_distance(v, a):
    """brake_speed(d) is the largest speed whose step + full-deceleration stop fits into d."""
    dt = DT
    d = v * dt + dt * sum(max(0.0, v - k * a * dt) for k in range(1, 2000))
    vb = float(brake_speed(np.array([d]), np.array([a]), dt)[0])
    assert vb == pytest.approx(v, rel=1e-9, abs=1e-9)


@given(v=st.floats(0, 10), a=st.floats(0.5, 30), rho=st.floats(0.01, 1.0))
def test_brake_speed_after_a_short_piece_sheds_only_what_its_duration_allows(v, a, rho):
    """After a first piece shorter than a period (a jittered or bunched tick) the velocity may change by
    only a * first (the audit's window), then by a * dt per period: the stopping distance counts that."""
    dt = DT
    m = rho * dt
    d = v * m + dt * sum(max(0.0, v - a * m - k * a * dt) for k in range(0, 2000))
    vb = float(brake_speed(np.array([d]), np.array([a]), dt, first=m)[0])
    assert vb == pytest.approx(v, rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------------- random streams (fuzz)
BAD_KINDS = ("nan", "inf", "short", "unknown", "missing", "empty", "nonincreasing", "stale", "future",
             "dup", "both_grippers", "negative_time", "ragged")


@st.composite
def events(draw):
    robot = draw(st.sampled_from(sorted(ROBOTS)))
    r = ROBOTS[robot]
    n = r.dof
    u = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    q0 = r.position_min + np.array(u) * (r.position_max - r.position_min)
    evs = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["steps", "steps", "cmd", "cmd", "bad", "estop", "reset", "resume",
                                     "stale", "badstate", "teleop"]))
        if kind in ("steps", "stale"):
            evs.append((kind, draw(st.integers(1, 25))))
        elif kind in ("cmd", "teleop"):
            npts = draw(st.integers(1, 4))
            pts = [np.array(draw(st.lists(st.floats(-1.4, 1.4), min_size=n, max_size=n)))
                   for _ in range(npts)]
            dts = draw(st.lists(st.floats(0.005, 0.4), min_size=npts, max_size=npts))
            stamp_off = draw(st.sampled_from([0.0, 0.0, -0.05, 0.03]))
            grip = draw(st.one_of(st.none(), st.floats(-0.5, 1.5)))
            far = draw(st.booleans())
            evs.append((kind, pts, np.cumsum(dts), stamp_off, grip, far))
        elif kind == "bad":
            evs.append((kind, draw(st.sampled_from(BAD_KINDS)), draw(st.sampled_from(["policy", "teleop"]))))
        else:
            evs.append((kind,))
    return robot, q0, evs


def bad_command(f, kind, q):
    r = f.robot
    names = list(r.arm_joints)
    p = q + 0.01
    pts, times, stamp = [p], [0.1], 0.0
    if kind == "nan":
        p = p.copy()
        p[0] = math.nan
        pts = [p]
    elif kind == "inf":
        p = p.copy()
        p[-1] = math.inf
        pts = [p]
    elif kind == "short":
        pts = [p[:-1]]
    elif kind == "unknown":
        names = names[:-1] + ["no_such_joint"]
    elif kind == "missing":
        names, pts = names[:-1], [p[:-1]]
    elif kind == "empty":
        pts, times = [], []
    elif kind == "nonincreasing":
        pts, times = [p, p + 0.01], [0.2, 0.2]
    elif kind == "negative_time":
        times = [-0.1]
    elif kind == "stale":
        stamp = -1.0  # relative, see caller
    elif kind == "future":
        stamp = 0.2
    elif kind == "dup":
        names = names + [names[0]]
        pts = [np.append(p, p[0])]
    elif kind == "both_grippers":
        names = names + [NORMALIZED_GRIPPER, r.gripper.joint]
        pts = [np.append(p, [0.5, r.gripper.open])]
    elif kind == "ragged":
        pts, times = [p, p[:3]], [0.1, 0.2]
    return names, pts, times, stamp


TIMINGS = ("nominal", "jitter", "bunched", "late")
# forward/isaac: how late (periods beyond one) each timing's ticks come below max_output_gap, told to the
# filter as late_tick (later still, it keeps the position limits but not the acceleration near a bound)
LATE_TICK = {"nominal": 0.5, "jitter": 0.5, "bunched": 0.7, "late": 3.0}


def tick_period(timing, rng) -> float:
    """Real elapsed time to the next output step: the scheduler delays and bunches timer ticks."""
    if timing == "nominal":
        return DT
    if timing == "jitter":
        return DT * rng.uniform(0.5, 1.5)
    if timing == "bunched":
        return DT * rng.choice([0.02, 0.3, 1.0, 1.7])
    return DT * rng.choice([1.0, 1.0, 2.5, 4.0, 12.0])  # late: up to 120 ms (beyond max_output_gap)


def run(robot, q0, evs, rng, check=True, bad=True, controller="jtc", timing="nominal"):
    """Drive a filter with an event list; returns (outputs, filter). Checks limits if asked, on the
    real elapsed time of every step; the oracle is never restarted (not at start-up, not at a reset)."""
    r = ROBOTS[robot]
    f = SafetyFilter(r, SafetyConfig(robot=robot, controller=controller, late_tick=LATE_TICK[timing]))
    chk = Oracle(f)
    t = 0.0
    outs = []
    measured = q0.copy()
    fresh = True
    trng = np.random.default_rng(int(rng.integers(2**32)))  # timing: its own stream (same for both runs)

    def tick():
        nonlocal t
        if fresh:
            f.on_joint_state(r.arm_joints, measured, t)
        o = f.step(t)
        if o is not None:
            if check:
                bad_ = chk.check(t, o)
                assert not bad_, bad_
            outs.append(o.positions)
        t += tick_period(timing, trng)

    for ev in evs:
        kind = ev[0]
        if kind in ("steps", "stale"):
            fresh = kind == "steps"
            for _ in range(ev[1]):
                if fresh and f.initialized:
                    measured = f.q + rng.normal(0, 0.0005, r.dof)  # tracking error / sag
                tick()
            fresh = True
        elif kind in ("cmd", "teleop"):
            _, pts, times, stamp_off, grip, far = ev
            base = f.q if f.initialized else q0
            names = list(r.arm_joints)
            P = [base + (p if far else 0.1 * p) for p in pts]
            if grip is not None:
                names.append(NORMALIZED_GRIPPER)
                P = [np.append(p, grip) for p in P]
            f.on_command("teleop" if kind == "teleop" else "policy", names, P, times,
                         0.0 if stamp_off == 0.0 else t + stamp_off, t)
        elif kind == "bad" and bad:
            names, pts, times, stamp = bad_command(f, ev[1], f.q if f.initialized else q0)
            stamp = t + stamp if stamp != 0.0 else 0.0
            v = f.on_command(ev[2], names, pts, times, stamp, t)
            assert not v.accepted, (ev, v)
        elif kind == "estop":
            f.estop(t)
        elif kind == "reset":
            f.reset(t)  # refused while braking; the oracle goes on either way
        elif kind == "resume":
            f.resume_policy(t)
        elif kind == "badstate":
            f.on_joint_state(r.arm_joints, np.full(r.dof, math.nan), t)
    if check and f.cfg.controller == "jtc":
        bad_ = chk.audit.finish()  # the tail the controller runs after the last message
        assert not bad_, bad_
    return outs, f


def _at_lower_limits(*cmd_times_and_steps, robot="fr3"):
    """A case that starts with every joint at position_min (outside the margin band): a zero command
    (the target clamps to the band's edge) every few ticks."""
    evs = []
    for x in cmd_times_and_steps:
        if isinstance(x, float):
            evs.append(("cmd", [np.zeros(7)], np.array([x]), 0.0, None, False))
        else:
            evs.append(("steps", x))
    return robot, ROBOTS[robot].position_min.copy(), evs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.integers(0, 2**32 - 1), st.sampled_from(["jtc", "isaac"]), st.sampled_from(TIMINGS))
# found by random exploration: bunched ticks froze the acceleration (jerk bound) into the stopping bound
@example(_at_lower_limits(0.25, 1, 1, 0.25, 1, 1, 0.0625, 1, 1, 1, 19), 1, "jtc", "bunched")
# found by random exploration: a short piece (6 ms) allows only a 6 ms velocity change after it, and the
# next tick came late (13 ms)
@example(_at_lower_limits(0.25, 1, 1, 0.125, 1, 1, 1, 1, 1, 12), 0, "isaac", "jitter")
# found by random exploration: a 1.7-period tick of a set-point stream, beyond the default late_tick
@example(_at_lower_limits(0.25, 1, 1, 0.125, 1, 1, 1, 23, robot="panda"), 0, "isaac", "bunched")
def test_every_output_within_limits(case, seed, controller, timing):
    """Arbitrary command streams, including every bad input, e-stops and resets, with timer ticks on
    time, jittered, bunched or late: position (minus margin), velocity (FR3: position dependent)
    and acceleration limits hold on real elapsed time for the path the controller executes."""
    robot, q0, evs = case
    outs, f = run(robot, q0, evs, np.random.default_rng(seed), controller=controller, timing=timing)
    assert f.infeasible_steps == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.integers(0, 2**32 - 1), st.sampled_from(TIMINGS))
def test_bad_messages_change_nothing(case, seed, timing):
    """The same stream with and without interleaved bad messages produces identical outputs.

    Bad messages come from the policy here: a teleop message, even a rejected one, is evidence that
    the deadman is held, so it keeps the teleop session alive (a stream held through a reset is not a
    new press; see test_rejected_teleop_messages_keep_the_session_alive)."""
    robot, q0, evs = case
    evs = [(e[0], e[1], "policy") if e[0] == "bad" else e for e in evs]
    a, _ = run(robot, q0, evs, np.random.default_rng(seed), check=False, bad=True, timing=timing)
    b, _ = run(robot, q0, evs, np.random.default_rng(seed), check=False, bad=False, timing=timing)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------ in-limit pass-through
def min_jerk(s):
    s = np.clip(s, 0.0, 1.0)
    return 10 * s**3 - 15 * s**4 + 6 * s**5


@st.composite
def smooth_reference(draw):
    """A reference that is inside all limits with slack: a sum of minimum-jerk moves with pauses
    (direction reversals only at rest), starting at rest at q0 and ending at rest."""
    robot = draw(st.sampled_from(sorted(ROBOTS)))
    r = ROBOTS[robot]
    n = r.dof
    f = SafetyFilter(r, SafetyConfig(robot=robot))
    mid = (f.q_lo + f.q_hi) / 2
    half = (f.q_hi - f.q_lo) / 2
    u = np.array(draw(st.lists(st.floats(-0.5, 0.5), min_size=n, max_size=n)))
    q0 = mid + u * half
    moves = []
    t0 = draw(st.floats(0.0, 0.1))
    q = q0.copy()
    for _ in range(draw(st.integers(1, 3))):
        T = draw(st.floats(0.3, 1.0))
        d = np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
        # peak velocity 1.875 |d|/T, peak acceleration 5.774 |d|/T^2; keep at 60 % of the limits
        scale = min(0.6 * np.min(f.v_max / (1.875 * np.abs(d) / T + 1e-12)),
                    0.6 * np.min(f.a_max / (5.774 * np.abs(d) / T**2 + 1e-12)), 1.0)
        d = d * scale
        d = np.clip(q + d, mid - 0.9 * half, mid + 0.9 * half) - q  # stay inside the band
        moves.append((t0, T, d))
        q = q + d
        t0 += T + draw(st.floats(0.02, 0.2))
    t_end = t0

    def ref(t):
        out = q0.copy()
        for s0, T, d in moves:
            out = out + d * min_jerk((t - s0) / T)
        return out

    return robot, ref, t_end


def _reference_within(f, samples) -> bool:
    audit = LimitAudit(f.robot, DT, position_margin=f.robot.position_margin, tol=-0.02)  # 2 % inside every limit
    return all(not audit.point(k * DT, q) for k, q in enumerate(samples))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(smooth_reference(), st.sampled_from(["whole", "chunks", "points"]))
def test_in_limit_streams_pass_unchanged(case, how):
    """A stream inside the limits reaches the output exactly (its samples at the output instants),
    whether it comes as one trajectory, as overlapping 10 Hz chunks, or point by point."""
    robot, ref, t_end = case
    r, f = make(robot)
    steps = int(math.ceil(t_end / DT)) + 5
    samples = [ref(k * DT) for k in range(steps + 1)]
    if f.pdv is not None and not _reference_within(f, samples):
        return  # the FR3 position-dependent bound is tighter than the reference near a limit
    start(f, samples[0], t=-DT)  # the first output (the hold) is reached at t = 0
    for k in range(1, steps):
        t = (k - 1) * DT  # this step's output is reached at k*DT
        f.on_joint_state(r.arm_joints, samples[k - 1], t)
        if how == "whole" and (k - 1) % 40 == 0 or how == "chunks" and (k - 1) % 10 == 0 or how == "points":
            idx = range(k, steps + 1) if how != "points" else range(k, min(k + 30, steps + 1))
            pts = [samples[i] for i in idx]
            times = [i * DT - t for i in idx]
            if how == "points":  # a short trajectory that ends at rest only at the true end
                if idx[-1] < steps:
                    rest = range(k, steps + 1)
                    pts, times = [samples[i] for i in rest], [i * DT - t for i in rest]
            v = f.on_command("policy", r.arm_joints, pts, times, t, t)
            assert v.accepted, v
        out = f.step(t)
        np.testing.assert_allclose(out.positions, samples[k], atol=1e-9, rtol=0)
    assert f.status().state == "ok"


# ------------------------------------------------------------------------------------- the rules
def test_startup_nothing_before_fresh_joint_states_then_hold():
    r, f = make("fr3")
    assert f.step(0.0) is None
    assert f.status().state == "waiting"
    f.on_joint_state(r.arm_joints, r.home, 0.0)
    assert f.step(0.5) is None  # states are 0.5 s old: still nothing
    v = f.on_command("policy", r.arm_joints, [r.home + 0.1], [0.5], 0.0, 0.5)
    assert not v.accepted and "joint states" in v.reason
    f.on_joint_state(r.arm_joints, r.home, 0.6)
    out = f.step(0.6)
    np.testing.assert_array_equal(out.positions, r.home)
    assert f.status().state == "holding:waiting for command" and f.source == "hold"
    for k in range(5):
        f.on_joint_state(r.arm_joints, r.home, 0.61 + k * DT)
        np.testing.assert_array_equal(f.step(0.61 + k * DT).positions, r.home)


def test_joint_state_order_and_extra_joints():
    r, f = make("fr3")
    order = list(reversed(r.arm_joints)) + ["fr3_finger_joint1", "fr3_finger_joint2"]
    pos = list(reversed(r.home)) + [0.02, 0.02]
    assert f.on_joint_state(order, pos, 0.0) == ""
    np.testing.assert_array_equal(f.step(0.0).positions, r.home)
    assert f.g == pytest.approx(0.02)
    assert "misses" in f.on_joint_state(r.arm_joints[:3], r.home[:3], 0.0)
    assert "positions" in f.on_joint_state(r.arm_joints, r.home[:3], 0.0)


@pytest.mark.parametrize("robot", sorted(ROBOTS))
def test_too_fast_command_is_scaled_along_its_direction(robot):
    r, f = make(robot)
    chk = Oracle(f)
    chk.check(0.0, start(f))
    d = np.linspace(0.4, -0.2, r.dof)  # a 0.4 rad move asked for in 20 ms
    tgt = r.home + d
    f.on_command("policy", r.arm_joints, [tgt], [0.02], 0.0, 0.0)
    outs = []
    for k in range(1, 400):
        t = k * DT
        f.on_joint_state(r.arm_joints, f.q, t)
        f.on_command("policy", r.arm_joints, [tgt], [0.02], 0.0, t) if k % 20 == 0 else None
        o = f.step(t)
        assert not chk.check(t, o)
        outs.append(o.positions)
    outs = np.array(outs)
    np.testing.assert_allclose(outs[-1], tgt, atol=1e-9)  # arrives, no overshoot left
    frac = (outs - r.home) / d  # every joint at the same fraction of its way: a straight line
    assert np.all(np.ptp(frac, axis=1) < 1e-6)
    assert np.all(frac <= 1 + 1e-9)  # never beyond the target


def test_position_limits_minus_margin():
    r, f = make("panda", position_margin=0.1, max_step=0.0)
    chk = Oracle(f)
    chk.check(0.0, start(f))
    tgt = r.position_max + 0.3  # beyond every upper limit
    v = f.on_command("policy", r.arm_joints, [tgt], [0.3], 0.0, 0.0)
    assert v.accepted and "clamped" in v.reason
    for k in range(1, 600):
        t = k * DT
        f.on_joint_state(r.arm_joints, f.q, t)
        if k % 25 == 0:
            f.on_command("policy", r.arm_joints, [tgt], [0.3], 0.0, t)
        o = f.step(t)
        assert not chk.check(t, o)
    np.testing.assert_allclose(f.q, r.position_max - 0.1, atol=1e-9)


def test_start_outside_the_band_only_moves_back():
    r, f = make("wx250s", position_margin=0.1, max_step=0.0)
    q0 = r.home.copy()
    q0[1] = r.position_max[1] - 0.02  # inside the hard limit, outside the margin band
    chk = Oracle(f)
    chk.check(0.0, start(f, q0))
    up = q0.copy()
    up[1] += 0.01
    f.on_command("policy", r.arm_joints, [up], [0.2], 0.0, 0.0)
    for k in range(1, 30):
        f.on_joint_state(r.arm_joints, f.q, k * DT)
        assert not chk.check(k * DT, f.step(k * DT))
    assert f.q[1] <= q0[1] + 1e-12
    for k in range(30, 400):
        if k % 30 == 0:
            f.on_command("policy", r.arm_joints, [r.home], [0.3], 0.0, k * DT)
        f.on_joint_state(r.arm_joints, f.q, k * DT)
        assert not chk.check(k * DT, f.step(k * DT))
    np.testing.assert_allclose(f.q, r.home, atol=1e-9)


def test_max_step_scales_the_command_towards_the_current_position():
    r, f = make("fr3", max_step=0.2)
    start(f)
    tgt = r.home.copy()
    tgt[0] += 0.8
    tgt[1] += 0.4
    v = f.on_command("policy", r.arm_joints, [tgt], [0.4], 0.0, 0.0)
    assert v.accepted and "max_step" in v.reason
    for k in range(1, 50):
        f.on_joint_state(r.arm_joints, f.q, k * DT)
        f.step(k * DT)
    np.testing.assert_allclose(f.q - r.home, [0.2, 0.1, 0, 0, 0, 0, 0], atol=1e-9)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_command_is_rejected_with_a_reason(kind):
    r, f = make("fr3")
    start(f, t=5.0)
    names, pts, times, stamp = bad_command(f, kind, r.home)
    v = f.on_command("policy", names, pts, times, 5.0 + stamp if stamp else 0.0, 5.0)
    assert not v.accepted and v.reason
    assert f.last_rejection == v.reason
    f.on_joint_state(r.arm_joints, r.home, 5.01)
    np.testing.assert_array_equal(f.step(5.01).positions, r.home)
    assert f.status().state == "holding:waiting for command"


def test_stamps_zero_is_now_small_future_ok():
    r, f = make("fr3")
    start(f, t=10.0)
    assert f.on_command("policy", r.arm_joints, [r.home], [0.1], 0.0, 10.0).accepted
    assert f.on_command("policy", r.arm_joints, [r.home], [0.1], 10.04, 10.0).accepted
    assert f.on_command("policy", r.arm_joints, [r.home], [0.1], 9.6, 10.0).accepted
    assert not f.on_command("policy", r.arm_joints, [r.home], [0.1], 9.4, 10.0).accepted
    assert not f.on_command("policy", r.arm_joints, [r.home], [0.1], 10.06, 10.0).accepted
    assert not f.on_command("robot", r.arm_joints, [r.home], [0.1], 0.0, 10.0).accepted


def moving_filter(robot="fr3", speed=0.6, controller="jtc"):
    """A filter following a steady motion, with its oracle fed from the start; (robot, filter, t, oracle)."""
    r, f = make(robot, controller=controller)
    chk = Oracle(f)
    chk.check(0.0, start(f))
    tgt = r.home + np.where(np.arange(r.dof) % 2 == 0, 1.0, -1.0) * 0.5 * speed  # 0.5 s away
    t = 0.0
    for k in range(1, 40):
        t = k * DT
        f.on_joint_state(r.arm_joints, f.q, t)
        if k % 10 == 1:
            f.on_command("policy", r.arm_joints, [tgt], [0.5], 0.0, t)
        assert not chk.check(t, f.step(t))
    assert np.max(np.abs(f.v)) > 0.3
    return r, f, t, chk


def brake_to_standstill(r, f, t, chk, measured=None):
    """Step until the output stands still (oracle-checked); returns t."""
    for _ in range(300):
        t += DT
        f.on_joint_state(r.arm_joints, f.q if measured is None else measured, t)
        assert not chk.check(t, f.step(t))
        if not np.any(f.v):
            return t
    raise AssertionError("no standstill")


def test_estop_latches_at_once_and_stops_within_acceleration_limits():
    r, f, t, chk = moving_filter()
    f.estop(t)
    assert f.status().state == "stopping"
    v0 = f.v.copy()
    speeds, k = [], 0
    while True:
        k += 1
        t += DT
        f.on_joint_state(r.arm_joints, f.q, t)
        # any command stream while latched is ignored
        assert not f.on_command("teleop", r.arm_joints, [r.home], [0.1], 0.0, t).accepted
        assert not f.on_command("policy", r.arm_joints, [f.q + 0.2], [0.1], 0.0, t).accepted
        o = f.step(t)
        assert not chk.check(t, o)
        speeds.append(np.abs(o.velocities))
        if k == 1:  # the first step after the e-stop already decelerates, along the direction of motion
            assert np.all(np.abs(o.velocities) < np.abs(v0) + 1e-12)
            np.testing.assert_allclose(o.velocities / np.linalg.norm(o.velocities), v0 / np.linalg.norm(v0))
            assert len(f.jtc_points()) < 2 or not np.allclose(f.jtc_points()[1] - f.jtc_points()[0],
                                                                o.velocities * DT)  # no cruise while stopping
        if np.all(speeds[-1] == 0):
            break
        assert k < 100
    # category 2: as fast as the acceleration limit allows (one partial last step)
    assert k <= math.ceil(np.max(np.abs(v0) / (f.a_max * DT))) + 1
    assert f.status().state == "estopped" and f.source == "hold"
    latched = f.q.copy()
    for _ in range(20):
        t += DT
        f.on_joint_state(r.arm_joints, latched - 0.05, t)  # sagging measurement (inside the tolerance)
        np.testing.assert_array_equal(f.step(t).positions, latched)
    assert not f.resume_policy(t)[0]


@pytest.mark.parametrize("controller", ["jtc", "isaac"])
def test_reset_refused_while_braking_then_no_jump_and_no_motion_until_resume(controller):
    """Issue 10, items 2 and 3: a reset while the stop still brakes is refused with the reason and
    the stop goes on; at standstill it is accepted without re-anchoring (no jump), and the policy
    that kept streaming does not move the arm until resume_policy. The oracle is never restarted."""
    r, f, t, chk = moving_filter(speed=1.5, controller=controller)
    f.estop(t)
    t += DT
    f.on_joint_state(r.arm_joints, f.q, t)
    ok, msg = f.reset(t)  # the next tick after the e-stop, still at speed
    assert not ok and "still braking" in msg, msg
    assert f.estopped and f.status().state == "stopping"
    t = brake_to_standstill(r, f, t, chk)
    assert f.status().state == "estopped"
    # the measured arm is still moving (it lags the stop): refused as well
    f.on_joint_state(r.arm_joints, f.q + 0.02, t + DT)
    ok, msg = f.reset(t + DT)
    assert not ok and "still moving" in msg, msg
    latched = f.q.copy()
    sag = latched - 0.01  # standing still, 10 mrad below the latched output (within the tolerance)
    for _ in range(25):
        t += DT
        f.on_joint_state(r.arm_joints, sag, t)
        assert not chk.check(t, f.step(t))
    ok, msg = f.reset(t + 1.0)  # the last joint state 1 s old
    assert not ok and "fresh" in msg and f.estopped
    ok, msg = f.reset(t)
    assert ok, msg
    assert f.status().state == "holding:reset, waiting for resume"
    # the policy keeps streaming: nothing moves, every command is refused with the reason
    for _ in range(50):
        t += DT
        f.on_joint_state(r.arm_joints, sag, t)
        v = f.on_command("policy", r.arm_joints, [latched + 0.2], [0.3], 0.0, t)
        assert not v.accepted and "resume_policy" in v.reason
        o = f.step(t)
        assert not chk.check(t, o)
        np.testing.assert_array_equal(o.positions, latched)  # no re-anchoring on the measured position
    assert f.resume_policy(t)[0]
    assert f.status().state == "holding:waiting for command"
    assert f.on_command("policy", r.arm_joints, [latched + 0.2], [0.3], 0.0, t).accepted
    for _ in range(40):
        t += DT
        f.on_joint_state(r.arm_joints, f.q, t)
        assert not chk.check(t, f.step(t))
    assert f.source == "policy" and np.max(np.abs(f.q - latched)) > 0.05


def test_after_a_reset_only_a_new_teleop_session_starts_motion():
    """A teleop stream held through the e-stop and reset does not restart motion; a new teleop
    session (the deadman released, then pressed again) does: a deliberate start."""
    r, f, t, chk = moving_filter()
    f.estop(t)
    for _ in range(10):  # teleop streams all along (deadman held)
        t = brake_to_standstill(r, f, t, chk) if np.any(f.v) else t + DT
        f.on_command("teleop", r.arm_joints, [f.q], [0.2], 0.0, t)
    for _ in range(15):
        t += DT
        f.on_joint_state(r.arm_joints, f.q, t)
        f.on_command("teleop", r.arm_joints, [f.q + 0.1], [0.2], 0.0, t)
        assert not chk.check(t, f.step(t))
    assert f.reset(t)[0]
    v = f.on_command("teleop", r.arm_joints, [f.q + 0.1], [0.2], 0.0, t + DT)
    assert not v.accepted and "deadman" in v.reason
    t += 0.6  # deadman released: teleop silent for longer than command_timeout
    f.on_joint_state(r.arm_joints, f.q, t)
    assert f.on_command("teleop", r.arm_joints, [f.q + 0.1], [0.3], 0.0, t).accepted
    assert not chk.check(t, f.step(t))
    assert f.source == "teleop"


@pytest.mark.parametrize("kind", ["nan", "short", "unknown", "stale"])
def test_rejected_teleop_messages_keep_the_session_alive(kind):
    """A teleop device that streams through the e-stop and the reset, even messages the filter rejects,
    is still the same press of the deadman: its next valid command after the reset does not start
    motion (ISO 13850); only silence for longer than command_timeout ends the session."""
    r, f, t, chk = moving_filter()
    f.estop(t)
    t = brake_to_standstill(r, f, t, chk)
    for _ in range(15):
        t += DT
        f.on_joint_state(r.arm_joints, f.q, t)
        names, pts, times, stamp = bad_command(f, kind, f.q)
        assert not f.on_command("teleop", names, pts, times, t + stamp if stamp else 0.0, t).accepted
        assert not chk.check(t, f.step(t))
    assert f.reset(t)[0]
    names, pts, times, stamp = bad_command(f, kind, f.q)
    assert not f.on_command("teleop", names, pts, times, t + stamp if stamp else 0.0, t).accepted
    v = f.on_command("teleop", r.arm_joints, [f.q + 0.1], [0.2], 0.0, t + DT)
    assert not v.accepted and "deadman" in v.reason
    t += 0.6  # released: silent for longer than command_timeout
    f.on_joint_state(r.arm_joints, f.q, t)
    assert f.on_command("teleop", r.arm_joints, [f.q + 0.1], [0.3], 0.0, t).accepted


@pytest.mark.parametrize("controller", ["jtc", "isaac"])
def test_following_error_push_holds_at_measured_without_jump(controller):
    """Issue 10, item 4: a push moves the measured arm away from its command: the filter holds at
    the measured position (reached within the limits, never commanding the old pose again),
    reports the joint and the error, and needs resume_policy."""
    r, f, t, chk = moving_filter(controller=controller)
    before = f.q.copy()
    pushed = f.q.copy()
    pushed[1] += 0.3  # 0.3 rad on joint 2 (tolerance 0.1)
    t += DT
    f.on_joint_state(r.arm_joints, pushed, t, t)
    st = f.status()
    assert st.state == "holding:following error" and r.arm_joints[1] in st.message, st
    assert "rad from its command" in st.message and st.level == 2
    outs = []
    for _ in range(120):
        v = f.on_command("policy", r.arm_joints, [before], [0.3], 0.0, t)
        assert not v.accepted and "resume_policy" in v.reason
        o = f.step(t)
        assert not chk.check(t, o)
        outs.append(o.positions.copy())
        t += DT
        f.on_joint_state(r.arm_joints, pushed, t, t)
    outs = np.array(outs)
    np.testing.assert_allclose(outs[-1], pushed, atol=1e-9)  # holds where the arm is
    d = np.abs(outs - pushed).max(axis=1)
    assert np.all(np.diff(d[np.argmax(d):]) <= 1e-9)  # once braked, only ever closer to the arm
    assert f.status().state == "holding:following error"
    assert f.resume_policy(t)[0]
    assert f.on_command("policy", r.arm_joints, [pushed + 0.05], [0.3], 0.0, t).accepted


@pytest.mark.parametrize("robot", sorted(ROBOTS))
@pytest.mark.parametrize("late", [0.0, 0.1, 0.4])
def test_push_hold_approach_under_late_ticks_is_prompt_and_monotone(robot, late):
    """A JTC stream whose ticks come late (within late_tick): the hold after a push still reaches the
    measured arm as fast as with punctual ticks, and only ever closer to it. Without a cruise period
    on the hold's tail every late tick met the controller already braking: the approach crawled
    (over 10 s instead of 1-2 s) and the braking tail could overshoot the measured arm."""
    r, f, t, chk = moving_filter(robot)
    pushed = f.q.copy()
    pushed[1] += 0.3
    outs = []
    for _ in range(int(4.0 / DT)):  # 4 s of ticks, each `late` of a period late
        t += DT * (1 + late)
        f.on_joint_state(r.arm_joints, pushed, t, t)
        assert not chk.check(t, f.step(t))
        outs.append(f.jtc_points()[0].copy())
    assert f.status().state == "holding:following error"
    d = np.abs(np.array(outs) - pushed).max(axis=1)
    reached = np.nonzero(d < 1e-9)[0]
    assert reached.size and reached[0] * DT * (1 + late) < 2.5, d[::50]  # reached within 2.5 s
    assert np.all(d[reached[0]:] < 1e-9)  # and held there
    peak = int(np.argmax(d))
    assert np.all(np.diff(d[peak:]) <= 1e-12), np.diff(d[peak:]).max()  # once braked: only ever closer


def test_transport_delay_is_not_a_following_error():
    """A joint state compared at its own stamp: an arm that tracks perfectly but whose states arrive
    250 ms late (while moving fast) is no following error; compared at arrival it would be."""
    r, f = make("fr3", state_timeout=0.5)
    chk = Oracle(f)
    chk.check(0.0, start(f))
    tgt = r.home + 0.8
    hist = []
    t, vmax = 0.0, 0.0
    for k in range(1, 120):
        t = k * DT
        if k % 10 == 1:
            f.on_command("policy", r.arm_joints, [tgt], [0.5], 0.0, t)
        o = f.step(t)
        assert not chk.check(t, o)
        vmax = max(vmax, float(np.max(np.abs(o.velocities))))
        hist.append((t + DT, o.positions.copy()))
        late = [h for h in hist if h[0] <= t - 0.25]
        if late:  # the state of 250 ms ago, stamped then
            f.on_joint_state(r.arm_joints, late[-1][1], t, late[-1][0])
        assert f.status().state in ("ok", "holding:waiting for command"), f.status()
    assert vmax > 1.0  # moving fast: 250 ms of transport is > 0.25 rad
    f2 = SafetyFilter(r, SafetyConfig(robot="fr3", following_error_stamps=False, state_timeout=0.5))
    start(f2)
    for k in range(1, 120):
        t = k * DT
        if k % 10 == 1:
            f2.on_command("policy", r.arm_joints, [tgt], [0.5], 0.0, t)
        f2.step(t)
        late = [h for h in hist if h[0] <= t - 0.25]
        if late:
            f2.on_joint_state(r.arm_joints, late[-1][1], t, late[-1][0])
    assert f2.status().state == "holding:following error"


@pytest.mark.parametrize("controller", ["jtc", "forward"])
def test_bunched_and_late_ticks_hold_the_limits_in_real_time(controller):
    """Issue 10, item 5: two ticks 0.2 ms apart give a 0.2 ms step, not two full steps; a late tick
    continues what the controller did meanwhile (jtc: the tail; forward: hold -> restart at rest)."""
    r, f, t, chk = moving_filter(speed=1.5, controller=controller)
    v = np.max(np.abs(f.v))
    q = f.q.copy()
    t += 0.0002
    f.on_joint_state(r.arm_joints, f.q, t)
    assert not chk.check(t, f.step(t))
    assert np.max(np.abs(f.q - q)) <= (v + f.a_max[0] * DT) * (DT + 0.0002) + 1e-9
    for late in (0.025, 0.08):
        t += late
        f.on_joint_state(r.arm_joints, f.q, t)
        f.on_command("policy", r.arm_joints, [r.home - 0.3], [0.5], 0.0, t)
        assert not chk.check(t, f.step(t))
        for _ in range(5):
            t += DT
            f.on_joint_state(r.arm_joints, f.q, t)
            assert not chk.check(t, f.step(t))
    assert (f.interruptions > 0) == (controller == "forward")


def test_late_jtc_message_meets_the_controller_on_its_tail_no_reversal():
    """The simulator's JTC follower, fed the node's messages on the node's clock: with ticks late by
    up to 2.5 periods (and early ones) the follower never reverses along a forward motion: each
    late message continues from where the follower is on the previous tail."""
    from magma_ros.sim.follower import TrajectoryFollower

    r, f = make("fr3", max_step=0.0)
    chk = Oracle(f)
    chk.check(0.0, start(f))
    sign = np.where(np.arange(r.dof) % 2 == 0, 1.0, -1.0)
    far = r.home + sign * 0.6
    fol = TrajectoryFollower(r.home)
    rng = np.random.default_rng(1)
    t, vmax, k = 0.0, 0.0, 0
    while t < 1.4:
        t += DT * rng.choice([1.0, 1.0, 0.3, 1.5, 2.5])
        f.on_joint_state(r.arm_joints, f.q, t)
        if k % 10 == 0:  # "be at far at t = 2 s", re-sent from wherever the arm is
            f.on_command("policy", r.arm_joints, [far], [2.0 - t], 0.0, t)
        k += 1
        assert not chk.check(t, f.step(t))
        pts = f.jtc_points()
        fol.set_trajectory(t, [(i + 1) * DT for i in range(len(pts))], pts)  # the JTC on the node's clock
        for s_ in np.linspace(t, t + DT, 5):
            _, vel = fol.sample(s_)
            assert np.all(vel * sign >= -1e-9), vel  # no reversal along the motion
            vmax = max(vmax, float(np.max(np.abs(vel))))
    assert vmax > 0.25


@pytest.mark.parametrize("robot", sorted(ROBOTS))
def test_late_ticks_while_braking_into_a_limit(robot):
    """A message that comes 1.3 or 2.5 periods late, when the previous tail has already begun braking
    a joint into its limit band, cannot add the tail's cruise period (one more period at speed): the
    step is planned without it and the stop goes on within every limit. Each joint, both limits, the
    late tick at different phases of the approach (found by benchmarks/safety.py's fuzz on panda; fr3's
    position-dependent bound also applies to the cruise piece itself)."""
    r = ROBOTS[robot]
    found = []
    for j in range(r.dof):
        for side in (1.0, -1.0):
            for late in (1.3, 2.5):
                for phase in (0, 4, 8):
                    _, f = make(robot, max_step=0.0)
                    chk = Oracle(f)
                    q0 = 0.5 * (f.q_lo + f.q_hi)
                    q0[j] = (f.q_hi[j] - 0.25) if side > 0 else (f.q_lo[j] + 0.25)
                    chk.check(0.0, start(f, q0))
                    tgt = q0.copy()
                    tgt[j] = r.position_max[j] + 1.0 if side > 0 else r.position_min[j] - 1.0  # clamped
                    t = 0.0
                    for k in range(1, 60):
                        t += DT * (late if k % 12 == phase else 1.0)
                        f.on_joint_state(r.arm_joints, f.q, t)
                        if k % 3 == 1:
                            f.on_command("policy", r.arm_joints, [tgt], [0.1], 0.0, t)
                        bad = chk.check(t, f.step(t))
                        if bad or f.infeasible_steps:
                            found.append((r.arm_joints[j], side, late, phase, bad[:1], f.infeasible_steps))
                            break
                    assert abs(f.q[j] - q0[j]) > 0.2  # it did reach the band edge
    assert not found, found[:4]


def test_braking_tail_ends_at_rest_within_limits():
    r, f, t, chk = moving_filter("panda")
    tail = f.braking_tail()
    assert len(tail) >= 2
    np.testing.assert_allclose(tail[0] - f.q, f.v * DT, atol=1e-12)  # one period at the same velocity first
    audit = LimitAudit("panda", DT, position_margin=r.position_margin)
    audit.start_at(t, f.q, f.v)  # at the output, at speed
    audit.trajectory(t, [(i + 1) * DT for i in range(len(tail))], tail)
    assert not audit.finish()
    assert audit.pieces > len(tail)
    np.testing.assert_allclose(tail, f._braking_tail_exact(f.q, f.v, f.a, 200, cruise=1), atol=1e-12)
    q, v = f.q.copy(), f.v.copy()
    f.braking_tail()
    np.testing.assert_array_equal(q, f.q)  # the tail does not change the filter
    np.testing.assert_array_equal(v, f.v)


def test_braking_tail_near_a_limit_stays_inside():
    r, f = make("wx250s", max_step=0.0)
    chk = Oracle(f)
    chk.check(0.0, start(f))
    tgt = r.home.copy()
    tgt[0] = r.position_max[0]  # run joint 1 into its limit band edge at full speed
    tgt[2] = r.home[2] + 0.2
    for k in range(1, 400):
        f.on_joint_state(r.arm_joints, f.q, k * DT)
        if k % 20 == 1:
            f.on_command("policy", r.arm_joints, [tgt], [0.05], 0.0, k * DT)
        assert not chk.check(k * DT, f.step(k * DT))
        tail = LimitAudit("wx250s", DT, position_margin=r.position_margin)
        q0, v0, _, _ = f._path.state(k * DT)
        tail.start_at(k * DT, q0, v0)
        tail.trajectory(k * DT, [(i + 1) * DT for i in range(len(f.jtc_points()))], f.jtc_points())
        assert not tail.finish()  # the tail alone (if no message followed) stays inside the band
    np.testing.assert_allclose(f.q[0], f.q_hi[0], atol=1e-9)


@pytest.mark.parametrize("robot", ["fr3", "wx250s"])
def test_workspace_min_height_stops_before_the_floor(robot):
    from magma_ros.core.kinematics import Kinematics

    r = ROBOTS[robot]
    kin = Kinematics(r)
    z0 = kin.fk(r.home)[2, 3]
    f = SafetyFilter(r, SafetyConfig(robot=robot, workspace_enabled=True, min_tcp_height=z0 - 0.05,
                                     workspace_min=(-2, -2, -2), workspace_max=(2, 2, 2)))
    start(f)
    # a joint move that lowers the TCP a lot; find one numerically
    J = kin.jacobian(r.home)[:3] if hasattr(kin, "jacobian") else None
    d = np.zeros(r.dof)
    if J is not None:
        d = -J[2] / np.linalg.norm(J[2]) * 0.6
    else:
        d[1] = 0.6
    for k in range(1, 400):
        f.on_joint_state(r.arm_joints, f.q, k * DT)
        if k % 20 == 1:
            v = f.on_command("policy", r.arm_joints, [f.q + d * 0.1], [0.2], 0.0, k * DT)
        f.step(k * DT)
        assert kin.fk(f.q)[2, 3] >= z0 - 0.05 - 1e-3
    assert f.status().state in ("holding:workspace", "ok") or not v.accepted
    assert kin.fk(f.q)[2, 3] < z0 - 0.02  # it did move down towards the floor
    # a target below the floor is rejected outright
    low = f.q + d
    assert not f.on_command("policy", r.arm_joints, [low], [0.2], 0.0, 5.0).accepted


def test_config_errors_are_one_line_with_choices():
    r = ROBOTS["fr3"]
    with pytest.raises(ConfigError, match="did you mean 'jtc'"):
        SafetyFilter(r, SafetyConfig(controller="jtx"))
    with pytest.raises(ConfigError, match="at most 250 Hz"):
        SafetyFilter(r, SafetyConfig(output_rate=1000.0))
    SafetyFilter(ROBOTS["wx250s"], SafetyConfig(output_rate=1000.0))  # no jerk limit published
    with pytest.raises(ConfigError, match="velocity_scale"):
        SafetyFilter(r, SafetyConfig(velocity_scale=1.5))
    with pytest.raises(ConfigError, match="no room"):
        SafetyFilter(r, SafetyConfig(position_margin=2.0))


def test_fr3_position_dependent_velocity_near_a_limit():
    """Driving joint 5 (k = 34) into its upper limit at full speed respects libfranka's bound."""
    r, f = make("fr3", position_margin=0.0)
    q0 = r.home.copy()
    q0[4] = 1.0
    chk = Oracle(f)
    chk.check(0.0, start(f, q0))
    tgt = q0.copy()
    tgt[4] = 5.0
    for k in range(0, 300):
        t = k * DT
        f.on_joint_state(r.arm_joints, f.q, t)
        if k % 20 == 0:
            f.on_command("policy", r.arm_joints, [tgt], [0.3], 0.0, t)
        assert not chk.check(t, f.step(t))
    assert f.q[4] == pytest.approx(r.position_max[4], abs=1e-4)  # the bound reaches 0 at the limit
    assert f.infeasible_steps == 0


def test_clock_jumping_back_invalidates_states_and_commands():
    r, f, t, chk = moving_filter()
    f.step(t)
    t_back = t - 0.3  # simulation reset
    out = f.step(t_back)
    assert f.status().state == "holding:stale joint states"
    assert out is not None  # still commands a controlled stop
    f.on_joint_state(r.arm_joints, f.q, t_back)
    assert f.on_command("policy", r.arm_joints, [f.q], [0.3], 0.0, t_back).accepted


def test_safety_yaml_matches_the_config():
    import yaml

    from magma_ros.core.paths import data_path

    params = yaml.safe_load(data_path("config", "safety.yaml").read_text())["/**"]["ros__parameters"]
    node_only = {"franka_gripper_ns", "franka_grasp_force"}
    fields = {k: v for k, v in params.items() if k not in node_only}
    cfg = SafetyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}).validate()
    defaults = SafetyConfig()
    for k in fields:  # the file documents the defaults
        assert getattr(cfg, k) == getattr(defaults, k), k
