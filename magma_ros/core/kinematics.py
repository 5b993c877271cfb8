"""Forward kinematics, Jacobian and damped-least-squares inverse kinematics on pinocchio.

ROS-free. One :class:`Kinematics` per arm, built from the robot's URDF (``RobotConfig.urdf``) with every
joint that is not an arm joint locked (fingers, the WidowX gripper servo), so ``q`` is always the arm
joints in ``RobotConfig.arm_joints`` order.

Conventions (the rest of the stack relies on them):

- Poses are 4x4 homogeneous matrices of the TCP frame (``tcp_link``) in the ``base_link`` frame.
- The Jacobian is 6 x n, rows ``[v; w]``: linear velocity of the TCP origin and angular velocity, both in
  base-frame axes (pinocchio's ``LOCAL_WORLD_ALIGNED``).
- End-effector deltas are base-frame: translation ``dpos`` [m] and rotation vector ``drotvec`` [rad]
  applied on the left, ``R_target = Exp(drotvec) @ R``.

The IK never returns a configuration outside ``[lower, upper]``. When ``IKResult.ok`` is False the
returned ``q`` is only the best in-limit configuration found; do not send it to an arm blindly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pinocchio as pin

from magma_ros.core.errors import ConfigError
from magma_ros.core.robot import RobotConfig, load_robot

__all__ = [
    "IKResult",
    "Kinematics",
    "matrix_to_quat",
    "matrix_to_rotvec",
    "matrix_to_rpy",
    "pose_error",
    "quat_to_matrix",
    "rotvec_to_matrix",
    "rpy_to_matrix",
]


# ----------------------------------------------------------------------------------------- rotations
def rotvec_to_matrix(rotvec) -> np.ndarray:
    """Rotation vector [rad] (3,) -> rotation matrix (3, 3) (SO(3) exponential)."""
    return np.array(pin.exp3(np.asarray(rotvec, dtype=float).reshape(3)))


def matrix_to_rotvec(R) -> np.ndarray:
    """Rotation matrix (3, 3) -> rotation vector (3,) [rad], angle in [0, pi] (SO(3) logarithm)."""
    return np.array(pin.log3(np.asarray(R, dtype=float).reshape(3, 3)))


def quat_to_matrix(q_xyzw) -> np.ndarray:
    """Quaternion in ROS order (x, y, z, w), normalized here -> rotation matrix (3, 3)."""
    x, y, z, w = (float(v) for v in np.asarray(q_xyzw, dtype=float).reshape(4))
    quat = pin.Quaternion(w, x, y, z)  # pinocchio/Eigen constructor order is (w, x, y, z)
    if not quat.norm() > 1e-12:
        raise ValueError("quaternion has zero norm")
    quat.normalize()
    return np.array(quat.toRotationMatrix())


def matrix_to_quat(R) -> np.ndarray:
    """Rotation matrix (3, 3) -> quaternion (x, y, z, w) in ROS order, w >= 0."""
    q = np.array(pin.Quaternion(np.asarray(R, dtype=float).reshape(3, 3)).coeffs())  # (x, y, z, w)
    return -q if q[3] < 0 else q


def rpy_to_matrix(rpy) -> np.ndarray:
    """Fixed-axis roll, pitch, yaw [rad] (URDF convention, R = Rz(y) Ry(p) Rx(r)) -> (3, 3)."""
    r, p, y = (float(v) for v in np.asarray(rpy, dtype=float).reshape(3))
    return np.array(pin.rpy.rpyToMatrix(r, p, y))


def matrix_to_rpy(R) -> np.ndarray:
    """Rotation matrix (3, 3) -> fixed-axis roll, pitch, yaw (3,) [rad]."""
    return np.array(pin.rpy.matrixToRpy(np.asarray(R, dtype=float).reshape(3, 3)))


def pose_error(target: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base-frame error from ``current`` to ``target`` (both 4x4): (dpos (3,) [m], drotvec (3,) [rad]).

    ``target = (current.p + dpos, Exp(drotvec) @ current.R)``, the same convention as ``solve_delta``.
    """
    dp = target[:3, 3] - current[:3, 3]
    dr = np.array(pin.log3(target[:3, :3] @ current[:3, :3].T))
    return dp, dr


