"""Magma's vision tower: the open_clip ConvNeXt trunk (built with timm's ConvNeXt, no downloads).

The official tower (`image_tower_magma.MagmaImageTower`) wraps open_clip's
``CLIP-convnext_xxlarge`` visual model and returns ``trunk.stages(trunk.stem(x))`` — the stride-32
dense feature map ("clip_vis_dense"). The open_clip head (``trunk.head.norm``, ``head.proj``) exists
in the checkpoint but is not used by the forward pass; it is kept here so the parameter names match
the published checkpoint one to one.

The architecture is read from the checkpoint's tensor shapes (`VisionTowerConfig.from_shapes`), so
the same code builds ConvNeXt-XXLarge (depths 3/4/30/3, widths 384…3072) and tiny test trunks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

TRUNK_PREFIX = "vision_tower.clip_vision_model.trunk."
HEAD_PROJ_KEY = "vision_tower.clip_vision_model.head.proj.weight"


@dataclass(frozen=True)
class VisionTowerConfig:
    """Shape of the ConvNeXt trunk (what the checkpoint's tensors imply)."""

    depths: tuple[int, ...] = (3, 4, 30, 3)  # blocks per stage (ConvNeXt-XXLarge)
    dims: tuple[int, ...] = (384, 768, 1536, 3072)  # channels per stage; dims[-1] = mm_hidden_size
    norm_eps: float = 1e-5  # LayerNorm eps of the open_clip xxlarge trunk (timm's default 1e-6 is wrong here)
    kernel_size: int = 7  # depth-wise conv kernel
    patch_size: int = 4  # stem stride; total stride = patch_size * 2**(stages-1) = 32
    head_proj_dim: int | None = 1024  # rows of the unused open_clip head.proj (None: no such tensor)

    @property
    def out_channels(self) -> int:
        return self.dims[-1]

    @property
    def stride(self) -> int:
        return self.patch_size * 2 ** (len(self.dims) - 1)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], norm_eps: float = 1e-5) -> VisionTowerConfig:
        """Infer depths/dims from checkpoint names -> shapes (full Magma names, ``vision_tower.…``)."""
        blocks: dict[int, int] = {}
        dims: dict[int, int] = {}
        pat = re.compile(re.escape(TRUNK_PREFIX) + r"stages\.(\d+)\.blocks\.(\d+)\.norm\.weight$")
        for name, shape in shapes.items():
            m = pat.match(name)
            if m:
                s, b = int(m.group(1)), int(m.group(2))
                blocks[s] = max(blocks.get(s, 0), b + 1)
                dims[s] = int(shape[0])
        if not blocks or sorted(blocks) != list(range(len(blocks))):
            raise ValueError(
                "checkpoint has no ConvNeXt trunk under "
                f"'{TRUNK_PREFIX}stages.N.blocks.M' (found stages {sorted(blocks)})"
            )
        n = len(blocks)
        stem = shapes.get(TRUNK_PREFIX + "stem.0.weight")
        patch = int(stem[-1]) if stem is not None else 4
        kdw = shapes.get(TRUNK_PREFIX + "stages.0.blocks.0.conv_dw.weight")
        kernel = int(kdw[-1]) if kdw is not None else 7
        fc1 = shapes.get(TRUNK_PREFIX + "stages.0.blocks.0.mlp.fc1.weight")
        if fc1 is not None and int(fc1[0]) != 4 * dims[0]:
            raise ValueError(f"ConvNeXt mlp ratio {int(fc1[0]) / dims[0]:g} is not supported (timm fixes it at 4)")
        proj = shapes.get(HEAD_PROJ_KEY)
        return cls(
            depths=tuple(blocks[i] for i in range(n)),
            dims=tuple(dims[i] for i in range(n)),
            norm_eps=norm_eps,
            kernel_size=kernel,
            patch_size=patch,
            head_proj_dim=int(proj[0]) if proj is not None else None,
        )


class ClipVisionModel(nn.Module):
    """open_clip ``TimmModel`` layout: ``trunk`` (timm ConvNeXt) and ``head.proj`` (unused here)."""

    def __init__(
        self,
        cfg: VisionTowerConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        from timm.models.convnext import ConvNeXt

        # num_classes=0 / global_pool='' keeps head.norm (a checkpoint tensor) and nothing trainable after it
        self.trunk = ConvNeXt(
            depths=cfg.depths,
            dims=cfg.dims,
            kernel_sizes=cfg.kernel_size,
            patch_size=cfg.patch_size,
            num_classes=0,
            global_pool="",
            norm_eps=cfg.norm_eps,
            device=device,
            dtype=dtype,
        )
        if cfg.head_proj_dim is not None:
            self.head = nn.Module()
            self.head.proj = nn.Linear(cfg.dims[-1], cfg.head_proj_dim, bias=False, device=device, dtype=dtype)


class MagmaVisionTower(nn.Module):
    """``vision_tower``: pixels (N, 3, H, W) -> dense features (N, C=dims[-1], H/32, W/32)."""

    def __init__(
        self,
        cfg: VisionTowerConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.clip_vision_model = ClipVisionModel(cfg, device=device, dtype=dtype)

    @property
    def hidden_size(self) -> int:
        return self.cfg.out_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (N, 3, H, W), H and W multiples of 32 -> (N, C, H/32, W/32)
        trunk = self.clip_vision_model.trunk
        return trunk.stages(trunk.stem(pixel_values))
