"""Action decoding, un-normalization, gripper maps and rotations against independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from magma_ros.core.actions import (
    ActionDecoder,
    BinarizeGripper,
    StickyGripper,
    action_to_twist,
    euler2axangle,
    euler_to_rotvec,
    is_action_token,
    load_stats,
    normalized_to_tokens,
    tokens_to_normalized,
)
from magma_ros.core.errors import ConfigError

# MAGMA_FACTS §1.7 (Magma SimplerEnv action_norm_stats), typed in here independently of config/.
BRIDGE_Q01 = [-0.02872725307941437, -0.04170349963009357, -0.026093858778476715, -0.08092105075716972,
              -0.09288699507713317, -0.20718276381492615, 0.0]
BRIDGE_Q99 = [0.028309678435325586, 0.040855254605412394, 0.040161586627364146, 0.08192047759890528,
              0.07792850524187081, 0.20382574498653397, 1.0]
GOOGLE_Q01 = [-0.22453527510166169, -0.14820013284683228, -0.231589707583189, -0.3517994859814644,
              -0.4193011274933815, -0.43643461108207704, 0.0]
GOOGLE_Q99 = [0.17824687153100965, 0.14938379630446405, 0.21842354819178575, 0.5892666035890578,
              0.35272657424211445, 0.44796681255102094, 1.0]


def reference_bin_value(token_id: int, vocab_size: int = 128000) -> float:
    """Magma/OpenVLA decode written out by hand: bin k of 255 centres between 256 edges on [-1, 1]."""
    k = min(max(vocab_size - token_id - 1, 0), 254)
    width = 2.0 / 255.0  # 256 edges -> 255 intervals
    return -1.0 + (k + 0.5) * width


def rot_x(a):
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def rot_y(a):
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def rot_z(a):
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def rodrigues(axis, angle):
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


# --------------------------------------------------------------------------- tokens


def test_all_256_action_tokens_decode_to_the_reference_bin_centres():
    ids = np.arange(128000 - 256, 128000)
    got = tokens_to_normalized(ids)
    want = np.array([reference_bin_value(int(t)) for t in ids])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert is_action_token(ids).all()
    assert not is_action_token([127743, 128000, 128009, 128257]).any()


def test_worked_values_from_the_facts_sheet():
    # MAGMA_FACTS §1.6: 127744 -> +0.99608 (gripper open), 127999 -> -0.99608, 127872 -> 0.0
    np.testing.assert_allclose(tokens_to_normalized([127744, 127999, 127872]), [0.99608, -0.99608, 0.0],
                               atol=1e-5)


def test_encode_decode_round_trip_within_one_bin():
    rng = np.random.default_rng(0)
    v = rng.uniform(-1, 1, size=(1000, 7))
    tok = normalized_to_tokens(v)
    assert is_action_token(tok).all()
    assert np.abs(tokens_to_normalized(tok) - v).max() <= 2.0 / 255.0 + 1e-9


def test_custom_vocab_size_shifts_the_action_range():
    assert tokens_to_normalized([1000 - 1], vocab_size=1000)[0] == pytest.approx(-1 + 1 / 255)
    assert is_action_token([744], vocab_size=1000)[0] and not is_action_token([743], vocab_size=1000)[0]


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("name,q01,q99,period", [
    ("bridge_orig", BRIDGE_Q01, BRIDGE_Q99, 0.2),
    ("google_robot", GOOGLE_Q01, GOOGLE_Q99, 1 / 3),
])
def test_builtin_stats_match_the_facts_and_unnormalize(name, q01, q99, period):
    s = load_stats(name)
    np.testing.assert_array_equal(s.q01, q01)
    np.testing.assert_array_equal(s.q99, q99)
    assert s.mask.tolist() == [True] * 6 + [False]
    assert s.step_period == pytest.approx(period)
    n = np.array([-1.0, 1.0, 0.0, 0.5, -0.5, 0.25, 0.99608])
    raw = s.unnormalize(n)
    for i in range(6):  # BOUNDS_Q99 by hand
        assert raw[i] == pytest.approx(q01[i] + (n[i] + 1) / 2 * (q99[i] - q01[i]))
    assert raw[6] == n[6]  # gripper passes through
    assert raw[0] == pytest.approx(q01[0]) and raw[1] == pytest.approx(q99[1])
    np.testing.assert_allclose(s.normalize(raw)[:6], n[:6], atol=1e-6)


def test_user_stats_files(tmp_path):
    base = {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"action": base, "step_period": 0.05, "gripper": {"mode": "raw"}}))
    s = load_stats(str(p))
    assert s.name == "mine" and s.step_period == 0.05
    np.testing.assert_allclose(s.unnormalize([0.5] * 7)[:6], 0.5)

    # OpenVLA dataset_statistics.json layout with several datasets: key needed, rate needed
    o = tmp_path / "dataset_statistics.json"
    o.write_text(json.dumps({"libero_goal_no_noops": {"action": base}, "other": {"action": base}}))
    with pytest.raises(ConfigError, match="several datasets.*libero_goal_no_noops"):
        load_stats(str(o), step_period=0.05)
    with pytest.raises(ConfigError, match="step_period"):
        load_stats(f"{o}:libero_goal_no_noops")
    s = load_stats(f"{o}:libero_goal_no_noops", step_period=0.05)
    assert s.name == "libero_goal_no_noops"
    with pytest.raises(ConfigError, match="did you mean 'other'"):
        load_stats(str(o), key="othr", step_period=0.05)


def test_stats_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'bridge_orig'"):
        load_stats("bridge_org")
    with pytest.raises(ConfigError, match="not found"):
        load_stats(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        load_stats(str(bad))
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"action": {"q01": [0] * 6, "q99": [1] * 7}, "step_period": 0.1}))
    with pytest.raises(ConfigError, match="'q01' needs 7 values"):
        load_stats(str(short))


# --------------------------------------------------------------------------- decoder


def test_decoder_takes_the_first_seven_action_tokens():
    dec = ActionDecoder(load_stats("bridge_orig"))
    toks = [127857, 127873, 127868, 127904, 127861, 127874, 127744, 128009]  # MAGMA_FACTS §1.2 dump
    out = dec(toks)
    assert out.valid and out.reason == ""
    assert out.tokens == tuple(toks[:7])
    np.testing.assert_allclose(out.normalized, [reference_bin_value(t) for t in toks[:7]])
    assert out.raw[6] == pytest.approx(0.99608, abs=1e-5)
    assert np.all(out.raw[:6] >= np.array(BRIDGE_Q01[:6])) and np.all(out.raw[:6] <= np.array(BRIDGE_Q99[:6]))


@pytest.mark.parametrize("toks,why", [
    ([128009], "only 1 tokens"),
    ([], "only 0 tokens"),
    ([127857, 315, 127868, 127904, 127861, 127874, 127744], "positions #1=315"),
    ([128009] * 7, "#0=128009"),
])
def test_decoder_rejects_non_action_output_with_a_reason(toks, why):
    out = ActionDecoder(load_stats("bridge_orig"))(toks)
    assert not out.valid and why in out.reason
    assert np.all(out.raw == 0) and np.all(out.normalized == 0)


# --------------------------------------------------------------------------- gripper


def test_bridge_gripper_binarizes_to_open_one_closed_zero():
    g = BinarizeGripper()
    assert [g(x) for x in (0.0, 0.5, 0.51, 0.99608, 1.0)] == [0.0, 0.0, 1.0, 1.0, 1.0]


def simpler_env_sticky(raws, repeat):
    """SimplerEnv's google_robot gripper code, transcribed (relative command per step)."""
    prev, on, val, count, out = None, False, 0.0, 0, []
    for cur in raws:
        rel = 0.0 if prev is None else prev - cur
        prev = cur
        if abs(rel) > 0.5 and not on:
            on, val = True, rel
        if on:
            count += 1
            rel = val
        if count == repeat:
            on, count, val = False, 0, 0.0
        out.append(rel)
    return out


