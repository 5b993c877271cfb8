"""The fast generation path (static KV cache, plain prefill/decode) against transformers' generate.

All on generated random-weight checkpoints, fp32, CPU, one thread (bit-stable argmax).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

IMG, PAD, EOS = 128257, 128256, 128009
# Llama-3 chat layout as Magma's robot prompt (double BOS, <image_start> <image> <image_end>)
HEAD = [128000, 128000, 128006, 9125, 128007, 271, 2675, 527, 8479, 430, 649, 1518, 11, 3137, 323, 1180, 13,
        128009, 128006, 882, 128007, 271, 128259]
TAIL_START = [128260, 198, 3923, 1957, 1288, 279, 12585, 1935, 311]
TAIL_END = [128009, 128006, 78191, 128007, 271]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from magma_ros.model.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("fast") / "tiny", seed=3)


@pytest.fixture(scope="module")
def model(ckpt):
    from magma_ros.model.magma import MagmaModel

    return MagmaModel.from_pretrained(ckpt)


def prompt(words, image=True):
    return HEAD + ([IMG] if image else []) + TAIL_START + list(words) + TAIL_END


def batch(rows):
    """Left-pad id lists → input_ids, attention_mask (B, T)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    return ids, mask


def images(*seeds, sizes=None):
    """Random normalized crops: pixel_values (B, max_crops, 3, 512, 512), image_sizes (B, 1, 2)."""
    sizes = sizes or [(1, 1)] * len(seeds)
    nc = max(r * c for r, c in sizes)
    pv = torch.zeros(len(seeds), nc, 3, 512, 512)
    for i, (s, (r, c)) in enumerate(zip(seeds, sizes)):
        pv[i, : r * c] = torch.randn(r * c, 3, 512, 512, generator=torch.Generator().manual_seed(s))
    return pv, torch.tensor([[list(rc)] for rc in sizes])


@pytest.fixture(scope="module")
def fast(model):
    from magma_ros.model.fast import FastGenerator

    return FastGenerator(model, max_seq_len=64, max_batch=2)  # deliberately small: the cache grows


WORDS_A = [5675, 1672, 649]
WORDS_B = [3820, 279, 6437, 7479, 1022, 279, 2007]


@pytest.mark.parametrize("case", ["image_b1", "text_b1", "image_left_padded_b2", "text_left_padded_b2",
                                  "image_grids_b2"])
def test_fast_tokens_equal_plain_generate(model, fast, case):
    if case == "image_b1":
        ids, mask = batch([prompt(WORDS_A)])
        pv, sizes = images(1)
    elif case == "text_b1":
        ids, mask = batch([prompt(WORDS_A, image=False)])
        pv = sizes = None
    elif case == "image_left_padded_b2":
        ids, mask = batch([prompt(WORDS_A), prompt(WORDS_B)])
        pv, sizes = images(1, 2)
    elif case == "text_left_padded_b2":
        ids, mask = batch([prompt(WORDS_B, image=False), prompt(WORDS_A, image=False)])
        pv = sizes = None
    else:  # different crop grids: the merged rows differ in length even with equal text lengths
        ids, mask = batch([prompt(WORDS_A), prompt(WORDS_A[::-1])])
        pv, sizes = images(4, 5, sizes=[(1, 1), (1, 2)])
    assert (not bool(mask.all())) == case.endswith("padded_b2")
    ref = model.generate_plain(ids, mask, pv, sizes, max_new_tokens=10)
    out = fast.generate(ids, mask, pv, sizes, max_new_tokens=10)
    assert out.shape == ref.shape == (ids.shape[0], 10)
    assert out.dtype == torch.long
    assert torch.equal(out, ref), (out, ref)
    # the rows differ from each other (a broken mask or position would usually make them collapse)
    if ids.shape[0] == 2:
        assert not torch.equal(out[0], out[1])


def test_vectorized_merge_equals_the_models_merge_bit_for_bit(model):
    from magma_ros.model.fast import merge_one_image_per_row

    for rows, seeds, grids in [([prompt(WORDS_A)], (1,), None),
                               ([prompt(WORDS_A), prompt(WORDS_B)], (1, 2), None),
                               ([prompt(WORDS_B), prompt(WORDS_A)], (4, 5), [(1, 2), (2, 1)]),
                               ([prompt(WORDS_A), prompt(WORDS_B)], (4, 5), [(1, 1), (1, 2)])]:
        ids, mask = batch(rows)
        pv, sizes = images(*seeds, sizes=grids)
        got = merge_one_image_per_row(model, model.vision_tower, ids, mask, pv, sizes)
        ref = model.prepare_inputs_embeds(ids, mask, pv, sizes)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    # not its case → None (the generator then uses the model's own merge)
    ids, mask = batch([prompt(WORDS_A, image=False)])
    assert merge_one_image_per_row(model, model.vision_tower, ids, mask, *images(1)) is None


