"""Safety benchmark: core cost per command / output step; over DDS the command -> output latency and
the e-stop latch latency (e-stop published -> the node stops following), p50/p99 with the machine's
load; JTC streaming with zero vs step-time stamps through the simulator's JTC follower under
delivery jitter; and a fuzz run of random (mostly bad) messages with the number of limit violations
(checked by the independent LimitAudit on real elapsed time).

    .venv/bin/python benchmarks/safety.py [--messages 100000] [--latency-samples 200] [--estop-samples 40] [--no-node]

Writes the "safety" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import machine, write_section  # noqa: E402

from magma_ros.core.limit_audit import LimitAudit  # noqa: E402
from magma_ros.core.robot import NORMALIZED_GRIPPER, load_robot  # noqa: E402
from magma_ros.core.safety import SafetyConfig, SafetyFilter  # noqa: E402

DT = 0.01


# --------------------------------------------------------------------------------------- core cost
def _per_call_us(fn, n: int, repeats: int = 5) -> tuple[float, float]:
    """(wall, CPU) µs per call, best of ``repeats`` batches (on a shared machine the minimum is the
    least disturbed; CPU time excludes waiting for a core)."""
    wall = cpu = math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _k in range(n):
            fn()
        wall = min(wall, (time.perf_counter() - t0) / n)
        cpu = min(cpu, (time.process_time() - c0) / n)
    return wall * 1e6, cpu * 1e6


def core_cost(robot="fr3", n=2000) -> dict:
    r = load_robot(robot)
    f = SafetyFilter(r, SafetyConfig(robot=robot))
    f.on_joint_state(r.arm_joints, r.home, 0.0)
    f.step(0.0)
    names = list(r.arm_joints) + [NORMALIZED_GRIPPER]
    one = [np.append(r.home + 0.01, 0.5)]
    ten = [np.append(r.home + 0.01 * (i + 1), 0.5) for i in range(10)]
    out = {}
    for label, pts in (("1 point", one), ("10 points", ten)):
        times = [0.1 * (i + 1) for i in range(len(pts))]
        out[f"on_command, accepted ({label})"] = _per_call_us(
            lambda pts=pts, times=times: f.on_command("policy", names, pts, times, 0.0, 0.0), n)
    bad = [np.append(r.home, math.nan)]
    out["on_command, rejected (NaN)"] = _per_call_us(
        lambda: f.on_command("policy", names, bad, [0.1], 0.0, 0.0), n)

    # output steps while following a changing command (pass-through and catch-up both occur)
    state = {"t": 0.0, "k": 0}

    def one_step():
        state["t"] += DT
        state["k"] += 1
        t = state["t"]
        f.on_joint_state(r.arm_joints, f.q, t)
        if state["k"] % 10 == 0:
            f.on_command("policy", r.arm_joints, [r.home + 0.3 * math.sin(state["k"] / 50)], [0.15], 0.0, t)
        f.step(t)

    out["step: one output incl. its joint state (+ a command every 10th)"] = _per_call_us(one_step, n // 2)
    f.on_command("policy", r.arm_joints, [r.home + 0.5], [0.05], 0.0, state["t"])
    for _ in range(20):
        state["t"] += DT
        f.on_joint_state(r.arm_joints, f.q, state["t"])
        f.step(state["t"])
    tail = f.braking_tail()
    out[f"braking_tail for JTC ({len(tail)} points)"] = _per_call_us(f.braking_tail, n // 4)
    return out


# ---------------------------------------------------------------------------------------------- fuzz
def fuzz(n_messages: int, seed: int = 0) -> dict:
    """Random messages (valid, out of limits, malformed, e-stop / reset / resume, joint states) with
    output steps in between, on every robot; every output is checked independently."""
    rng = np.random.default_rng(seed)
    pyr = random.Random(seed)
    per_robot = {}
    total_viol = total_steps = total_msgs = rejected = infeasible = 0
    robots = ("fr3", "panda", "wx250s")
    for ri, robot in enumerate(robots):
        r = load_robot(robot)
        f = SafetyFilter(r, SafetyConfig(robot=robot))
        chk = LimitAudit(r, DT, position_margin=r.position_margin)  # never restarted (not even at a reset)
        n = r.dof
        names = list(r.arm_joints)
        lo, hi = r.position_min, r.position_max
        t = 0.0
        measured = lo + rng.random(n) * (hi - lo)
        budget = n_messages // len(robots) + (n_messages % len(robots) if ri == 0 else 0)
        msgs = viol = steps = 0
        while msgs < budget:
            kind = pyr.random()
            msgs += 1
            if kind < 0.30:  # joint state (sometimes bad, sometimes missing for a while)
                if pyr.random() < 0.05:
                    f.on_joint_state(names, [math.nan] * n, t)
                elif pyr.random() < 0.02:
                    t += pyr.uniform(0.1, 0.6)  # a gap: stale states
                else:
                    f.on_joint_state(names, measured, t)
            elif kind < 0.93:  # a command
                src = "teleop" if pyr.random() < 0.2 else "policy"
                npts = pyr.randint(1, 5)
                base = f.q if f.initialized else measured
                scale = pyr.choice([0.02, 0.2, 1.0, 4.0])
                pts = [base + rng.normal(0, scale, n) for _ in range(npts)]
                times = list(np.cumsum(rng.uniform(0.0, 0.3, npts)))
                stamp = pyr.choice([0.0, 0.0, t - pyr.uniform(0, 1.0), t + pyr.uniform(0, 0.1)])
                nm = list(names)
                corrupt = pyr.random()
                if corrupt < 0.05:
                    pts[0][pyr.randrange(n)] = pyr.choice([math.nan, math.inf, -math.inf])
                elif corrupt < 0.08:
                    nm[pyr.randrange(n)] = "bogus"
                elif corrupt < 0.11:
                    nm = nm[:-1]
                elif corrupt < 0.14:
                    pts[-1] = pts[-1][:-1]
                elif corrupt < 0.16:
                    pts, times = [], []
                elif corrupt < 0.19 and npts > 1:
                    times[-1] = times[0]
                elif corrupt < 0.21:
                    times[0] = -0.1
                elif corrupt < 0.30:
                    nm = nm + [NORMALIZED_GRIPPER]
                    pts = [np.append(p, pyr.uniform(-1, 2)) for p in pts]
                elif corrupt < 0.33:
                    perm = rng.permutation(n)
                    nm = [nm[i] for i in perm]
                    pts = [p[perm] for p in pts]
                v = f.on_command(src, nm, pts, times, stamp, t)
                rejected += not v.accepted
            elif kind < 0.95:
                f.estop(t)
            elif kind < 0.98:
                f.reset(t)  # refused while braking / moving
            else:
                f.resume_policy(t)
            if pyr.random() < 0.6:  # output steps
                for _ in range(pyr.randint(1, 4)):
                    out, t_step = f.step(t), t
                    t += DT * pyr.choice([1.0, 1.0, 1.0, 0.3, 1.6, 3.0])  # ticks on time, early, late
                    if out is None:
                        continue
                    pts = f.jtc_points()
                    viol += bool(chk.trajectory(t_step, [(i + 1) * DT for i in range(len(pts))], pts))
                    steps += 1
                    measured = np.clip(out.positions + rng.normal(0, 0.0005, n), lo, hi)
        per_robot[robot] = (msgs, steps, viol)
        total_viol += viol
        total_steps += steps
        total_msgs += msgs
        infeasible += f.infeasible_steps
    return {"messages": total_msgs, "rejected": rejected, "steps": total_steps, "violations": total_viol,
            "infeasible": infeasible, "per_robot": per_robot}


# -------------------------------------------------------------------------------------- node latency
def _pct(x) -> dict:
    a = np.asarray(x, float)
    if a.size == 0:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "mean": math.nan, "max": math.nan}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "max": float(a.max())}


def node_latency(samples: int, estop_samples: int) -> dict:
    """The node in its own process (FR3, isaac output: stamped with the step time, 100 Hz).

    - command -> output: a small step command published -> the first output that moves, received
      here (output_on_command: at once, or at the next tick after an extra output);
    - e-stop latch: ``safety/estop`` published while the node follows a steady 0.4 rad/s motion ->
      the first output step that no longer follows it (decelerates), by that output's stamp (the node
      clock = this machine's clock) and by its arrival here.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Empty
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(random.randint(100, 200)), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RMW_IMPLEMENTATION="rmw_fastrtps_cpp", PYTHONUNBUFFERED="1")
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                           "RMW_IMPLEMENTATION")})
    r = load_robot("fr3")
    proc = subprocess.Popen([sys.executable, "-m", "magma_ros.nodes.safety", "--ros-args", "-p", "robot:=fr3",
                             "-p", "controller:=isaac", "-p", "state_timeout:=1.0", "-p", "command_timeout:=1.0"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("safety_bench", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    outs = []  # (arrival wall time, stamp [s], positions)

    def on_out(m):
        outs.append((time.time(), m.header.stamp.sec + m.header.stamp.nanosec * 1e-9,
                     np.array(m.position[:r.dof])))

    node.create_subscription(JointState, "joint_command", on_out, 100)
    js_pub = node.create_publisher(JointState, r.joint_states_topic, 10)
    cmd_pub = node.create_publisher(JointTrajectory, "magma/joint_command", 10)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    estop_pub = node.create_publisher(Empty, "safety/estop", latched)
    reset_cli = node.create_client(Trigger, "safety/reset")
    resume_cli = node.create_client(Trigger, "safety/resume_policy")
    q = r.home.copy()

    def spin(pred, timeout):
        end = time.perf_counter() + timeout
        last_js = 0.0
        while time.perf_counter() < end:
            if time.perf_counter() - last_js > 0.02:
                last_js = time.perf_counter()
                pos = outs[-1][2] if outs else q
                js_pub.publish(JointState(name=list(r.arm_joints), position=[float(x) for x in pos]))
            ex.spin_once(timeout_sec=0.001)
            if pred():
                return True
        return False

    def command(target, horizon):
        m = JointTrajectory(joint_names=list(r.arm_joints))
        m.points.append(JointTrajectoryPoint(positions=[float(x) for x in target]))
        m.points[0].time_from_start.sec = int(horizon)
        m.points[0].time_from_start.nanosec = int(round((horizon % 1.0) * 1e9))
        cmd_pub.publish(m)

    def call(cli):
        if not cli.wait_for_service(timeout_sec=10.0):
            return False
        fut = cli.call_async(Trigger.Request())
        spin(fut.done, 10.0)
        return fut.done() and fut.result().success

    def still():
        return len(outs) > 3 and np.array_equal(outs[-1][2], outs[-3][2])

    lat, latch_stamp, latch_arrival, next_out = [], [], [], []
    try:
        if not spin(lambda: len(outs) > 10, 60.0):
            raise RuntimeError("safety node did not come up")
        sign = 1.0
        for _i in range(samples):
            spin(still, 2.0)  # at rest
            base = outs[-1][2].copy()
            n0 = len(outs)
            tgt = base.copy()
            tgt[0] += sign * 0.002
            sign = -sign
            t_pub = time.time()
            command(tgt, 0.02)
            if spin(lambda n0=n0, base=base: len(outs) > n0 and not np.array_equal(outs[-1][2], base), 2.0):
                lat.append((outs[-1][0] - t_pub) * 1e3)
        direction = np.where(np.arange(r.dof) % 2 == 0, 1.0, -1.0)
        for k in range(estop_samples):
            sgn = 1.0 if k % 2 == 0 else -1.0
            t_end = time.time() + 3.0
            while time.time() < t_end:  # a steady 0.4 rad/s motion (0.3 s horizon, re-sent at 20 Hz)
                command(outs[-1][2] + sgn * direction * 0.4 * 0.3, 0.3)
                spin(lambda: False, 0.05)
                if len(outs) > 5:
                    v = np.abs(outs[-1][2] - outs[-2][2]) / max(outs[-1][1] - outs[-2][1], 1e-6)
                    if np.all(np.abs(v - 0.4) < 0.05):
                        break
            else:
                continue
            n0 = len(outs)
            t_pub = time.time()
            estop_pub.publish(Empty())
            spin(lambda: False, 0.6)
            after = [o for o in outs[n0:] if o[1] >= t_pub]  # isaac stamps: the node clock = this clock
            if after:
                next_out.append((after[0][0] - t_pub) * 1e3)
            seg = outs[max(n0 - 5, 1) - 1:]  # the controlled stop: the monotone deceleration that ends at rest
            sp = [np.max(np.abs(b_[2] - a_[2])) / max(b_[1] - a_[1], 1e-6) for a_, b_ in zip(seg, seg[1:])]
            stop = next((i for i, x in enumerate(sp) if x < 1e-9), None)
            if stop is not None and stop > 0:
                j = stop
                while j > 0 and sp[j - 1] > sp[j] + 1e-6:  # strictly slower piece by piece
                    j -= 1
                made, arrived = seg[j + 1][1], seg[j + 1][0]  # piece j = the first braking step, made then
                latch_stamp.append(max(made - t_pub, 0.0) * 1e3)
                latch_arrival.append((arrived - t_pub) * 1e3)
            spin(still, 3.0)
            spin(lambda: False, 0.3)  # standing still for longer than the standstill window
            call(reset_cli)
            call(resume_cli)
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"command": _pct(lat), "latch_stamp": _pct(latch_stamp), "latch_arrival": _pct(latch_arrival),
            "estop_next": _pct(next_out)}


# --------------------------------------------------------------------------- JTC stamps vs follower
def jtc_stamps(seconds: float = 20.0, seed: int = 0, loaded: bool = True) -> dict:
    """The node's JTC stream (FR3 core, 100 Hz ticks with scheduling jitter: 20 % of ticks late by
    up to 2.5 periods, 10 % early) delivered in order with a random delay (70 % 0.5-2 ms, 25 % 2-10
    ms, 5 % 10-40 ms) to the simulator's JTC follower, once with zero stamps ("start on arrival", the
    ros2_control streaming advice) and once with the step time as the stamp (ros2_control's rule for a
    stamp in the past: from the state at arrival to the first point still ahead). The follower's
    set-point path is audited (LimitAudit) and its velocity reversals are counted."""
    from magma_ros.sim.follower import TrajectoryFollower

    out = {}
    for mode in ("zero", "tick"):
        rng = np.random.default_rng(seed)
        r = load_robot("fr3")
        f = SafetyFilter(r, SafetyConfig(robot="fr3", max_step=0.0, jtc_stamp=mode))
        f.on_joint_state(r.arm_joints, r.home, 0.0)
        f.step(0.0)
        fol = TrajectoryFollower(r.home)
        audit = LimitAudit(r, DT, position_margin=r.position_margin)
        msgs = []  # (arrival, stamp, points)
        t, k = 0.0, 0
        sign = np.where(np.arange(r.dof) % 2 == 0, 1.0, -1.0)
        while t < seconds:
            u = rng.random()
            t += DT * (rng.uniform(1.2, 2.5) if u < 0.2 else rng.uniform(0.3, 0.9) if u < 0.3 else 1.0)
            f.on_joint_state(r.arm_joints, f.q, t)
            if k % 10 == 0:  # a back-and-forth motion at up to ~1 rad/s
                goal = np.clip(r.home + sign * (0.5 if (t % 4.0) < 2.0 else -0.5), f.q_lo, f.q_hi)
                f.on_command("policy", r.arm_joints, [goal], [max(2.0 - (t % 2.0), 0.2)], 0.0, t)
            k += 1
            f.step(t)
            u = rng.random()
            if loaded:
                delay = rng.uniform(0.0005, 0.002) if u < 0.7 else rng.uniform(0.002, 0.01) if u < 0.95 else \
                    rng.uniform(0.01, 0.04)
            else:  # an idle host: always well inside one period
                delay = rng.uniform(0.0002, 0.003)
            arrival = max(t + delay, msgs[-1][0] if msgs else 0.0)  # one writer: delivered in order
            msgs.append((arrival, t, f.jtc_points()))
        samples, prev_v, reversals, max_jump = [], None, 0, 0.0
        for i, (arr, stamp, pts) in enumerate(msgs):
            rel = (np.arange(1, len(pts) + 1) * DT) + (stamp - arr if mode == "tick" else 0.0)
            keep = rel > 0
            if not np.any(keep):
                continue
            fol.set_trajectory(arr, rel[keep], pts[keep])
            audit.trajectory(arr, rel[keep], pts[keep])
            nxt = msgs[i + 1][0] if i + 1 < len(msgs) else arr + DT
            for s_ in np.arange(arr, nxt, 0.001):
                q, v = fol.sample(s_)
                if prev_v is not None:
                    reversals += int(np.any((np.sign(v) != np.sign(prev_v)) & (np.abs(v) > 1e-3)
                                            & (np.abs(prev_v) > 1e-3)))
                prev_v = v
                jump = 0.0 if not samples else float(np.max(np.abs(q - samples[-1])))
                max_jump = max(max_jump, jump)
                samples.append(q)
        audit.finish()
        out[mode] = {"violations": len(audit.violations), "peak_velocity": audit.peak_velocity,
                     "peak_acceleration": audit.peak_acceleration, "reversals": reversals,
                     "max_step_1ms": max_jump,
                     "messages": len(msgs)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--estop-samples", type=int, default=40)
    ap.add_argument("--no-node", action="store_true", help="skip the node latencies (no ROS graph)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--jtc-only", action="store_true", help="only the JTC stamp comparison (its own section)")
    ap.add_argument("--no-jtc", action="store_true", help="skip the JTC stamp comparison")
    args = ap.parse_args()
    if args.jtc_only:
        return jtc_section(args.no_write)

    uptime = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    cost = core_cost()
    for k, (w, c) in cost.items():
        print(f"core {k}: {w:.1f} us wall, {c:.1f} us CPU")
    t0 = time.perf_counter()
    fz = fuzz(args.messages)
    fuzz_s = time.perf_counter() - t0
    print(f"fuzz: {fz['messages']} messages ({fz['rejected']} rejected), {fz['steps']} outputs checked, "
          f"{fz['violations']} violations, {fz['infeasible']} infeasible steps, {fuzz_s:.1f} s")
    lat = None
    if not args.no_node:
        lat = node_latency(args.latency_samples, args.estop_samples)
        print(f"node latencies: {lat}")
    uptime_after = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    lines = ["## Safety filter (`benchmarks/safety.py`)", "",
             f"Machine: {machine()}; load average (1/5/15 min) {uptime} before and {uptime_after} after the run "
             "(`uptime`); on a loaded machine wall times include waiting for a "
             "core; CPU times do not.", "",
             "| core operation (FR3, 7 joints) | µs wall | µs CPU |", "|---|---|---|"]
    lines += [f"| {k} | {w:.1f} | {c:.1f} |" for k, (w, c) in cost.items()]
    lines += ["", f"Fuzz: **{fz['messages']:,} random messages** through the core (FR3, Panda, WX250s; "
              f"valid, out-of-limit, NaN/inf, unknown/missing joints, wrong lengths, empty, non-increasing "
              f"times, stale/future stamps, e-stop/reset/resume, bad and stale joint states; output ticks on "
              f"time, early and late), {fz['rejected']:,} rejected, {fz['steps']:,} JTC messages whose executed "
              f"path was audited (LimitAudit: position, velocity (FR3: position-dependent), acceleration on "
              f"real elapsed time, never restarted): **{fz['violations']} violations**, "
              f"{fz['infeasible']} infeasible steps ({fuzz_s:.0f} s)."]
    if lat:
        c, ls, la, en = lat["command"], lat["latch_stamp"], lat["latch_arrival"], lat["estop_next"]
        lines += ["", "Node over DDS (separate processes, Fast DDS, localhost, FR3, isaac output at 100 Hz, "
                  f"load average {uptime} → {uptime_after}):", "",
                  "| latency | n | p50 ms | p99 ms | mean ms | max ms |", "|---|---|---|---|---|---|",
                  f"| command published → first changed output received | {c['n']} | {c['p50']:.2f} | "
                  f"{c['p99']:.2f} | {c['mean']:.2f} | {c['max']:.2f} |",
                  f"| e-stop published → first output step that stops following (its stamp) | {ls['n']} | "
                  f"{ls['p50']:.2f} | {ls['p99']:.2f} | {ls['mean']:.2f} | {ls['max']:.2f} |",
                  f"| e-stop published → that output received | {la['n']} | {la['p50']:.2f} | "
                  f"{la['p99']:.2f} | {la['mean']:.2f} | {la['max']:.2f} |",
                  f"| e-stop published → the next output received (the stop's first step) | {en['n']} | "
                  f"{en['p50']:.2f} | {en['p99']:.2f} | {en['mean']:.2f} | {en['max']:.2f} |", "",
                  "With `output_on_command` (default) an accepted command or an e-stop is output at once, at "
                  "most once between two ticks; a command that comes right after such an extra output waits for "
                  "the next tick (0–10 ms at 100 Hz). The benchmark publishes each command right after an "
                  "output arrived. The 'monotone stop' rows take the start of the deceleration that ends at "
                  "rest; when the stream is already slowing (the re-sent motion command ends) before the "
                  "e-stop arrives they come out early (≤ 0 ms): the 'next output' row is the direct one."]
    if not args.no_write:
        write_section("safety", "\n".join(lines))
    if not args.no_write and not args.no_jtc:
        jtc_section(False)
    return 1 if fz["violations"] or fz["infeasible"] else 0


def jtc_section(no_write: bool) -> int:
    """JTC zero vs step-time stamps through the sim follower, idle and loaded delivery (own section)."""
    rows = ["## JTC stamps through the simulator's JTC follower (`benchmarks/safety.py --jtc-only`)", "",
            f"Load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (a simulation: the figures do not "
            "depend on the load). 20 s of back-and-forth FR3 motion from the core filter, ticks jittered "
            "(20 % late by 1.2–2.5 periods, 10 % early), delivered in order with a delay; the follower's "
            "set-point path audited by LimitAudit (see `jtc_stamps`).", "",
            "| delivery | header stamp | audit violations | peak velocity / limit | peak Δv / (A·w) "
            "| largest 1 ms step [rad] | reversals |",
            "|---|---|---|---|---|---|---|"]
    for loaded, label in ((False, "idle host, 0.2–3 ms"), (True, "loaded, 5 % at 10–40 ms")):
        js = jtc_stamps(loaded=loaded)
        for mode, name in (("zero", "zero (start on arrival)"), ("tick", "step time (`jtc_stamp: tick`)")):
            v = js[mode]
            print(f"jtc {label} {mode}: {v}")
            rows.append(f"| {label} | {name} | {v['violations']} | {v['peak_velocity']:.2f} | "
                        f"{v['peak_acceleration']:.0f} | {v['max_step_1ms']:.4f} | {v['reversals']} |")
    if not no_write:
        write_section("safety-jtc", "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
