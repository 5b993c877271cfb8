"""TrajectoryFollower: the JTC-like setpoint generator behind the simulated controllers."""

from __future__ import annotations

import numpy as np
import pytest

from magma_ros.sim.follower import TrajectoryFollower


def test_linear_segments_from_the_current_setpoint():
    f = TrajectoryFollower([0.0, 1.0])
    f.set_trajectory(10.0, [1.0, 3.0], [[1.0, 1.0], [2.0, 3.0]])
    q, v = f.sample(10.5)
    assert np.allclose(q, [0.5, 1.0]) and np.allclose(v, [1.0, 0.0])
    q, v = f.sample(12.0)  # halfway through the second segment (2 s long)
    assert np.allclose(q, [1.5, 2.0]) and np.allclose(v, [0.5, 1.0])
    q, v = f.sample(20.0)  # after the end: hold the last point at rest
    assert np.allclose(q, [2.0, 3.0]) and np.allclose(v, 0.0)


def test_new_trajectory_replaces_the_old_one_without_a_jump():
    f = TrajectoryFollower([0.0])
    f.set_trajectory(0.0, [1.0], [[1.0]])
    mid, _ = f.sample(0.4)
    f.set_trajectory(0.4, [0.1], [[-1.0]])
    assert np.allclose(f.sample(0.4)[0], mid)  # continuous at the switch
    assert np.allclose(f.sample(0.45)[0], mid + 0.5 * (-1.0 - mid))
    assert np.allclose(f.sample(1.0)[0], -1.0)


def test_partial_joints_keep_their_setpoint():
    f = TrajectoryFollower([0.0, 5.0, 7.0])
    f.set_trajectory(0.0, [1.0], [[2.0]], mask=[False, True, False])
    assert np.allclose(f.sample(2.0)[0], [0.0, 2.0, 7.0])


def test_hermite_when_velocities_are_given():
    f = TrajectoryFollower([0.0])
    f.set_trajectory(0.0, [1.0, 2.0], [[1.0], [2.0]], velocities=[[1.0], [0.0]])
    q, v = f.sample(1.0 - 1e-9)
    # passes the knot at speed
    assert q[0] == pytest.approx(1.0, abs=1e-6) and v[0] == pytest.approx(1.0, abs=1e-5)
    q, v = f.sample(2.0 - 1e-9)
    assert q[0] == pytest.approx(2.0, abs=1e-6) and v[0] == pytest.approx(0.0, abs=1e-5)


def test_point_at_time_zero_is_taken_at_once():
    f = TrajectoryFollower([0.0])
    f.set_trajectory(3.0, [0.0, 1.0], [[1.0], [2.0]])
    assert np.allclose(f.sample(3.0)[0], 1.0)
    assert np.allclose(f.sample(3.5)[0], 1.5)


@pytest.mark.parametrize("times,pos,vel", [
    ([], np.zeros((0, 1)), None),                       # no points
    ([1.0, 1.0], [[0.0], [1.0]], None),                 # not increasing
    ([-1.0], [[0.0]], None),                            # negative time
    ([1.0], [[np.nan]], None),                          # NaN
    ([1.0], [[np.inf]], None),                          # inf
    ([1.0], [[0.0, 1.0]], None),                        # wrong width
    ([1.0], [[0.0]], [[0.0], [1.0]]),                   # velocities shape
])
def test_malformed_trajectories_raise_and_change_nothing(times, pos, vel):
    f = TrajectoryFollower([0.25])
    f.set_trajectory(0.0, [1.0], [[1.0]])
    before = f.sample(0.5)[0]
    with pytest.raises(ValueError):
        f.set_trajectory(0.5, times, pos, velocities=vel)
    assert np.allclose(f.sample(0.5)[0], before)
    assert np.allclose(f.sample(5.0)[0], 1.0)