def test_fast_path_has_no_host_sync_inside_the_decode_loop(model, fast, monkeypatch):
    """Tokens stay on the device between steps: .item()/.tolist()/bool() are not called per step."""
    import magma_ros.model.fast as fm

    calls = []
    real_pick = fm.pick

    def spy(logits, *a):
        tok = real_pick(logits, *a)
        calls.append(type(tok))
        return tok

    monkeypatch.setattr(fm, "pick", spy)
    ids, mask = batch([prompt(WORDS_A)])
    pv, sizes = images(1)
    with torch.autograd.profiler.profile() as prof:
        fast.generate(ids, mask, pv, sizes, max_new_tokens=7)
    assert calls == [torch.Tensor] * 7
    # _local_scalar_dense is what every device→host read (item, bool, int) runs; the count must not
    # grow with the number of steps
    n7 = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    with torch.autograd.profiler.profile() as prof:
        fast.generate(ids, mask, pv, sizes, max_new_tokens=14)
    n14 = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    assert n14 == n7


class _Only:
    """transformers logits processor: only ``ids`` (per step) may be generated."""

    def __init__(self, per_step, prompt_len):
        self.per_step, self.prompt_len = per_step, prompt_len

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_len
        ids = self.per_step[t] if t < len(self.per_step) else None
        if ids is None:
            return scores
        keep = torch.full_like(scores, float("-inf"))
        keep[:, ids] = 0
        return scores + keep


def test_constrained_mode_emits_only_allowed_ids_and_matches_a_masked_generate(model, fast):
    from transformers import LogitsProcessorList

    action_ids = list(range(127744, 128000))
    ids, mask = batch([prompt(WORDS_A), prompt(WORDS_B)])
    pv, sizes = images(7, 8)
    free = fast.generate(ids, mask, pv, sizes, max_new_tokens=7)
    assert not bool(torch.isin(free, torch.tensor(action_ids)).all())  # random weights: not actions
    out = fast.generate(ids, mask, pv, sizes, max_new_tokens=7, allowed_token_ids=action_ids)
    assert out.shape == (2, 7)
    assert bool(torch.isin(out, torch.tensor(action_ids)).all())
    # the same as restricting transformers' generate (with inputs_embeds its ids start empty)
    ref = model.generate_plain(ids, mask, pv, sizes, max_new_tokens=7,
                               logits_processor=LogitsProcessorList([_Only([action_ids] * 7, 0)]))
    assert torch.equal(out, ref)
    # per-step spec: 7 action positions, then EOS only → every row finishes → generation stops
    per_step = [action_ids] * 7 + [[EOS]]
    out = fast.generate(ids, mask, pv, sizes, max_new_tokens=12, allowed_token_ids=per_step)
    assert out.shape == (2, 8)
    assert bool((out[:, 7] == EOS).all()) and bool(torch.isin(out[:, :7], torch.tensor(action_ids)).all())
    with pytest.raises(ValueError, match="allowed_token_ids"):
        fast.generate(ids, mask, pv, sizes, max_new_tokens=2, allowed_token_ids=[10**9])


def test_rows_after_eos_are_padded_like_generate(model, fast):
    from transformers import LogitsProcessorList

    ids, mask = batch([prompt(WORDS_A), prompt(WORDS_B)])
    pv, sizes = images(9, 10)
    # step 2 may only emit EOS or one other id: whichever each row prefers; rows differ
    free = fast.generate(ids, mask, pv, sizes, max_new_tokens=6)
    per_step = [None, None, [EOS, int(free[1, 2])], None, None, None]
    out = fast.generate(ids, mask, pv, sizes, max_new_tokens=6, allowed_token_ids=per_step)
    ref = model.generate_plain(ids, mask, pv, sizes, max_new_tokens=6,
                               logits_processor=LogitsProcessorList([_Only(per_step, 0)]))
    assert torch.equal(out, ref)
    for r in range(2):
        hit = (out[r] == EOS).nonzero()
        if len(hit):
            assert bool((out[r, int(hit[0]) + 1:] == PAD).all())


