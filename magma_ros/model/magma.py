"""Magma (``MagmaForCausalLM``) in plain torch on current transformers.

Llama-3 language model (transformers' ``LlamaForCausalLM``) + ConvNeXt vision tower + ``mlp2x_gelu``
projector with a learned row separator. Image features replace each ``<image>`` token exactly as
the official ``MagmaForCausalLM._merge_input_ids_with_image_features`` does (github microsoft/Magma,
``magma/modeling_magma.py``):

* ``pixel_values`` (B, n_crops, 3, 512, 512) and ``image_sizes`` (B, n_images, 2) as (rows, cols);
  a sample's crops are its images' crop grids, row-major, concatenated; rows of ``image_sizes`` that
  are all zero are padding.
* each image becomes rows*16 feature rows of cols*16 tokens, each row followed by ``row_seperator``:
  rows*16 * (cols*16 + 1) embeddings (272 for one 512x512 crop).
* text tokens with attention_mask 0 are dropped, the merged rows are right-aligned (left padding with
  zero embeddings and mask 0), position ids are ``cumsum(mask) - 1`` with padded positions set to 1.

Weights keep the checkpoint's names: ``vision_tower.clip_vision_model.trunk.*`` (incl. ConvNeXt
``gamma``), ``multi_modal_projector.{proj.0,proj.2,row_seperator}``, ``language_model.*``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magma_ros.model.vision import MagmaVisionTower, VisionTowerConfig

# Llama fields copied from ``text_config`` into transformers' LlamaConfig (others are ignored).
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)


@dataclass
class MagmaConfig:
    """Everything the port reads from a Magma ``config.json``.

    Unknown attributes fall through to ``text_config`` (a transformers ``LlamaConfig``), so
    ``config.hidden_size`` etc. work as on the official config, which copies the text fields up.
    """

    text_config: Any  # transformers.LlamaConfig of the language model
    image_token_index: int = 128257  # the single <image> placeholder id, expanded to all visual tokens
    mm_use_image_start_end: bool = False  # prompts wrap <image> as <image_start><image><image_end>
    anyres_strategy: str = "crop"  # "crop": each 512x512 crop through the tower; "global": stitched
    img_size: int = 512  # crop side in pixels
    max_num_crops: int = 4  # crop grid (rows*cols) limit of the processor
    mm_projector_type: str = "mlp2x_gelu"  # mlp{N}x_gelu: Linear, (GELU, Linear) * (N-1)
    mm_hidden_size: int = 3072  # vision channels into the projector
    mm_use_row_seperator: bool = True  # append the learned row separator after every feature row
    mm_use_im_start_end_params: bool = False  # projector holds (unused) img_start/end_seperator tensors
    pad_token_id: int | None = None  # <pad> (128256); kept here even when it has no embedding row
    vision: VisionTowerConfig | None = None  # trunk shape; None until read from the checkpoint
    raw: dict = field(default_factory=dict)  # the parsed config.json, as read

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("text_config", "raw"):
            raise AttributeError(name)
        return getattr(self.text_config, name)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.text_config.eos_token_id

    @classmethod
    def from_dict(cls, d: dict, attn_implementation: str = "sdpa") -> MagmaConfig:
        """Parse a Magma config.json dict (official schema: text_config + vision_config)."""
        from transformers import LlamaConfig

        text = dict(d.get("text_config") or {})
        for k in _LLAMA_FIELDS + ("rope_theta", "rope_scaling", "rope_parameters"):
            if k not in text and k in d:  # older/flat configs keep the Llama fields at top level
                text[k] = d[k]
        kw = {k: text[k] for k in _LLAMA_FIELDS if k in text and text[k] is not None}
        pad = kw.get("pad_token_id")
        if pad is not None and "vocab_size" in kw and pad >= kw["vocab_size"]:
            kw.pop("pad_token_id")  # torch's Embedding refuses a padding_idx outside the table
        if "rope_parameters" in text and text["rope_parameters"]:
            rope = dict(text["rope_parameters"])
        else:
            theta = float(text.get("rope_theta", 500000.0))
            scaling = text.get("rope_scaling")
            if scaling:
                rope = dict(scaling)
                rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
            else:
                rope = {"rope_type": "default"}
            rope["rope_theta"] = theta
        lcfg = LlamaConfig(rope_parameters=rope, **kw)
        lcfg._attn_implementation = attn_implementation
        vc = d.get("vision_config") or {}
        top_flag = d.get("mm_use_image_start_end")
        return cls(
            text_config=lcfg,
            pad_token_id=pad,
            image_token_index=int(d.get("image_token_index", 128257)),
            mm_use_image_start_end=bool(top_flag if top_flag is not None else vc.get("mm_use_im_start_end", False)),
            anyres_strategy=str(vc.get("img_anyres_strategy", vc.get("anyres_strategy", "crop"))),
            img_size=int(vc.get("img_size", 512)),
            max_num_crops=int(vc.get("max_num_crops", 4)),
            mm_projector_type=str(vc.get("mm_projector_type", "mlp2x_gelu")),
            mm_hidden_size=int(vc.get("mm_hidden_size", 3072)),
            mm_use_row_seperator=bool(vc.get("mm_use_row_seperator", True)),
            mm_use_im_start_end_params=bool(vc.get("mm_use_im_start_end", False)),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str | Path, attn_implementation: str = "sdpa") -> MagmaConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), attn_implementation=attn_implementation)


class MagmaProjector(nn.Module):
    """``multi_modal_projector``: vision features (..., mm_hidden) -> LM embeddings (..., hidden)."""

    def __init__(self, cfg: MagmaConfig, device=None, dtype=None):
        super().__init__()
        m = re.match(r"^mlp(\d+)x_gelu$", cfg.mm_projector_type)
        if not m:
            raise ValueError(f"unsupported mm_projector_type '{cfg.mm_projector_type}'; valid: mlp<N>x_gelu")
        h = cfg.hidden_size
        mods: list[nn.Module] = [nn.Linear(cfg.mm_hidden_size, h, device=device, dtype=dtype)]
        for _ in range(1, int(m.group(1))):
            mods += [nn.GELU(), nn.Linear(h, h, device=device, dtype=dtype)]  # exact (erf) GELU
        self.proj = nn.Sequential(*mods)
        self.row_seperator = nn.Parameter(torch.zeros(1, 1, h, device=device, dtype=dtype))
        if cfg.mm_use_im_start_end_params:  # defined by the official code, never used in its forward
            self.img_start_seperator = nn.Parameter(torch.zeros(1, h, device=device, dtype=dtype))
            self.img_end_seperator = nn.Parameter(torch.zeros(1, h, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class MagmaOutput:
    """Forward result: ``logits`` (B, L, V) float32 over the merged sequence."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # (n_layers + 1) x (B, L, H) if requested
    cache: Any = None  # the LM's KV cache (transformers Cache) if use_cache
    attention_mask: torch.Tensor | None = None  # (B, L) merged mask
    position_ids: torch.Tensor | None = None  # (B, L) merged positions


