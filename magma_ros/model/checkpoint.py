"""Write small random-weight Magma checkpoints in the published Hugging Face layout.

For tests, demos and benchmarks without the 17.8 GB weights: the same ``config.json`` schema as
Magma-8B (text_config + vision_config, ``image_token_index`` 128257, top-level
``mm_use_image_start_end: true`` as the SimplerEnv code reads from the released config),
``model.safetensors`` with the checkpoint's parameter names, the offline Llama-3 tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``),
``preprocessor_config.json`` and ``generation_config.json``. Loads with ``MagmaModel.from_pretrained``.

CLI: ``python -m magma_ros.model.checkpoint DIR [--seed N] [--size tiny|mid]``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from magma_ros.core.errors import ConfigError, choose


@dataclass(frozen=True)
class TinySizes:
    """Architecture of a generated checkpoint (defaults: the fixture's tiny_a)."""

    hidden_size: int = 16  # LM width (= projector output)
    intermediate_size: int = 48  # LM MLP width
    num_hidden_layers: int = 2  # LM decoder layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # GQA kv heads (divides num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 128320  # embedding rows; >= 128261 so every tokenizer id has a row
    vision_depths: tuple[int, ...] = (1, 2, 1, 1)  # ConvNeXt blocks per stage
    vision_dims: tuple[int, ...] = (16, 24, 32, 48)  # ConvNeXt widths; last = mm_hidden_size
    head_proj_dim: int = 24  # open_clip head.proj rows (unused by the forward pass)
    max_position_embeddings: int = 8192  # RoPE table limit


PRESETS = {
    "tiny": TinySizes(),  # ~4.2 M params, ~17 MB fp32 (the 128k vocab dominates)
    "mid": TinySizes(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_depths=(2, 2, 4, 2),
        vision_dims=(32, 64, 128, 256),
        head_proj_dim=64,
    ),  # ~70 M params, ~280 MB fp32: closer to real compute ratios
}

GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "pad_token_id": 128256,
}
PREPROCESSOR_CONFIG = {
    "anyres_strategy": "crop",
    "base_img_size": 512,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MagmaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "num_crops": 4,
}


def magma_config_dict(s: TinySizes, mm_use_image_start_end: bool = True) -> dict:
    """config.json for sizes ``s`` in the official MagmaConfig schema."""
    text = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": s.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 128000,
        "eos_token_id": 128009,
        "pad_token_id": 128256,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "vocab_size": s.vocab_size,
    }
    if s.head_dim is not None:
        text["head_dim"] = s.head_dim
    vision = {
        "vision_backbone": "convnextxxlarge",
        "vision_feature_layer": "clip_vis_dense",
        "img_anyres_strategy": "crop",
        "anyres_strategy": "crop",
        "img_size": 512,
        "max_num_crops": 4,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_row_seperator": True,
        "mm_hidden_size": s.vision_dims[-1],
        "hidden_size": s.hidden_size,
    }
    d = {
        "architectures": ["MagmaForCausalLM"],
        "model_type": "magma",
        "image_token_index": 128257,
        "mm_use_image_start_end": mm_use_image_start_end,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    d.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})  # as MagmaConfig does
    d.update({"text_config": text, "vision_config": vision})
    return d


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Moderate, non-degenerate random weights (the fixture's rules: visible gamma, sharp q/k)."""
    g = torch.Generator().manual_seed(seed)
    norms = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            if name.endswith(".gamma"):
                v = 0.5 + 0.1 * torch.randn(shape, generator=g)
            elif name in norms:
                v = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif name.endswith(".bias"):
                v = 0.05 * torch.randn(shape, generator=g)
            elif name.endswith("row_seperator"):
                v = 0.5 * torch.randn(shape, generator=g)
            elif name.endswith("embed_tokens.weight"):
                v = torch.randn(shape, generator=g)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = 3.0 * torch.randn(shape, generator=g) / fan_in**0.5
            elif p.dim() >= 2:
                v = torch.randn(shape, generator=g) / fan_in**0.5
            else:
                v = 0.1 * torch.randn(shape, generator=g)
            p.copy_(v.to(p.dtype))


def _write_tokenizer(out: Path) -> None:
    from magma_ros.model.tokenizer import (
        BOS,
        EOT,
        LLAMA3_BASE_VOCAB,
        LLAMA3_CHAT_TEMPLATE,
        LLAMA3_SPECIAL_TOKENS,
        MAGMA_ADDED_TOKENS,
        PAD,
        _tokenizer_json,
    )

    (out / "tokenizer.json").write_text(_tokenizer_json(MAGMA_ADDED_TOKENS))
    added = {}
    for i, t in enumerate(list(LLAMA3_SPECIAL_TOKENS) + list(MAGMA_ADDED_TOKENS)):
        added[str(LLAMA3_BASE_VOCAB + i)] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    cfg = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 8192,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}, indent=2)
    )


def write_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "tiny",
    dtype: torch.dtype = torch.float32,
    mm_use_image_start_end: bool = True,
    tokenizer: bool = True,
    **sizes,
) -> Path:
    """Write a random-weight Magma checkpoint to ``out_dir``; returns the directory.

    ``size`` picks a preset (tiny|mid); keyword arguments override single `TinySizes` fields
    (e.g. ``num_attention_heads=2, num_key_value_heads=1, vocab_size=128263``).
    """
    from safetensors.torch import save_file

    from magma_ros.model.magma import MagmaConfig, MagmaModel
    from magma_ros.model.vision import VisionTowerConfig

    base = PRESETS[choose(size, PRESETS, "checkpoint size")]
    unknown = sorted(set(sizes) - set(asdict(base)))
    if unknown:
        raise ConfigError(f"unknown checkpoint size field(s) {unknown}; valid: {', '.join(asdict(base))}")
    s = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})
    if tokenizer and s.vocab_size < 128261:
        raise ConfigError(f"vocab_size {s.vocab_size} < 128261: the Magma tokenizer's ids would have no rows")
    if s.num_attention_heads % s.num_key_value_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_d = magma_config_dict(s, mm_use_image_start_end)
    cfg_d["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg = MagmaConfig.from_dict(cfg_d)
    cfg.vision = VisionTowerConfig(
        depths=tuple(s.vision_depths), dims=tuple(s.vision_dims), head_proj_dim=s.head_proj_dim
    )
    model = MagmaModel(cfg, device="meta", dtype=torch.float32).to_empty(device="cpu")  # skip default init
    _init_weights(model, seed)  # fills every parameter
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg_d, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if tokenizer:
        _write_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="magma-ros make-tiny-checkpoint",
        description="Write a small random-weight Magma checkpoint (HF layout).",
    )
    ap.add_argument("dir", help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="weight seed")
    ap.add_argument("--size", default="tiny", help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    a = ap.parse_args(argv)
    try:
        out = write_tiny_checkpoint(a.dir, seed=a.seed, size=a.size, dtype=getattr(torch, a.dtype))
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