def test_prefix_kv_reuse_gives_the_same_tokens_as_no_reuse(model):
    from magma_ros.model.fast import FastGenerator

    with_reuse = FastGenerator(model, max_batch=2)
    without = FastGenerator(model, max_batch=2, reuse_prefix=False)
    for seeds, rows in [((11,), [prompt(WORDS_A)]), ((12,), [prompt(WORDS_B)]),
                        ((13, 14), [prompt(WORDS_B), prompt(WORDS_A)])]:
        ids, mask = batch(rows)
        pv, sizes = images(*seeds)
        a = with_reuse.generate(ids, mask, pv, sizes, max_new_tokens=8)
        b = without.generate(ids, mask, pv, sizes, max_new_tokens=8)
        assert torch.equal(a, b)
    # one prefix (system prompt + user header + <image_start>), computed once, reused afterwards
    assert list(with_reuse._prefix_cache) == [tuple(HEAD)]
    assert not without._prefix_cache
    # the cached prefix KV is what a full prefill (batch 1, no padding) writes at those slots
    ids, mask = batch([prompt(WORDS_A)])
    without.generate(ids, mask, *images(15), max_new_tokens=1)
    k_full = without.engine.k_cache[:, 0, :, : len(HEAD)]
    assert torch.allclose(with_reuse._prefix_cache[tuple(HEAD)][0], k_full, atol=1e-5)


def test_llama3_rope_scaling_and_gqa_head_dim_follow_transformers():
    """A bare LlamaForCausalLM (llama3 rope scaling, head_dim != hidden/heads, 1 kv head) behind the
    same embeds interface: the engine takes RoPE and shapes from the checkpoint, not from defaults."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from magma_ros.model.fast import FastGenerator

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16},
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(20)  # sharp attention: wrong positions change the argmax

    class TextOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = lm

        def prepare_inputs_embeds(self, input_ids, attention_mask, pixel_values=None, image_sizes=None):
            pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            return lm.get_input_embeddings()(input_ids) * attention_mask[..., None], attention_mask, pos

    m = TextOnly()
    g = FastGenerator(m, max_batch=2)
    assert abs(float(lm.model.rotary_emb.inv_freq[-1]) - float(g.engine.inv_freq[-1])) == 0
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    emb, mk, _ = m.prepare_inputs_embeds(ids, mask)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mk, do_sample=False, max_new_tokens=12,
                      pad_token_id=0, eos_token_id=2)
    assert torch.equal(g.generate(ids, mask, max_new_tokens=12), ref)


def test_int8_weight_only_stays_close_to_fp32_and_both_paths_agree(tmp_path):
    from magma_ros.model.checkpoint import write_tiny_checkpoint
    from magma_ros.model.fast import FastGenerator
    from magma_ros.model.magma import MagmaModel
    from magma_ros.model.quant import Int8Linear

    d = write_tiny_checkpoint(tmp_path / "ckpt", seed=5, tokenizer=False, hidden_size=64,
                              intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    ref_model = MagmaModel.from_pretrained(d)
    q_model = MagmaModel.from_pretrained(d)
    g = FastGenerator(q_model, quant="int8", max_batch=2)
    assert g.quant_backend == "native"
    lins = [m for m in q_model.language_model.modules() if isinstance(m, Int8Linear)]
    assert len(lins) == 7 * 2 + 1  # q k v o gate up down per layer, lm_head
    assert all(m.weight.dtype == torch.int8 for m in lins)
    ids, mask = batch([prompt(WORDS_A), prompt(WORDS_B)])
    pv, sizes = images(21, 22)
    lo_ref = ref_model(ids, mask, pv, sizes, logits_to_keep=1).logits[:, -1]  # (B, V)
    lo_q = q_model(ids, mask, pv, sizes, logits_to_keep=1).logits[:, -1]
    err = (lo_q - lo_ref).abs().max() / lo_ref.abs().max()
    cos = torch.nn.functional.cosine_similarity(lo_q, lo_ref, dim=-1)
    assert float(err) < 0.05 and float(cos.min()) > 0.999, (float(err), cos)
    assert not torch.equal(lo_q, lo_ref)  # it really is quantized
    # fast and plain run the same quantized weights → the same tokens
    assert torch.equal(g.generate(ids, mask, pv, sizes, max_new_tokens=7),
                       q_model.generate_plain(ids, mask, pv, sizes, max_new_tokens=7))
    # the first token (from the same prefill) agrees with fp32 on this checkpoint
    first_ref = ref_model.generate_plain(ids, mask, pv, sizes, max_new_tokens=1)
    assert torch.equal(g.generate(ids, mask, pv, sizes, max_new_tokens=1), first_ref)


def test_int8_and_int4_linear_error_bounds():
    from magma_ros.model.quant import Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 256)
    q8 = Int8Linear.from_linear(lin)
    scale = lin.weight.abs().amax(1) / 127  # (out,)
    bound = (x.abs().sum(1, keepdim=True) * scale / 2) + 1e-5  # rounding error ≤ scale/2 per weight
    assert bool(((q8(x) - lin(x)).abs() <= bound).all())
    q4 = Int4Linear.from_linear(lin, group_size=64)
    assert q4.packed.dtype == torch.uint8 and q4.packed.shape == (96, 128)
    w4 = q4.dequantize(torch.float32)
    g = lin.weight.view(96, 4, 64)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(64, 1)
    assert bool(((w4 - lin.weight).abs() <= step / 2 + 1e-6).all())
    with torch.no_grad():
        y4, y = q4(x), lin(x)
    assert float(torch.nn.functional.cosine_similarity(y4.flatten(), y.flatten(), dim=0)) > 0.99


def test_int4_native_runs_end_to_end(ckpt):
    from magma_ros.model.fast import FastGenerator
    from magma_ros.model.magma import MagmaModel

    m = MagmaModel.from_pretrained(ckpt)
    g = FastGenerator(m, quant="int4")
    assert g.quant_backend == "native"
    ids, mask = batch([prompt(WORDS_A)])
    pv, sizes = images(1)
    out = g.generate(ids, mask, pv, sizes, max_new_tokens=7)
    assert out.shape == (1, 7)
    assert torch.equal(out, m.generate_plain(ids, mask, pv, sizes, max_new_tokens=7))
    with pytest.raises(ValueError, match="unknown quantization"):
        FastGenerator(m, quant="int3")


def test_benchmark_cli_ends_with_a_json_line(ckpt):
    """The benchmark's smoke mode: both paths, same weights, one JSON summary line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "policy_step.py"), "--device", "cpu",
                        "--checkpoint", str(ckpt), "--iters", "1", "--warmup", "0", "--threads", "1",
                        "--no-write"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"device", "fast_hz", "plain_hz", "speedup", "tokens_equal"} <= set(last)
    assert last["device"] == "cpu" and last["tokens_equal"] is True
    assert np.isfinite(last["fast_hz"]) and last["fast_hz"] > 0


