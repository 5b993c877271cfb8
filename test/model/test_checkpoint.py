"""Generated random-weight checkpoints: other sizes round-trip through from_pretrained and run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from magma_ros.core.errors import ConfigError
from magma_ros.model import MagmaModel, build_llama3_tokenizer, load_tokenizer, preprocess_robot
from magma_ros.model.checkpoint import PRESETS, magma_config_dict, main, write_tiny_checkpoint
from magma_ros.model.magma import MagmaConfig
from magma_ros.model.vision import VisionTowerConfig

# like the fixture's tiny_b: other heads / kv heads / head_dim / widths / depths / vocab than tiny_a
TINY_B = dict(
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=40,
    vocab_size=128263,
    vision_depths=(2, 1, 1, 1),
    vision_dims=(8, 16, 24, 40),
    head_proj_dim=20,
)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("b"), seed=2002, **TINY_B)


@pytest.fixture(scope="module")
def model_b(ckpt_b):
    return MagmaModel.from_pretrained(ckpt_b)


def test_files_and_config_schema(ckpt_b):
    names = {p.name for p in ckpt_b.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "generation_config.json",
    } <= names
    cfg = json.loads((ckpt_b / "config.json").read_text())
    assert cfg["architectures"] == ["MagmaForCausalLM"] and cfg["image_token_index"] == 128257
    assert cfg["mm_use_image_start_end"] is True
    assert cfg["text_config"]["num_key_value_heads"] == 1 and cfg["text_config"]["vocab_size"] == 128263
    assert cfg["vision_config"]["mm_projector_type"] == "mlp2x_gelu" and cfg["vision_config"]["mm_hidden_size"] == 40
    gen = json.loads((ckpt_b / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (128000, 128009, 128256)
    pre = json.loads((ckpt_b / "preprocessor_config.json").read_text())
    assert pre["base_img_size"] == 512 and pre["num_crops"] == 4 and pre["anyres_strategy"] == "crop"


def test_round_trip_other_sizes(ckpt_b, model_b):
    sd, ref = model_b.state_dict(), load_file(str(ckpt_b / "model.safetensors"))
    assert set(sd) == set(ref) and all(torch.equal(sd[k], v) for k, v in ref.items())
    assert model_b.config.vision == VisionTowerConfig(depths=(2, 1, 1, 1), dims=(8, 16, 24, 40), head_proj_dim=20)
    attn = model_b.language_model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 16) and attn.k_proj.weight.shape == (8, 16)  # 2 heads, 1 kv, d 8
    assert model_b.multi_modal_projector.proj[0].weight.shape == (16, 40)
    assert model_b.config.mm_use_image_start_end is True


def test_runs_and_merges_images_as_documented(model_b):
    torch.manual_seed(0)
    img = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    x = preprocess_robot(img)
    pv, sizes = x["pixel_values"][None], x["image_sizes"][None]
    ids = torch.tensor([[128000, 128000, 128006, 882, 128007, 271, 128259, 128257, 128260, 198, 3923, 1957]])
    p = 7  # position of <image>
    embeds, mask, pos = model_b.prepare_inputs_embeds(ids, None, pv, sizes)
    assert embeds.shape == (1, ids.shape[1] - 1 + 16 * 17, 16)  # 272 visual embeddings for a robot frame
    assert torch.equal(pos[0], torch.arange(embeds.shape[1])) and bool(mask.all())
    emb = model_b.language_model.get_input_embeddings()
    feats = model_b.multi_modal_projector(model_b.vision_tower(pv[0]).permute(0, 2, 3, 1))[0]  # (16, 16, H)
    sep = model_b.multi_modal_projector.row_seperator[0, 0]
    block = embeds[0, p : p + 272].view(16, 17, 16)
    torch.testing.assert_close(block[:, :16], feats)  # row-major 16x16 features ...
    assert all(torch.equal(block[r, 16], sep) for r in range(16))  # ... each row closed by the separator
    torch.testing.assert_close(embeds[0, :p], emb(ids[0, :p]))
    torch.testing.assert_close(embeds[0, p + 272 :], emb(ids[0, p + 1 :]))

    out = model_b(ids, None, pv, sizes)
    assert out.logits.shape == (1, embeds.shape[1], 128263) and torch.isfinite(out.logits).all()
    gen = model_b.generate_plain(ids, None, pv, sizes, max_new_tokens=7)
    assert gen.shape == (1, 7) and int(gen.max()) < 128263
    assert int(gen[0, 0]) == int(out.logits[0, -1].argmax())  # greedy

    g = MagmaConfig.from_dict(
        dict(
            model_b.config.raw,
            vision_config=dict(model_b.config.raw["vision_config"], img_anyres_strategy="global"),
        )
    )
    assert g.anyres_strategy == "global"
    model_b.config.anyres_strategy = "global"  # for a 1x1 grid, the stitched image is the crop itself
    try:
        torch.testing.assert_close(model_b.prepare_inputs_embeds(ids, None, pv, sizes)[0], embeds)
    finally:
        model_b.config.anyres_strategy = "crop"


def test_text_only_is_the_plain_language_model(model_b):
    ids = torch.tensor([[128000, 128006, 9125, 128007, 271, 2675, 527, 8479]])
    ref = model_b.language_model(input_ids=ids).logits
    torch.testing.assert_close(model_b(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_same_seed_same_weights_other_seed_differs(tmp_path, ckpt_b):
    a = load_file(
        str(write_tiny_checkpoint(tmp_path / "a", seed=2002, tokenizer=False, **TINY_B) / "model.safetensors")
    )
    b = load_file(str(ckpt_b / "model.safetensors"))
    c = load_file(str(write_tiny_checkpoint(tmp_path / "c", seed=7, tokenizer=False, **TINY_B) / "model.safetensors"))
    k = "vision_tower.clip_vision_model.trunk.stages.0.blocks.1.gamma"
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[k], c[k])
    assert 0.2 < float(a[k].mean()) < 0.8  # gamma visible (real init 1e-6 would hide gamma bugs)


def test_tokenizer_files_load_like_the_built_tokenizer(ckpt_b):
    tok, ref = load_tokenizer(ckpt_b), build_llama3_tokenizer()
    convs = [
        {"role": "system", "content": "You are agent that can see, talk and act."},
        {"role": "user", "content": "<image>\nWhat action should the robot take to open the drawer?"},
    ]
    p1 = tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    p2 = ref.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    assert p1 == p2 and p1.startswith("<|begin_of_text|><|start_header_id|>system")
    assert tok(p1)["input_ids"] == ref(p2)["input_ids"] and tok(p1)["input_ids"][:2] == [128000, 128000]
    assert tok.vocab_size == 128000 and tok.pad_token_id == 128256 and tok.eos_token_id == 128009
    assert tok.convert_tokens_to_ids("<image>") == 128257


def test_cli_and_bad_sizes(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert main([str(tmp_path / "x"), "--size", "tiyn"]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown checkpoint size field"):
        write_tiny_checkpoint(tmp_path / "y", hidden=3)
    with pytest.raises(ConfigError, match="vocab_size"):
        write_tiny_checkpoint(tmp_path / "z", vocab_size=1000)


def test_mid_preset_shape():
    cfg = MagmaConfig.from_dict(magma_config_dict(PRESETS["mid"]))
    cfg.vision = VisionTowerConfig(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), head_proj_dim=64)
    m = MagmaModel(cfg, device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert 60e6 < n < 80e6 and m.multi_modal_projector.proj[0].weight.shape == (256, 256)


def test_batch_of_multi_image_prompts_equals_each_prompt_alone(model_b):
    from magma_ros.model import collate, preprocess

    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)  # 1x1 grid -> 272
    b = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)  # 1x2 grid -> 16*33 = 528
    one = [128000, 128006, 882, 128007, 271, 128257, 198, 3923, 1957]
    two = [128000, 128257, 198, 128257, 198, 3923, 1957, 1288, 279, 12585, 1935]
    samples = [preprocess(a), preprocess([b, a])]
    batch = collate(samples)
    width = max(len(one), len(two))
    ids = torch.tensor([[128256] * (width - len(one)) + one, [128256] * (width - len(two)) + two])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(one)], [width - len(two)]])).long()
    embeds, m, pos = model_b.prepare_inputs_embeds(ids, mask, batch["pixel_values"], batch["image_sizes"])
    lens = [len(one) - 1 + 272, len(two) - 2 + 528 + 272]
    assert embeds.shape[1] == max(lens) and m.sum(1).tolist() == lens
    for i, (t, s) in enumerate(zip((one, two), samples)):
        e1, m1, p1 = model_b.prepare_inputs_embeds(
            torch.tensor([t]), None, s["pixel_values"][None], s["image_sizes"][None]
        )
        n = e1.shape[1]
        torch.testing.assert_close(embeds[i, -n:], e1[0])  # right-aligned, left pads are zeros
        assert embeds[i, :-n].abs().sum() == 0 and m[i, :-n].sum() == 0
        assert torch.equal(pos[i, -n:], p1[0])
    out = model_b(ids, mask, batch["pixel_values"], batch["image_sizes"], logits_to_keep=1)
    for i, (t, s) in enumerate(zip((one, two), samples)):
        alone = model_b(torch.tensor([t]), None, s["pixel_values"][None], s["image_sizes"][None], logits_to_keep=1)
        torch.testing.assert_close(out.logits[i, -1], alone.logits[0, -1], atol=1e-4, rtol=1e-4)