# ------------------------------------------------------------------------------------------- IK result
@dataclass(frozen=True)
class IKResult:
    """Outcome of an IK solve.

    ``ok`` is True only when the pose error is within tolerance. Otherwise ``status`` says why:
    "unreachable" (beyond the reach bound, or every attempt got stuck short of the target: past the
    workspace, blocked by joint limits, or, rarely, a reachable target the search missed), "singular"
    (stuck at a singular configuration with the target within reach) or "max_iters" (still converging
    when the iteration budget ran out). Then ``q`` is the best in-limit configuration found, which
    callers must not send to an arm blindly.
    """

    q: np.ndarray  # (n,) [rad] arm joints in config order, always within [lower, upper]
    ok: bool  # pose error within (pos_tol, rot_tol)
    status: str  # "ok" | "unreachable" | "singular" | "max_iters"
    pos_err: float  # [m] TCP position error at q
    rot_err: float  # [rad] TCP rotation error at q (angle of the residual rotation)
    iters: int = 0  # DLS iterations used, all attempts together


# ------------------------------------------------------------------------------------------ kinematics
class Kinematics:
    """FK, Jacobian and damped-least-squares IK of one arm (pinocchio model of the arm joints only).

    Not thread-safe (one pinocchio ``Data`` per instance): use one instance per thread.

    Args:
        robot: a :class:`RobotConfig` or a robot name / YAML path for :func:`load_robot`.
        null_gain: gain of the null-space pull toward ``home`` on redundant arms (Franka): each solve's
            first step adds ``(I - J# J) * null_gain * (home - q)``, at most 0.05 rad per joint.
        damping_min: damping floor of the adaptive (Levenberg-Marquardt) damped least squares [m^2].
        max_step: largest joint step per iteration [rad].
        singular_tol: smallest singular value of the 6 x n Jacobian below which a configuration counts
            as singular.
    """

    _LAM0 = 1e-3  # initial damping [m^2]
    _LAM_MAX = 1e4  # damping at which an attempt counts as stuck
    _NULL_MAX = 0.05  # [rad] largest null-space pull per solve
    _SLOW_WINDOW = 12  # iterations over which the error must fall 4x, else the attempt counts as stuck

    def __init__(self, robot: RobotConfig | str, *, null_gain: float = 0.05, damping_min: float = 1e-6,
                 max_step: float = 0.4, singular_tol: float = 1e-3):
        self.robot: RobotConfig = robot if isinstance(robot, RobotConfig) else load_robot(robot)
        cfg = self.robot
        urdf = cfg.urdf
        if not urdf.is_file():
            raise ConfigError(f"robot '{cfg.name}': URDF not found: {urdf}")
        try:
            full = pin.buildModelFromUrdf(str(urdf))
        except Exception as e:  # noqa: BLE001 - pinocchio raises plain exceptions on bad XML
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"robot '{cfg.name}': cannot parse URDF {urdf} ({first})") from None
        names = list(full.names)
        missing = [j for j in cfg.arm_joints if j not in names]
        if missing:
            raise ConfigError(f"robot '{cfg.name}': arm joints {missing} not in {urdf.name}; "
                              f"URDF joints: {', '.join(names[1:])}")
        lock = [full.getJointId(n) for n in names[1:] if n not in cfg.arm_joints]
        model = pin.buildReducedModel(full, lock, pin.neutral(full)) if lock else full
        for n in cfg.arm_joints:
            jm = model.joints[model.getJointId(n)]
            if jm.nq != 1 or jm.nv != 1:
                raise ConfigError(f"robot '{cfg.name}': arm joint '{n}' must be revolute or prismatic")
        for frame in (cfg.base_link, cfg.tcp_link):
            if not model.existFrame(frame):
                raise ConfigError(f"robot '{cfg.name}': frame '{frame}' not in {urdf.name}")
        self.model = model
        self.data = model.createData()
        self._tcp = model.getFrameId(cfg.tcp_link)
        self._base = model.getFrameId(cfg.base_link)
        base_frame = model.frames[self._base]
        if getattr(base_frame, "parentJoint", getattr(base_frame, "parent", 0)) != 0:  # pinocchio 3 / 2
            raise ConfigError(f"robot '{cfg.name}': base_link '{cfg.base_link}' must not move with the arm")
        self._qidx = np.array([model.joints[model.getJointId(n)].idx_q for n in cfg.arm_joints])
        self._vidx = np.array([model.joints[model.getJointId(n)].idx_v for n in cfg.arm_joints])
        self._identity_order = bool(np.array_equal(self._qidx, np.arange(model.nq))
                                    and np.array_equal(self._vidx, np.arange(model.nv)))
        self.joint_names: tuple[str, ...] = tuple(cfg.arm_joints)
        self.n = len(self.joint_names)
        # Limits: the robot config, narrowed to the URDF's where the URDF is tighter.
        self.lower: np.ndarray = np.maximum(cfg.position_min, model.lowerPositionLimit[self._qidx])
        self.upper: np.ndarray = np.minimum(cfg.position_max, model.upperPositionLimit[self._qidx])
        self.home: np.ndarray = np.clip(np.asarray(cfg.home, dtype=float), self.lower, self.upper)
        self.null_gain = float(null_gain)
        self.damping_min = float(damping_min)
        self.max_step = float(max_step)
        self.singular_tol = float(singular_tol)
        self._eye3 = np.eye(3)
        # Joints whose range spans a full turn (WidowX waist / forearm_roll / wrist_rotate): a global solve
        # may wrap them by 2 pi, which leaves the pose unchanged.
        self._wrap = (self.upper - self.lower) >= 2 * np.pi - 1e-3
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

        q0 = self._to_pin(self.home)
        pin.framesForwardKinematics(model, self.data, q0)
        oMb = self.data.oMf[self._base]
        self._base_inv = oMb.inverse()
        self._R_bw = np.array(self._base_inv.rotation)  # (3, 3) world -> base axes
        self._base_is_world = bool(np.allclose(oMb.homogeneous, np.eye(4)))
        # Reach bound for a quick "unreachable" answer: |TCP - centre| <= sum of the offsets along the
        # chain from the centre, the second joint's origin when it lies on the first joint's axis (all
        # supported arms: the shoulder), else the first joint's origin.
        jid = [model.getJointId(n) for n in cfg.arm_joints]
        first = jid[0] if self.n > 1 else jid[-1]
        c1 = (self._base_inv * self.data.oMi[first]).translation.copy()
        start = 1
        if self.n > 1:
            pin.computeJointJacobians(model, self.data, q0)
            a1 = self._R_bw @ pin.getJointJacobian(model, self.data, jid[0], pin.WORLD)[3:, self._vidx[0]]
            a1 = a1 / max(float(np.linalg.norm(a1)), 1e-12)  # joint 1 axis (zero for a prismatic joint)
            c2 = (self._base_inv * self.data.oMi[jid[1]]).translation.copy()
            off = (c2 - c1) - a1 * float(a1 @ (c2 - c1))
            if np.linalg.norm(off) < 1e-9:
                c1, start = c2, 2
        reach = sum(float(np.linalg.norm(model.jointPlacements[j].translation)) for j in jid[start:])
        reach += float(np.linalg.norm(model.frames[self._tcp].placement.translation))  # last joint -> TCP
        self.shoulder: np.ndarray = c1  # (3,) [m] centre of the reach bound (base frame)
        self.reach: float = reach  # [m] upper bound of |TCP - shoulder|

    # -------------------------------------------------------------------------------------- basics
    def _to_pin(self, q: np.ndarray) -> np.ndarray:
        if self._identity_order:
            return q
        out = pin.neutral(self.model)
        out[self._qidx] = q
        return out

    def _check_q(self, q, what: str = "q") -> np.ndarray:
        a = np.asarray(q, dtype=float)
        if a.shape != (self.n,):
            raise ValueError(f"{what} must have shape ({self.n},) for {self.robot.name}, got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what} contains NaN or inf")
        return a

    def in_limits(self, q, tol: float = 0.0) -> bool:
        """True when every joint of ``q`` is within [lower - tol, upper + tol]."""
        q = np.asarray(q, dtype=float)
        return bool(np.all(q >= self.lower - tol) and np.all(q <= self.upper + tol))

    def clip(self, q) -> np.ndarray:
        """``q`` clipped into the joint limits."""
        return np.clip(np.asarray(q, dtype=float), self.lower, self.upper)

    def fk(self, q) -> np.ndarray:
        """TCP pose (4, 4) in the base_link frame at joint positions ``q`` (n,) [rad]."""
        q = self._check_q(q)
        pin.forwardKinematics(self.model, self.data, self._to_pin(q))
        M = pin.updateFramePlacement(self.model, self.data, self._tcp)
        if not self._base_is_world:
            M = self._base_inv * M
        return np.array(M.homogeneous)

    def frame_pose(self, frame: str, q) -> np.ndarray:
        """Pose (4, 4) of any URDF frame (link) in the base_link frame at ``q``."""
        if not self.model.existFrame(frame):
            raise ValueError(f"unknown frame '{frame}' for {self.robot.name}")
        q = self._check_q(q)
        pin.forwardKinematics(self.model, self.data, self._to_pin(q))
        M = self._base_inv * pin.updateFramePlacement(self.model, self.data, self.model.getFrameId(frame))
        return np.array(M.homogeneous)

    def jacobian(self, q) -> np.ndarray:
        """TCP Jacobian (6, n), rows [v; w] in base-frame axes, columns in arm_joints order."""
        q = self._check_q(q)
        return self._jac(q)[0]

    def jacobian_pose(self, q) -> tuple[np.ndarray, np.ndarray]:
        """(TCP Jacobian (6, n) as :meth:`jacobian`, TCP pose (4, 4) as :meth:`fk`) from one kinematics pass."""
        J, p, R = self._jac(self._check_q(q))
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, p
        return J, T

    def _jac(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(J (6, n), p (3,), R (3, 3)) of the TCP in base frame; one kinematics pass."""
        qp = self._to_pin(q)
        pin.computeJointJacobians(self.model, self.data, qp)
        M = pin.updateFramePlacement(self.model, self.data, self._tcp)
        J = pin.getFrameJacobian(self.model, self.data, self._tcp, pin.LOCAL_WORLD_ALIGNED)
        if not self._identity_order:
            J = J[:, self._vidx]
        p, R = M.translation, M.rotation
        if not self._base_is_world:
            J = np.vstack([self._R_bw @ J[:3], self._R_bw @ J[3:]])
            Mb = self._base_inv * M
            p, R = Mb.translation, Mb.rotation
        return np.asarray(J), np.array(p), np.array(R)

    # ------------------------------------------------------------------------------------------ IK
    def solve(self, target: np.ndarray, q_seed, *, max_iters: int = 100, pos_tol: float = 1e-4,
              rot_tol: float = 1e-3, restarts: int = 16, rng_seed: int = 0,
              wrap: bool | None = None) -> IKResult:
        """Joint positions that put the TCP at ``target`` (4, 4, base frame), starting from ``q_seed`` (n,).

        Damped least squares with Levenberg-Marquardt damping, joint limits enforced at every step
        (joints at a limit that the step would push further are frozen) and, on redundant arms, one
        bounded null-space pull toward ``home``. If the first attempt fails, up to ``restarts`` more
        start from ``home`` and then from the configurations of a table of random in-limit samples
        (built once per instance, deterministic: ``rng_seed``) whose TCP poses are nearest the target.
        With ``wrap`` (default: only when ``restarts > 0``), joints whose range spans a full turn may
        move by 2 pi (same pose). Restarts and wrapping may land on another IK branch far from
        ``q_seed``: servo loops should use :meth:`solve_delta` or ``restarts=0``, which do neither.
        ``max_iters`` is per attempt. Check ``ok`` before using ``q`` (see :class:`IKResult`).
        Raises ValueError on a malformed target or seed.
        """
        T = np.asarray(target, dtype=float)
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise ValueError("target must be a finite 4x4 homogeneous matrix")
        R_t = T[:3, :3]
        if np.abs(R_t @ R_t.T - self._eye3).max() > 1e-6 or np.linalg.det(R_t) < 0:
            raise ValueError("target rotation is not a rotation matrix")
        q0 = np.clip(self._check_q(q_seed, "q_seed"), self.lower, self.upper)
        wrap = restarts > 0 if wrap is None else bool(wrap)
        return self._solve(T[:3, 3].copy(), R_t.copy(), q0, max_iters, pos_tol, rot_tol, restarts, rng_seed, wrap)

    def solve_delta(self, q_from, dpos, drotvec, q_seed=None, *, max_iters: int = 50, pos_tol: float = 1e-4,
                    rot_tol: float = 1e-3) -> IKResult:
        """IK for a base-frame end-effector delta from ``fk(q_from)``, for servo loops.

        Target = (p + dpos, Exp(drotvec) @ R) where (p, R) = fk(q_from); ``dpos`` (3,) [m], ``drotvec``
        (3,) [rad]. Seeded at ``q_seed`` (default ``q_from``), with no restarts and no 2 pi wrapping, so
        the answer stays on the current IK branch. A delta that points past the workspace or a joint limit
        gives ``ok=False`` ("unreachable") with ``q`` the closest in-limit configuration found.
        """
        q_from = self._check_q(q_from, "q_from")
        dp = np.asarray(dpos, dtype=float).reshape(-1)
        dr = np.asarray(drotvec, dtype=float).reshape(-1)
        if dp.shape != (3,) or dr.shape != (3,) or not (np.isfinite(dp).all() and np.isfinite(dr).all()):
            raise ValueError("dpos and drotvec must be finite 3-vectors")
        seed = q_from if q_seed is None else self._check_q(q_seed, "q_seed")
        _, p, R = self._jac(q_from)
        p_t = p + dp
        R_t = np.asarray(pin.exp3(dr)) @ R
        q0 = np.clip(seed, self.lower, self.upper)
        return self._solve(p_t, R_t, q0, max_iters, pos_tol, rot_tol, 0, 0, False)

    def _solve(self, p_t: np.ndarray, R_t: np.ndarray, q0: np.ndarray, max_iters: int, pos_tol: float,
               rot_tol: float, restarts: int, rng_seed: int, wrap: bool) -> IKResult:
        # Quick answer: beyond the arm's reach bound.
        if np.linalg.norm(p_t - self.shoulder) > self.reach + pos_tol:
            pe, re = self._err(q0, p_t, R_t)
            return IKResult(q0, False, "unreachable", pe, re, 0)
        seeds = [q0]
        n_restarts = max(0, int(restarts))
        if n_restarts:
            if np.abs(q0 - self.home).max() > 1e-9:
                seeds.append(self.home.copy())
            if n_restarts > len(seeds) - 1:
                seeds += list(self._nearest_samples(p_t, R_t, n_restarts + 1 - len(seeds), rng_seed))
        best = None  # (cost, q, pe, re, stagnated)
        total = 0
        for s in seeds[:1 + n_restarts]:
            q, pe, re, it, stag = self._dls(s, p_t, R_t, max_iters, pos_tol, rot_tol, wrap)
            total += it
            if pe <= pos_tol and re <= rot_tol:
                return IKResult(q, True, "ok", pe, re, total)
            cost = pe + 0.1 * re
            if best is None or cost < best[0]:
                best = (cost, q, pe, re, stag)
        _, q, pe, re, stag = best
        return IKResult(q, False, self._why(q, p_t, stag), pe, re, total)

    # ------------------------------------------------------------------------------------ internals
    _N_SAMPLES = 4096  # size of the random-configuration table used for restart seeds
    _ROT_WEIGHT = 0.15  # [m/rad] weight of rotation against position when ranking samples

    def _nearest_samples(self, p_t: np.ndarray, R_t: np.ndarray, k: int, rng_seed: int) -> np.ndarray:
        """The k sampled configurations (k, n) whose TCP poses are nearest (p_t, R_t)."""
        table = self._tables.get(rng_seed)
        if table is None:
            rng = np.random.default_rng(rng_seed)
            qs = rng.uniform(self.lower, self.upper, size=(self._N_SAMPLES, self.n))
            P = np.empty((len(qs), 3))
            Rs = np.empty((len(qs), 3, 3))
            for i, q in enumerate(qs):
                T = self.fk(q)
                P[i], Rs[i] = T[:3, 3], T[:3, :3]
            table = self._tables[rng_seed] = (qs, P, Rs)
        qs, P, Rs = table
        dpos = np.linalg.norm(P - p_t, axis=1)
        # rotation distance via the trace: angle = arccos((tr(R_t^T R) - 1) / 2)
        tr = np.einsum("ij,nij->n", R_t, Rs)
        ang = np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0))
        d = dpos + self._ROT_WEIGHT * ang
        idx = np.argpartition(d, min(k, len(d) - 1))[:k] if k < len(d) else np.arange(len(d))
        return qs[idx[np.argsort(d[idx])]]

    def _err(self, q: np.ndarray, p_t: np.ndarray, R_t: np.ndarray) -> tuple[float, float]:
        T = self.fk(q)
        return (float(np.linalg.norm(p_t - T[:3, 3])),
                float(np.linalg.norm(pin.log3(R_t @ T[:3, :3].T))))

    def _step(self, J: np.ndarray, e: np.ndarray, q: np.ndarray, lam: float, null: bool) -> np.ndarray:
        """Damped least-squares step dq (n,) for error e (6,), freezing joints pushed past a limit."""
        at_lo = q <= self.lower
        at_hi = q >= self.upper
        check = at_lo.any() or at_hi.any()
        Jw = J
        for attempt in range(2):
            A = Jw @ Jw.T
            A.flat[::7] += lam  # + lam * I (6 x 6)
            if null:
                # Null-space pull toward home: (I - J# J) z with the damped pseudo-inverse J#.
                z = self.null_gain * (self.home - q)
                zm = np.abs(z).max()
                if zm > self._NULL_MAX:
                    z *= self._NULL_MAX / zm
                rhs = np.empty((6, 2))
                rhs[:, 0] = e
                rhs[:, 1] = Jw @ z
                y = np.linalg.solve(A, rhs)
                dq = Jw.T @ (y[:, 0] - y[:, 1]) + z
            else:
                dq = Jw.T @ np.linalg.solve(A, e)
            if not check:
                break
            blocked = (at_lo & (dq < 0)) | (at_hi & (dq > 0))
            if not blocked.any():
                break
            if attempt:
                dq[blocked] = 0.0
                break
            Jw = J.copy()
            Jw[:, blocked] = 0.0
        m = np.abs(dq).max()
        if m > self.max_step:
            dq *= self.max_step / m
        return dq

    def _dls(self, q: np.ndarray, p_t: np.ndarray, R_t: np.ndarray, max_iters: int, pos_tol: float,
             rot_tol: float, wrap: bool = False):
        """One Levenberg-Marquardt / DLS attempt -> (q, pos_err, rot_err, iterations, stagnated).

        Adaptive damping: a step that lowers the pose error is accepted and the damping shrinks; one that
        does not is rejected and the damping grows. Damping beyond ``_LAM_MAX``, or less than a 4x error
        decrease over ``_SLOW_WINDOW`` iterations, means a local minimum (or a crawl along a limit).
        """
        wrap_mask = self._wrap if (wrap and self._wrap.any()) else None
        two_pi = 2.0 * np.pi
        lo, hi = self.lower, self.upper
        null = self.n > 6 and self.null_gain > 0

        def evaluate(qq):
            J, p, R = self._jac(qq)
            e = np.empty(6)
            e[:3] = p_t - p
            e[3:] = pin.log3(R_t @ R.T)
            return J, e, 0.5 * float(e @ e)

        J, e, cost = evaluate(q)
        lam = self._LAM0
        it = 0
        checkpoint = cost
        while True:
            pe = math.sqrt(e[0] * e[0] + e[1] * e[1] + e[2] * e[2])
            re = math.sqrt(e[3] * e[3] + e[4] * e[4] + e[5] * e[5])
            if pe <= pos_tol and re <= rot_tol:
                return q, pe, re, it, False
            if it >= max_iters:
                return q, pe, re, it, False
            if lam > self._LAM_MAX:
                return q, pe, re, it, True
            if it and it % self._SLOW_WINDOW == 0:
                if cost > 0.25 * checkpoint:
                    return q, pe, re, it, True
                checkpoint = cost
            it += 1
            # The secondary task acts on the first step only: one bounded pull per solve (per servo
            # tick), and the remaining iterations converge on the pose alone.
            use_null = null and it == 1
            while True:
                q_new = q + self._step(J, e, q, lam, use_null)
                if wrap_mask is not None:
                    q_new[wrap_mask & (q_new > hi)] -= two_pi
                    q_new[wrap_mask & (q_new < lo)] += two_pi
                np.clip(q_new, lo, hi, out=q_new)
                J_new, e_new, cost_new = evaluate(q_new)
                if cost_new < cost:
                    q, J, e, cost = q_new, J_new, e_new, cost_new
                    lam = max(lam * 0.1, self.damping_min)
                    break
                if use_null:  # retry without the secondary task before damping harder
                    use_null = False
                    continue
                lam *= 10.0
                break

    def _why(self, q: np.ndarray, p_t: np.ndarray, stagnated: bool) -> str:
        if not stagnated:
            return "max_iters"
        J, p, _ = self._jac(q)
        sigma_min = float(np.linalg.svd(J, compute_uv=False)[-1])
        d_target = float(np.linalg.norm(p_t - self.shoulder))
        d_reached = float(np.linalg.norm(p - self.shoulder))
        if sigma_min < self.singular_tol and d_target <= d_reached + 1e-3:
            return "singular"
        return "unreachable"