# ---------------------------------------------------------------- fast preprocessing / vision / head
FIXTURE_INPUTS = sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "magma_tiny"
                         / "inputs").glob("*.png"))


def _fixture_and_random_images():
    from PIL import Image

    ims = [np.asarray(Image.open(p).convert("RGB")) for p in FIXTURE_INPUTS]
    rng = np.random.default_rng(7)
    for h, w in [(480, 640), (256, 256), (100, 900), (700, 300), (1000, 1100), (37, 53), (513, 511)]:
        ims.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(16, 1200, 2))
        ims.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return ims


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_preprocessing_equals_the_official_processor(channels_last):
    from magma_ros.model.processor import preprocess, preprocess_fast, preprocess_robot, preprocess_robot_fast

    ims = _fixture_and_random_images()
    assert len(FIXTURE_INPUTS) >= 2
    for a in ims:
        for ref, got in [(preprocess(a), preprocess_fast(a, channels_last=channels_last)),
                         (preprocess_robot(a), preprocess_robot_fast(a, channels_last=channels_last))]:
            assert torch.equal(got["image_sizes"], ref["image_sizes"][None]), a.shape
            pv = got["pixel_values"]
            assert pv.shape == (1,) + tuple(ref["pixel_values"].shape) and pv.dtype == torch.float32
            assert (pv[0] - ref["pixel_values"]).abs().max().item() <= 1e-5, a.shape
    # BGR frames and grayscale input take the same conversions as the official path
    a = ims[-1]
    ref = preprocess(a, bgr=True)["pixel_values"]
    assert (preprocess_fast(a, bgr=True)["pixel_values"][0] - ref).abs().max().item() <= 1e-5
    g = a[..., 0]
    assert (preprocess_fast(g)["pixel_values"][0] - preprocess(g)["pixel_values"]).abs().max().item() <= 1e-5