def _output_cache(out) -> Any:
    cache = getattr(out, "cache", None)  # transformers 5 name
    return cache if cache is not None else getattr(out, "past_key_values", None)


class MagmaModel(nn.Module):
    """Magma-8B-style vision-language model; see the module docstring for the input conventions."""

    def __init__(self, config: MagmaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        from transformers import LlamaForCausalLM

        if config.vision is None:
            config.vision = VisionTowerConfig(dims=(384, 768, 1536, config.mm_hidden_size))
        self.config = config
        self.vision_tower = MagmaVisionTower(config.vision, device=device, dtype=dtype)
        self.multi_modal_projector = MagmaProjector(config, device=device, dtype=dtype)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with dev:
            lm = LlamaForCausalLM(config.text_config)
        if dtype is not None:
            lm.to(dtype)
        self.language_model = lm
        if dev.type != "meta":
            self.reset_rotary(dev)
        self.eval()

    def reset_rotary(self, device: torch.device | str) -> None:
        """(Re)build the LM's rotary table in float32 on ``device`` (it is not a checkpoint tensor)."""
        rot = self.language_model.model.rotary_emb
        with torch.device(device):
            self.language_model.model.rotary_emb = type(rot)(config=self.config.text_config)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the RoPE frequencies; transformers keeps them float32
        super()._apply(fn, recurse)
        rot = getattr(getattr(getattr(self, "language_model", None), "model", None), "rotary_emb", None)
        if rot is not None and rot.inv_freq.dtype != torch.float32:
            self.reset_rotary(rot.inv_freq.device)
        return self

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attn_implementation: str = "sdpa",
        progress: bool = True,
        revision: str | None = None,
    ) -> MagmaModel:
        """Load an HF-format Magma checkpoint (local dir or hub id); see ``magma_ros.model.loader``."""
        from magma_ros.model.loader import load_magma

        return load_magma(
            path_or_hub_id,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            progress=progress,
            revision=revision,
        )

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    # ---- vision -------------------------------------------------------------------------------
    def _split_images(self, pixel_values, image_sizes, batch_size: int):
        """-> per-sample list of (rows, cols) and one tensor of all crops (N_crops, 3, S, S)."""
        if image_sizes is None:
            raise ValueError("image_sizes is required with pixel_values: (B, n_images, 2) as (rows, cols)")
        image_sizes = torch.as_tensor(image_sizes)
        if image_sizes.dim() == 2:  # (n_images, 2) for a single sample
            image_sizes = image_sizes.unsqueeze(0)
        if image_sizes.dim() != 3 or image_sizes.shape[0] != batch_size or image_sizes.shape[-1] != 2:
            raise ValueError(f"image_sizes must be (B={batch_size}, n_images, 2), got {tuple(image_sizes.shape)}")
        sizes = [[(int(r), int(c)) for r, c in s.tolist() if r + c > 0] for s in image_sizes]
        if pixel_values.dim() == 5:  # (B, max_crops, 3, S, S): each sample's crops first, zero padding after
            if pixel_values.shape[0] != batch_size:
                raise ValueError(f"pixel_values batch {pixel_values.shape[0]} != input_ids batch {batch_size}")
            parts = []
            for pv, s in zip(pixel_values, sizes):
                n = sum(r * c for r, c in s)
                if n > pv.shape[0]:
                    raise ValueError(f"image_sizes {s} need {n} crops, pixel_values has {pv.shape[0]}")
                parts.append(pv[:n])
            crops = torch.cat(parts, 0)
        elif pixel_values.dim() == 4:  # (total_crops, 3, S, S): all crops of all samples in order
            crops = pixel_values
            if crops.shape[0] != sum(r * c for s in sizes for r, c in s):
                raise ValueError(
                    f"pixel_values has {crops.shape[0]} crops, image_sizes say "
                    f"{sum(r * c for s in sizes for r, c in s)}"
                )
        else:
            raise ValueError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        return sizes, crops

    def encode_images(self, pixel_values: torch.Tensor, image_sizes) -> list[list[torch.Tensor]]:
        """Visual embeddings per sample and image: each (rows*h * (cols*w + 1), H) (with row separators).

        pixel_values (B, n_crops, 3, S, S) or (total_crops, 3, S, S); image_sizes (B, n_images, 2).
        """
        b = torch.as_tensor(image_sizes).shape[0] if torch.as_tensor(image_sizes).dim() == 3 else 1
        sizes, crops = self._split_images(pixel_values, image_sizes, b)
        crops = crops.to(device=self.device, dtype=self.vision_tower.clip_vision_model.trunk.stem[0].weight.dtype)
        flat = [rc for s in sizes for rc in s]
        sep = self.multi_modal_projector.row_seperator  # (1, 1, H)
        feats: list[torch.Tensor] = []
        if self.config.anyres_strategy == "global":
            start = 0
            for r, c in flat:
                pv = crops[start : start + r * c]  # (r*c, 3, S, S) -> one (1, 3, r*S, c*S) image
                start += r * c
                pv = pv.view(r, c, *pv.shape[1:]).permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2).unsqueeze(0)
                f = self.multi_modal_projector(self.vision_tower(pv)[0].permute(1, 2, 0))  # (h, w, H)
                if self.config.mm_use_row_seperator:
                    f = torch.cat((f, sep.repeat(f.shape[0], 1, 1).to(f.dtype)), dim=1)
                feats.append(f.flatten(0, 1))
        else:  # "crop": all crops of the whole batch through the tower at once, as the official code
            x = self.vision_tower(crops).permute(0, 2, 3, 1)  # (N, h, w, C)
            x = self.multi_modal_projector(x)  # (N, h, w, H)
            for f, (r, c) in zip(torch.split(x, [r * c for r, c in flat], 0), flat):
                f = f.view(r, c, *f.shape[1:]).permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)  # (r*h, c*w, H)
                if self.config.mm_use_row_seperator:
                    f = torch.cat((f, sep.repeat(f.shape[0], 1, 1).to(f.dtype)), dim=1)  # (r*h, c*w+1, H)
                feats.append(f.flatten(0, 1))
        out, k = [], 0
        for s in sizes:
            out.append(feats[k : k + len(s)])
            k += len(s)
        return out

    # ---- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
    ):
        """The merged sequence fed to the LM.

        input_ids (B, T) with one ``image_token_index`` per image; attention_mask (B, T) (None: ones).
        Returns embeds (B, L, H), mask (B, L) long, position_ids (B, L) long.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).long()
        img_tok = self.config.image_token_index
        ids = input_ids.masked_fill(input_ids == img_tok, 0)  # <image> may lie outside the embedding rows
        text = self.language_model.get_input_embeddings()(ids)  # (B, T, H)
        has_images = pixel_values is not None and input_ids.shape[1] != 1 and len(pixel_values) > 0
        if not has_images:
            if bool((input_ids == img_tok).any()):
                raise ValueError("input_ids contain <image> tokens but no pixel_values were given")
            pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            return text, attention_mask, pos
        feats = self.encode_images(pixel_values, image_sizes)
        bsz = input_ids.shape[0]
        if len(feats) != bsz:
            raise ValueError(f"image_sizes describe {len(feats)} samples, input_ids has {bsz}")
        left = True  # official rule: left padding unless only the right side has padding
        if bsz > 1:
            lp, rp = bool((attention_mask[:, 0] == 0).any()), bool((attention_mask[:, -1] == 0).any())
            if lp and rp:
                raise ValueError("attention_mask has padding on both sides")
            left = not rp
        rows = []
        for b in range(bsz):
            keep = attention_mask[b] == 1
            pos_img = (input_ids[b] == img_tok) & keep
            n_tok = int(pos_img.sum())
            if n_tok != len(feats[b]):
                raise ValueError(f"sample {b}: {n_tok} <image> tokens but {len(feats[b])} images in image_sizes")
            pieces, start, k = [], 0, 0
            idx = torch.nonzero(pos_img).flatten().tolist()
            for i in idx + [input_ids.shape[1]]:
                seg = keep[start:i]
                pieces.append(text[b, start:i][seg])
                if i < input_ids.shape[1]:
                    pieces.append(feats[b][k].to(text.dtype))
                    k += 1
                start = i + 1
            rows.append(torch.cat(pieces, 0))
        length = max(r.shape[0] for r in rows)
        hdim = text.shape[-1]
        embeds = text.new_zeros(bsz, length, hdim)
        mask = attention_mask.new_zeros(bsz, length)
        for b, r in enumerate(rows):
            sl = slice(length - r.shape[0], length) if left else slice(0, r.shape[0])
            embeds[b, sl] = r
            mask[b, sl] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return embeds, mask, pos

    # ---- forward / generate ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
        *,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        use_cache: bool = False,
    ) -> MagmaOutput:
        """Logits (B, L, V) float32 over the merged sequence (``logits_to_keep=n``: last n only)."""
        embeds, mask, pos = self.prepare_inputs_embeds(input_ids, attention_mask, pixel_values, image_sizes)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
        )
        return MagmaOutput(
            logits=out.logits.float(),
            hidden_states=out.hidden_states,
            cache=_output_cache(out),
            attention_mask=mask,
            position_ids=pos,
        )

    @torch.no_grad()
    def generate_plain(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
        max_new_tokens: int = 7,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy decoding the way a user would write it with transformers: (B, n) new token ids.

        ``language_model.generate(inputs_embeds=..., attention_mask=..., do_sample=False)``; stops
        early only when every row produced EOS (rows that finished are padded with pad_token_id).
        """
        embeds, mask, _ = self.prepare_inputs_embeds(input_ids, attention_mask, pixel_values, image_sizes)
        kw = dict(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=self.config.pad_token_id,
            eos_token_id=self.config.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        kw.update(generate_kwargs)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
