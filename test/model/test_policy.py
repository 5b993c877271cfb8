"""MagmaPolicy end to end on a generated tiny random-weight checkpoint (real model, real tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.core.policy_api import BasePolicy
from magma_ros.core.tom import TraceResult

BRIDGE_Q01 = np.array([-0.02872725307941437, -0.04170349963009357, -0.026093858778476715,
                       -0.08092105075716972, -0.09288699507713317, -0.20718276381492615, 0.0])
BRIDGE_Q99 = np.array([0.028309678435325586, 0.040855254605412394, 0.040161586627364146, 0.08192047759890528,
                       0.07792850524187081, 0.20382574498653397, 1.0])


def expected_bridge_action(tokens):
    """Independent reference: bin centre, BOUNDS_Q99 on dims 0-5, gripper binarized (> 0.5 open)."""
    k = np.clip(128000 - np.asarray(tokens) - 1, 0, 254)
    n = -1 + (k + 0.5) * 2 / 255
    raw = BRIDGE_Q01 + (n + 1) / 2 * (BRIDGE_Q99 - BRIDGE_Q01)
    raw[6] = 1.0 if n[6] > 0.5 else 0.0
    return raw


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def policy(ckpt):
    from magma_ros.model.policy import MagmaPolicy

    return MagmaPolicy(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def constrained(policy):
    from magma_ros.model.policy import MagmaPolicy

    return MagmaPolicy(policy.model, tokenizer=policy.tokenizer, constrained=True)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)


def test_random_weights_give_a_safe_hold_with_the_reason(policy, image):
    assert isinstance(policy, BasePolicy)
    assert policy.step_period == pytest.approx(0.2)
    r = policy.infer({"image": image, "instruction": "pick coke can"})
    assert set(r) >= {"action", "tokens", "latency_s", "valid", "reason"}
    assert r["valid"] is False and "non-action tokens" in r["reason"]
    assert r["action"].dtype == np.float32 and r["action"].shape == (7,)
    np.testing.assert_array_equal(r["action"], [0, 0, 0, 0, 0, 0, 1])  # no motion, gripper held open
    assert len(r["tokens"]) == 7 and r["latency_s"] > 0


def test_constrained_decoding_gives_bridge_actions(constrained, image):
    r = constrained.infer({"image": image, "instruction": "pick coke can"})
    assert r["valid"] is True and r["reason"] == ""
    toks = np.asarray(r["tokens"])
    assert toks.shape == (7,) and np.all((toks >= 127744) & (toks < 128000))
    np.testing.assert_allclose(r["action"], expected_bridge_action(toks), rtol=1e-6, atol=1e-7)
    a = r["action"][:6]
    assert np.all(a >= BRIDGE_Q01[:6] - 1e-7) and np.all(a <= BRIDGE_Q99[:6] + 1e-7)


def test_plain_engine_and_batch_agree_with_the_fast_engine(constrained, image):
    from magma_ros.model.policy import MagmaPolicy

    single = constrained.infer({"image": image, "instruction": "pick coke can"})
    plain = MagmaPolicy(constrained.model, tokenizer=constrained.tokenizer, constrained=True, engine="plain")
    assert plain.engine_name == "plain"
    assert plain.infer({"image": image, "instruction": "pick coke can"})["tokens"] == single["tokens"]
    other = image[::-1, :320].copy()
    # different prompt lengths -> left padding; each row must equal its own single inference
    batch = constrained.infer_batch([
        {"image": image, "instruction": "pick coke can", "robot_id": "a"},
        {"image": other, "instruction": "open the top drawer of the cabinet", "robot_id": "b"},
    ])
    assert batch[0]["tokens"] == single["tokens"]
    alone = constrained.infer({"image": other, "instruction": "open the top drawer of the cabinet"})
    assert batch[1]["tokens"] == alone["tokens"]


@pytest.mark.parametrize("obs,msg", [
    ({"image": np.zeros((48, 64), np.uint8), "instruction": "x"}, "HxWx3"),
    ({"image": np.zeros((48, 64, 3), np.float32), "instruction": "x"}, "uint8"),
    ({"image": np.full((48, 64, 3), np.nan, np.float32), "instruction": "x"}, "NaN"),
    ({"image": np.zeros((48, 64, 3), np.uint8)}, "missing 'instruction'"),
    ({"image": np.zeros((48, 64, 3), np.uint8), "instruction": "  "}, "empty"),
    ({"image": np.zeros((48, 64, 3), np.uint8), "instruction": 3}, "string"),
    ({"image": np.zeros((2, 2, 3), np.uint8), "instruction": "x"}, "size"),
    ("not a dict", "dict"),
])
def test_bad_observations_raise_value_error(policy, obs, msg):
    with pytest.raises(ValueError, match=msg):
        policy.infer(obs)


def test_tom_on_random_weights_reports_instead_of_raising(policy, image):
    r = policy.predict_tom(image, "pick up the chip bag", marks=5, max_new_tokens=8)
    assert isinstance(r, TraceResult) and not r.ok and r.errors


def test_tom_traces_come_back_in_pixels_of_the_input_image(policy, image, monkeypatch):
    # replace only the token generator with the model's answer text, tokenized by the real tokenizer
    answer = ('Mark 1 at [64,128] should be moved, and their future positions are:\n\n'
              '"Mark 1": "[[70,130],[80,140]]"\n\n')
    ids = np.array([policy.tokenizer(answer, add_special_tokens=False)["input_ids"]])
    seen = {}

    def fake_generate(input_ids, mask, pv, sizes, upsample=1, max_new_tokens=7, allowed=None, sample=False,
                      yield_to=None):
        seen["ids"] = input_ids[0].tolist()
        return ids

    monkeypatch.setattr(policy, "_generate", fake_generate)
    r = policy.predict_tom(image, "pick up the chip bag", marks=[[100, 200], [300, 400]])
    assert r.ok, r.reason
    sx, sy = 640 / 256, 480 / 256  # grid cell -> pixel of the 640x480 input
    np.testing.assert_allclose(r.traces[1], [[70 * sx, 130 * sy], [80 * sx, 140 * sy]])
    np.testing.assert_allclose(r.starts[1], [64 * 640 / 256, 128 * 480 / 256])
    prompt = policy.tokenizer.decode(seen["ids"])
    assert "labeled with numeric marks [1, 2].\nThe robot is doing: pick up the chip bag." in prompt


def test_ask_answers_text_about_several_frames(policy, image):
    out = policy.ask([image, image[:240]], "What changed?", max_new_tokens=4)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="1..8 images"):
        policy.ask([], "What changed?")
    with pytest.raises(ValueError, match="question"):
        policy.ask(image, "")


def test_statistics_choices(policy, tmp_path):
    from magma_ros.model.policy import MagmaPolicy

    g = MagmaPolicy(policy.model, tokenizer=policy.tokenizer, stats="google_robot", engine="plain")
    assert g.step_period == pytest.approx(1 / 3) and g.stats.gripper.mode == "sticky"
    p = tmp_path / "libero.json"
    p.write_text(json.dumps({"libero_goal_no_noops": {"action": {"q01": [-1] * 7, "q99": [1] * 7}}}))
    u = MagmaPolicy(policy.model, tokenizer=policy.tokenizer, stats=str(p), step_period=0.05, engine="plain")
    assert u.step_period == 0.05 and u.stats.name == "libero_goal_no_noops"
    with pytest.raises(ConfigError, match="did you mean 'plain'"):
        MagmaPolicy(policy.model, tokenizer=policy.tokenizer, engine="plan")


def test_sampling_policies_are_seeded_on_both_engines(policy, image):
    """temperature > 0: constrained sampled actions are valid Bridge actions; the fast engine
    repeats itself with the same seed; the plain engine samples through transformers; bad
    settings are refused."""
    import torch

    from magma_ros.model.policy import MagmaPolicy, PolicyConfig

    def make(seed, engine="auto"):
        return MagmaPolicy(policy.model, tokenizer=policy.tokenizer, constrained=True, temperature=0.7,
                           top_k=50, seed=seed, engine=engine)

    obs = {"image": image, "instruction": "put the carrot on the plate"}
    a, b, c = make(1).infer(obs), make(1).infer(obs), make(2).infer(obs)
    assert a["valid"] and a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"]
    np.testing.assert_allclose(a["action"], expected_bridge_action(a["tokens"]), atol=1e-6)
    assert make(1).metadata()["temperature"] == 0.7
    plain = make(1, engine="plain")
    torch.manual_seed(0)
    r = plain.infer(obs)
    assert r["valid"] and all(127744 <= t < 128000 for t in r["tokens"])
    # the config route and its defaults: greedy unless asked
    greedy = MagmaPolicy.from_config(policy.model, PolicyConfig(), tokenizer=policy.tokenizer)
    assert greedy.temperature == 0.0 and greedy._sampling is None
    for kw in ({"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -2}):
        with pytest.raises(ConfigError):
            MagmaPolicy(policy.model, tokenizer=policy.tokenizer, **kw)