def test_nhwc_vision_tower_matches_the_module(model):
    from magma_ros.model.fast import NHWCVisionTower, convnext_nhwc_supported

    trunk = model.vision_tower.clip_vision_model.trunk
    assert convnext_nhwc_supported(trunk)
    pv = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model.vision_tower(pv).permute(0, 2, 3, 1)
        got = NHWCVisionTower(model.vision_tower)(pv)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_deferred_resize_is_the_official_resize():
    """preprocess_fast(defer_upsample) + upsample_pixels == the official processor; only the exact
    2x case (1x1 grid, half the crop size) is deferred."""
    from magma_ros.model.processor import preprocess, preprocess_fast, preprocess_robot, upsample_pixels

    for a in _fixture_and_random_images():
        got = preprocess_fast(a, defer_upsample=True)
        ref = preprocess(a)["pixel_values"]
        exact2x = a.shape[:2] == (256, 256)
        assert got["upsample"] == (2 if exact2x else 1), a.shape
        assert got["pixel_values"].shape[-1] == (256 if exact2x else ref.shape[-1])
        pv = upsample_pixels(got["pixel_values"], got["upsample"])
        assert (pv[0] - ref).abs().max().item() <= 1e-5, a.shape
    robot = preprocess_robot(_fixture_and_random_images()[-1])["pixel_values"]
    assert robot.shape == (1, 3, 512, 512)
    with pytest.raises(ValueError, match="deferred resize"):
        upsample_pixels(torch.zeros(1, 2, 3, 8, 8), 2)


def test_resize_folded_into_the_stem_matches_resize_then_stem(model):
    """The 2x bilinear resize folded into the stem convolution (A^T W A, replicate padding) gives the
    features of resize-then-tower, checked against the module on the official pixel values, and
    against an independent loop-based resize for the folded weight itself."""
    import torch.nn.functional as F

    from magma_ros.model.fast import NHWCVisionTower, upsample2x_stem_weight
    from magma_ros.model.processor import preprocess_fast, preprocess_robot, resize_robot

    tower = NHWCVisionTower(model.vision_tower)
    for a in _fixture_and_random_images()[:4]:
        half = preprocess_fast(resize_robot(a), defer_upsample=True)
        assert half["upsample"] == 2
        with torch.inference_mode():
            ref = model.vision_tower(preprocess_robot(a)["pixel_values"]).permute(0, 2, 3, 1)
            got = tower(half["pixel_values"][:, 0], 2)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    # the folded stem on its own, against a hand-written bilinear 2x (align_corners=False, clamped)
    conv = model.vision_tower.clip_vision_model.trunk.stem[0]
    x = torch.randn(1, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def src(i, n):  # the two taps and weights of up-sampled index i over n source samples
        c = max((i + 0.5) / 2 - 0.5, 0.0)
        i0 = int(c)
        return i0, min(i0 + 1, n - 1), c - i0

    up = torch.zeros(1, 3, 24, 20, dtype=torch.float64)
    for yy in range(24):
        y0, y1, ly = src(yy, 12)
        for xx in range(20):
            x0, x1, lx = src(xx, 10)
            up[..., yy, xx] = ((1 - ly) * ((1 - lx) * x[..., y0, x0] + lx * x[..., y0, x1])
                               + ly * ((1 - lx) * x[..., y1, x0] + lx * x[..., y1, x1]))
    w = conv.weight.detach().double()
    want = F.conv2d(up, w, stride=conv.stride)
    fold = upsample2x_stem_weight(conv).double()
    got = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), fold, stride=conv.stride[0] // 2)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_fast_step_with_fast_preprocessing_gives_the_plain_tokens(model, fast):
    """The benchmark's / policy's fast step (fast preprocessing, NHWC tower, transposed head, fused
    q/k/v and gate/up) gives the tokens of the plain step (official processor + generate)."""
    from magma_ros.model.processor import collate, preprocess_robot, preprocess_robot_fast

    ids, mask = batch([prompt(WORDS_B)])
    assert fast.engine.lm_head_t is not None and fast.engine.layers[0].qkv is not None
    assert fast._vision_nhwc
    for a in _fixture_and_random_images()[:5]:
        ref_in = collate([preprocess_robot(a)])
        ref = model.generate_plain(ids, mask, ref_in["pixel_values"], ref_in["image_sizes"], max_new_tokens=7)
        for defer in (False, True):  # the 512x512 crop, or the 256x256 frame with the resize in the stem
            f = preprocess_robot_fast(a, defer_upsample=defer)
            out = fast.generate(ids, mask, f["pixel_values"], f["image_sizes"], max_new_tokens=7,
                                pixel_upsample=f["upsample"])
            assert torch.equal(out, ref), (defer, out, ref)


