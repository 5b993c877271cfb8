"""from_pretrained: checkpoint names as published, shards, errors, dtype, hub ids (no network)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from magma_ros.core.errors import ConfigError
from magma_ros.model import MagmaModel
from magma_ros.model.loader import CheckpointError

TINY_A = FIXTURES / "magma_tiny" / "tiny_a"


@pytest.fixture(scope="module")
def ref_sd():
    return load_file(str(TINY_A / "model.safetensors"))


@pytest.fixture(scope="module")
def model():
    return MagmaModel.from_pretrained(TINY_A)


def variant(tmp_path, sd, config_edit=None):
    """A copy of tiny_a with tensors ``sd`` (and an edited config.json)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = json.loads((TINY_A / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_weights_are_the_checkpoints_bit_for_bit(model, ref_sd):
    sd = model.state_dict()
    assert set(sd) == set(ref_sd)  # incl. ConvNeXt gamma, unused head.proj / trunk.head.norm
    assert all(torch.equal(sd[k], v) for k, v in ref_sd.items())
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    inv = model.language_model.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, 1.0 / 500000.0 ** (torch.arange(0, 4, 2).float() / 4))  # head_dim 4
    assert model.config.image_token_index == 128257 and model.config.vocab_size == 128320
    assert model.config.mm_use_image_start_end is False  # tiny_a's config says so
    assert model.config.num_key_value_heads == 2  # text fields reachable as on the official config


def test_sharded_checkpoint_with_progress_bar(tmp_path, ref_sd, model, capsys):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(TINY_A / "config.json", d / "config.json")
    keys = sorted(ref_sd)
    weight_map = {}
    for i, part in enumerate((keys[::3], keys[1::3], keys[2::3])):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: ref_sd[k] for k in part}, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    m = MagmaModel.from_pretrained(str(d), progress=True)
    assert "Loading Magma shards" in capsys.readouterr().err
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref_sd.items())
    ids = torch.tensor([[128000, 128006, 9125, 128007, 271, 5000, 6000]])
    torch.testing.assert_close(m(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_gamma_renamed_to_weight_by_old_transformers_still_loads(tmp_path, ref_sd):
    renamed = {(k[: -len("gamma")] + "weight" if k.endswith(".gamma") else k): v for k, v in ref_sd.items()}
    assert sum(k.endswith("blocks.0.weight") for k in renamed) == 4
    m = MagmaModel.from_pretrained(variant(tmp_path, renamed))
    g = m.vision_tower.clip_vision_model.trunk.stages[1].blocks[1].gamma
    assert torch.equal(g, ref_sd["vision_tower.clip_vision_model.trunk.stages.1.blocks.1.gamma"])


def test_mismatch_error_lists_missing_unexpected_and_misshaped(tmp_path, ref_sd):
    sd = dict(ref_sd)
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]
    sd["multi_modal_projector.extra.weight"] = torch.zeros(2)
    sd["multi_modal_projector.proj.2.bias"] = torch.zeros(17)

    def vocab(cfg):
        cfg["text_config"]["vocab_size"] = 128256

    with pytest.raises(CheckpointError) as e:
        MagmaModel.from_pretrained(variant(tmp_path, sd, vocab))
    msg = str(e.value)
    assert "missing (1): language_model.model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): multi_modal_projector.extra.weight" in msg
    assert "multi_modal_projector.proj.2.bias: checkpoint [17] vs model [16]" in msg
    assert "language_model.lm_head.weight: checkpoint [128320, 16] vs model [128256, 16]" in msg
    assert "vocab_size is 128256 but embed_tokens has 128320 rows" in msg


def test_vocab_rows_come_from_the_config(tmp_path, ref_sd):
    sd = dict(ref_sd)
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        sd[k] = ref_sd[k][:128263].clone()

    def vocab(cfg):
        cfg["vocab_size"] = cfg["text_config"]["vocab_size"] = 128263

    m = MagmaModel.from_pretrained(variant(tmp_path, sd, vocab))
    assert m(torch.tensor([[128000, 42]])).logits.shape == (1, 2, 128263)


def test_unused_start_end_separators_are_optional(tmp_path, ref_sd, model):
    def flag(cfg):
        cfg["vision_config"]["mm_use_im_start_end"] = True  # official projector then defines 2 unused params

    m = MagmaModel.from_pretrained(variant(tmp_path, dict(ref_sd), flag))
    assert m.multi_modal_projector.img_start_seperator.shape == (1, 16)
    assert m.config.mm_use_image_start_end is True
    ids = torch.tensor([[128000, 5000, 6000]])
    assert torch.equal(m(ids).logits, model(ids).logits)


def test_bfloat16(model):
    m = MagmaModel.from_pretrained(TINY_A, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[128000, 128006, 9125, 128007, 271, 5000, 6000, 7000]])
    lo, ref = m(ids).logits[0, -1], model(ids).logits[0, -1]
    assert lo.dtype == torch.float32 and torch.isfinite(lo).all()
    assert torch.nn.functional.cosine_similarity(lo, ref, dim=0) > 0.99


def test_path_errors_and_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="neither a local directory nor a hub id"):
        MagmaModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "bin").mkdir()
    shutil.copy(TINY_A / "config.json", tmp_path / "bin" / "config.json")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ConfigError, match="pickle"):
        MagmaModel.from_pretrained(tmp_path / "bin")

    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(TINY_A)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = MagmaModel.from_pretrained("microsoft/Magma-8B", revision="main")
    assert calls[0][:2] == ("microsoft/Magma-8B", "main")
    assert "*.safetensors" in calls[0][2] and not any("bin" in p for p in calls[0][2])
    assert m.config.vocab_size == 128320


def test_casting_keeps_rope_frequencies_float32(tmp_path):
    m = MagmaModel.from_pretrained(TINY_A)
    want = m.language_model.model.rotary_emb.inv_freq.clone()
    m.to(torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert torch.equal(m.language_model.model.rotary_emb.inv_freq, want)  # not rounded to bf16
    out = m(torch.tensor([[128000, 5000]]), use_cache=True)
    assert out.cache is not None and out.cache.get_seq_length() == 2