def test_sticky_gripper_matches_simpler_env_and_integrates_to_absolute():
    raws = [1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0.2, 0.2, 0.9]
    g = StickyGripper(repeat=3)
    states, rels = [], []
    for r in raws:
        states.append(g(r))
        rels.append(g.last_relative)
    assert rels == simpler_env_sticky(raws, 3)
    # open until the close at step 2; the flicker back to 1 at step 3 is ignored while sticky;
    # reopens at step 8 (relative -1); at step 11 a 0.8 relative close is latched and integrated
    # (1 - 0.8 = 0.2, then clipped at 0 while it repeats), as the simulated robot would see it.
    np.testing.assert_allclose(states, [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0.2, 0, 0], atol=1e-12)
    g.reset()
    assert g(0.0) == 1.0  # first step after reset: no change yet


# --------------------------------------------------------------------------- rotations


def test_euler2axangle_equals_composed_rotation_matrices():
    rng = np.random.default_rng(1)
    angles = np.vstack([rng.uniform(-0.3, 0.3, (50, 3)), rng.uniform(-math.pi, math.pi, (50, 3))])
    for r, p, y in angles:
        axis, angle = euler2axangle(r, p, y)
        assert np.linalg.norm(axis) == pytest.approx(1.0)
        assert 0 <= angle <= 2 * math.pi
        np.testing.assert_allclose(rodrigues(axis, angle), rot_z(y) @ rot_y(p) @ rot_x(r), atol=1e-12)
        rv = euler_to_rotvec([r, p, y])
        assert np.linalg.norm(rv) <= math.pi + 1e-12
        if np.linalg.norm(rv) > 0:
            np.testing.assert_allclose(rodrigues(rv, np.linalg.norm(rv)), rot_z(y) @ rot_y(p) @ rot_x(r),
                                       atol=1e-12)


def test_euler2axangle_conventions():
    axis, angle = euler2axangle(0.0, 0.0, math.pi / 2)  # pure yaw about z
    np.testing.assert_allclose(axis, [0, 0, 1], atol=1e-12)
    assert angle == pytest.approx(math.pi / 2)
    axis, angle = euler2axangle(0.1, 0.0, 0.0)  # pure roll about x
    np.testing.assert_allclose(axis * angle, [0.1, 0, 0], atol=1e-12)
    axis, angle = euler2axangle(0.0, 0.0, 0.0)  # identity: transforms3d returns x axis, 0
    assert axis.tolist() == [1.0, 0.0, 0.0] and angle == 0.0


def test_action_to_twist_spreads_the_delta_over_one_step():
    lin, ang = action_to_twist([0.01, -0.02, 0.0, 0.0, 0.0, 0.1, 1.0], 0.2)
    np.testing.assert_allclose(lin, [0.05, -0.1, 0.0])
    np.testing.assert_allclose(ang, [0.0, 0.0, 0.5], atol=1e-12)
    with pytest.raises(ValueError):
        action_to_twist([0.0] * 7, 0.0)