def test_cpu_only_fast_paths_can_be_turned_off(model):
    from magma_ros.model.fast import FastGenerator

    ids, mask = batch([prompt(WORDS_A)])
    pv, sizes = images(11)
    ref = model.generate_plain(ids, mask, pv, sizes, max_new_tokens=7)
    off = FastGenerator(model, max_seq_len=512, lm_head_t=False, fuse=False, nhwc_vision=False)
    assert off.engine.lm_head_t is None and off.engine.layers[0].qkv is None and not off._vision_nhwc
    assert torch.equal(off.generate(ids, mask, pv, sizes, max_new_tokens=7), ref)
    # a deferred 2x resize still works where the stem cannot take it (module tower, model's merge)
    from magma_ros.model.processor import collate, preprocess_robot, preprocess_robot_fast

    frame = np.random.default_rng(11).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    full = collate([preprocess_robot(frame)])
    ref = model.generate_plain(ids, mask, full["pixel_values"], full["image_sizes"], max_new_tokens=7)
    half = preprocess_robot_fast(frame, defer_upsample=True)
    no_merge = FastGenerator(model, max_seq_len=512, fast_merge=False)
    for gen in (off, no_merge):
        out = gen.generate(ids, mask, half["pixel_values"], half["image_sizes"], max_new_tokens=7,
                           pixel_upsample=half["upsample"])
        assert torch.equal(out, ref)


def test_policy_passes_fast_options_and_uses_fast_preprocessing(model, ckpt):
    from magma_ros.model.policy import MagmaPolicy
    from magma_ros.model.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    fast_pol = MagmaPolicy(model, tokenizer=tok, max_batch=2, fast_options={"lm_head_t": False})
    assert fast_pol.engine_name == "fast" and fast_pol._fast.engine.lm_head_t is None
    plain_pol = MagmaPolicy(model, tokenizer=tok, engine="plain")
    img = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    obs = {"image": img, "instruction": "pick coke can"}
    assert fast_pol.infer(obs)["tokens"] == plain_pol.infer(obs)["tokens"]
    ids, mask, pv, sizes, upsample = fast_pol._batch(["x"], [[img]], robot=True)
    # the frame stays 256x256: the exact 2x resize to the 512x512 crop happens in the vision stem
    assert pv.shape == (1, 1, 3, 256, 256) and sizes.tolist() == [[[1, 1]]] and upsample == 2
    assert pv[0].is_contiguous(memory_format=torch.channels_last)
    # "none" / "" (ROS parameters) mean off; a real option reaches the generator
    off = MagmaPolicy(model, tokenizer=tok, compile="none", quant="")
    assert off.engine_name == "fast" and off._fast.compile is None and off._fast.quant_backend is None


@pytest.mark.parametrize("engine", ["fast", "plain"])
def test_long_answers_pause_between_tokens_for_the_action_path(model, ckpt, engine):
    """``yield_to`` (the policy node's second instance: wait while an action is inferred) runs before
    every generated token after the first, blocks the answer while it blocks, and changes no token."""
    import threading
    import time

    from magma_ros.model.policy import MagmaPolicy
    from magma_ros.model.tokenizer import load_tokenizer

    pol = MagmaPolicy(model, tokenizer=load_tokenizer(ckpt), engine=engine)
    img = np.random.default_rng(6).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    ref = pol.ask([img], "what is on the table?", max_new_tokens=12)
    calls = []
    go = threading.Event()

    def wait_for_actions():  # the action path is "busy" until go is set
        calls.append(time.monotonic())
        go.wait()

    pol.yield_to = wait_for_actions
    out = []
    th = threading.Thread(target=lambda: out.append(pol.ask([img], "what is on the table?", max_new_tokens=12)))
    th.start()
    th.join(1.0)
    assert th.is_alive() and len(calls) == 1 and not out  # paused at the first token boundary
    go.set()
    th.join(30)
    assert out == [ref]
    assert 1 <= len(calls) <= 12  # once per generated token after the first (fewer after an early EOS)


@pytest.mark.slow
def test_compiled_step_gives_the_plain_tokens(model):
    """compile="default" (Inductor): the decode step and the NHWC vision tower with the folded 2x
    stem are compiled; tokens equal the plain path's, for the deferred-resize robot frame."""
    from magma_ros.model.fast import FastGenerator
    from magma_ros.model.processor import collate, preprocess_robot, preprocess_robot_fast

    gen = FastGenerator(model, max_seq_len=512, compile="default")
    ids, mask = batch([prompt(WORDS_B)])
    for seed in (1, 2):
        frame = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        full = collate([preprocess_robot(frame)])
        ref = model.generate_plain(ids, mask, full["pixel_values"], full["image_sizes"], max_new_tokens=7)
        half = preprocess_robot_fast(frame, defer_upsample=True)
        out = gen.generate(ids, mask, half["pixel_values"], half["image_sizes"], max_new_tokens=7,
                           pixel_upsample=half["upsample"])
        assert torch.equal(out, ref), (seed, out, ref)


# ---------------------------------------------------------------- sampling
def test_sampling_draws_from_the_tempered_top_k_softmax():
    """Gumbel-max draws follow softmax(logits / T) over the top-k logits (checked by a chi-square
    bound on 40,000 draws), never leave the top k, and respect a -inf constraint bias."""
    from magma_ros.model.fast import Sampling, pick

    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, 1.2])
    T, k, n = 0.7, 5, 40_000
    g = torch.Generator().manual_seed(0)
    s = Sampling(T, k, g)
    rows = logits.expand(n, -1).contiguous()
    finished = torch.zeros(n, dtype=torch.bool)
    tok = pick(rows, None, finished, torch.tensor([99]), 0, s)
    top = torch.topk(logits, k).indices
    want = torch.zeros_like(logits)
    want[top] = torch.softmax(logits[top] / T, 0)
    counts = torch.bincount(tok, minlength=logits.numel()).double()
    assert counts[want == 0].sum() == 0  # outside the top k: never
    expected = want.double() * n
    chi2 = float((((counts - expected) ** 2)[want > 0] / expected[want > 0]).sum())
    assert chi2 < 20.5  # 4 degrees of freedom: P(chi2 > 20.5) ≈ 4e-4 for a correct sampler
    # a constraint bias (-inf outside the allowed ids) keeps its meaning under sampling
    bias = torch.full_like(logits, float("-inf"))
    bias[[3, 7]] = 0.0
    tok = pick(rows, bias, torch.zeros(n, dtype=torch.bool), torch.tensor([99]), 0, Sampling(T, None, g))
    assert set(tok.tolist()) == {3, 7}
    frac3 = float((tok == 3).double().mean())
    p3 = float(torch.softmax(logits[[3, 7]] / T, 0)[0])
    assert abs(frac3 - p3) < 4 * (p3 * (1 - p3) / n) ** 0.5
    # the same generator state gives the same draws; bad settings are refused
    a = Sampling(T, k, torch.Generator().manual_seed(5)).perturb(rows[:8]).argmax(-1)
    b = Sampling(T, k, torch.Generator().manual_seed(5)).perturb(rows[:8]).argmax(-1)
    assert torch.equal(a, b)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            Sampling(bad)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(0.7, -1)


def test_sampled_generation_is_seeded_constrained_and_greedy_in_the_limit(model, fast):
    from magma_ros.model.fast import Sampling

    ids, mask = batch([prompt(WORDS_B)])
    pv, sizes = images(4)

    def run(seed, T=0.7, allowed=None, k=50):
        s = Sampling(T, k, torch.Generator().manual_seed(seed))
        return fast.generate(ids, mask, pv, sizes, max_new_tokens=7, allowed_token_ids=allowed, sampling=s)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)  # repeatable with the same seed
    assert not torch.equal(a, c)  # a random tiny model's softmax is broad: other seeds draw other tokens
    greedy = fast.generate(ids, mask, pv, sizes, max_new_tokens=7)
    assert torch.equal(run(3, T=1e-4, k=0), greedy)  # T -> 0: the argmax
    assert torch.equal(run(4, k=1), greedy)  # top-1: the argmax at any temperature
    allowed = list(range(127744, 128000))  # the 256 action tokens
    out = run(5, T=1.0, allowed=allowed)
    assert out.shape == (1, 7) and all(127744 <= t < 128000 for t in out[0].tolist())


def test_bfloat16_fast_step_tracks_float32(ckpt, monkeypatch):
    """The GPU default dtype, run on the CPU: every bf16 branch (RMSNorm's float32 round trip, bf16
    additive masks, the folded stem in bf16, float32 logits) runs end to end, with a batch of two
    deferred-resize frames, constrained and sampled modes; the first step's logits stay close to the
    float32 model's (bf16 weights carry ~3 significant digits)."""
    import magma_ros.model.fast as fm
    from magma_ros.model.magma import MagmaModel
    from magma_ros.model.processor import preprocess_robot_fast

    seen = []
    real_pick = fm.pick
    monkeypatch.setattr(fm, "pick", lambda logits, *a: (seen.append(logits.clone()), real_pick(logits, *a))[1])
    ids, mask = batch([prompt(WORDS_B), prompt(WORDS_A)])
    frames = [np.random.default_rng(s).integers(0, 256, (480, 640, 3), dtype=np.uint8) for s in (8, 9)]
    half = [preprocess_robot_fast(f, defer_upsample=True) for f in frames]
    pv, sizes = torch.cat([h["pixel_values"] for h in half]), torch.cat([h["image_sizes"] for h in half])
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = MagmaModel.from_pretrained(ckpt, dtype=dtype)
        gen = fm.FastGenerator(m, max_seq_len=512, max_batch=2)
        seen.clear()
        out = gen.generate(ids, mask, pv, sizes, max_new_tokens=7, pixel_upsample=2)
        assert out.shape == (2, 7) and seen[0].dtype == torch.float32 and torch.isfinite(seen[0]).all()
        logits[dtype] = seen[0]
        allowed = list(range(127744, 128000))
        s = fm.Sampling(0.7, 50, torch.Generator().manual_seed(0))
        out = gen.generate(ids, mask, pv, sizes, max_new_tokens=7, pixel_upsample=2,
                           allowed_token_ids=allowed, sampling=s)
        assert ((out >= 127744) & (out < 128000)).all()
    a, b = logits[torch.float32], logits[torch.bfloat16]
    for r in range(2):
        cos = torch.nn.functional.cosine_similarity(a[r], b[r], dim=0)
        assert cos > 0.99, (r, float(cos))
        assert int(b[r].argmax()) in torch.topk(a[r], 20).indices.tolist()


def test_benchmark_full_model_is_magma_8b_and_its_builder_runs(monkeypatch):
    """``--checkpoint full`` (GPU only) builds the official Magma-8B names and shapes; the builder
    itself (meta model, layer-by-layer quantization, random materialization) runs here at a small
    width, fp32 and int8/int4, through a benchmark step."""
    import csv
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import policy_step

    from magma_ros.model.fast import FastGenerator
    from magma_ros.model.magma import MagmaModel
    from magma_ros.model.tokenizer import build_llama3_tokenizer

    with open(root / "test" / "fixtures" / "magma_tiny" / "full_size_keys.tsv") as f:  # official names/shapes
        want = {name: tuple(int(x) for x in shape.strip("[]").split(","))
                for name, shape in list(csv.reader(f, delimiter="\t"))[1:]}
    got = {k: tuple(v.shape) for k, v in MagmaModel(policy_step.full_config(), device="meta").state_dict().items()}
    assert got == want
    small = dict(policy_step.FULL, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vision_depths=(1, 1, 1, 1),
                 vision_dims=(16, 24, 32, 48), head_proj_dim=24)
    monkeypatch.setattr(policy_step, "FULL", small)
    tok = build_llama3_tokenizer()
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for quant in (None, "int8", "int4"):
        model, backend = policy_step.build_full_random(torch.device("cpu"), torch.float32, quant)
        assert not any(t.is_meta for t in model.state_dict().values())
        assert (backend is None) == (quant is None)
        step = policy_step.Step(model, tok, torch.device("cpu"), FastGenerator(model, max_seq_len=512))
        out, actions, _ = step([frame], "fast")
        plain, _, _ = step([frame], "plain")
        assert out.shape == (1, 7) and len(actions) == 1 and np.array_equal(out, plain)
