"""Magma's image processor ("crop" anyres strategy), bit-identical to the official one.

Official pipeline (``magma/image_processing_magma.py``, microsoft/Magma): torchvision ``ToTensor``
(/255) and ``Normalize`` (CLIP mean/std) on the original image; pick the crop grid (rows x cols,
rows*cols <= num_crops, each cell ``base_img_size`` pixels) with LLaVA-NeXT's
``select_best_resolution`` (largest effective resolution, then least waste); bilinear resize
(``F.interpolate``, no antialias, align_corners=False) of the *normalized* tensor to the grid size;
unfold into row-major 512x512 crops.

Input images are RGB. OpenCV frames are BGR: pass ``frame[..., ::-1]`` (or set ``bgr=True``).
The official processor does not convert to RGB itself even though its config says
``do_convert_rgb`` (see MAGMA_FACTS §1.3); here grayscale (H, W) and RGBA (H, W, 4) inputs are
converted explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProcessorConfig:
    """``preprocessor_config.json`` of Magma-8B (the defaults are the released values)."""

    base_img_size: int = 512  # crop side in pixels (the tower sees 512x512 -> 16x16 features)
    num_crops: int = 4  # maximum crops (rows*cols) per image
    image_mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean of RGB in [0, 1]
    image_std: tuple[float, float, float] = CLIP_STD  # per-channel std of RGB in [0, 1]
    robot_size: int = 256  # side of the square robot frame (SimplerEnv resizes to 256x256)

    @classmethod
    def from_dict(cls, d: dict) -> ProcessorConfig:
        return cls(
            base_img_size=int(d.get("base_img_size", 512)),
            num_crops=int(d.get("num_crops", 4)),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
        )


    @classmethod
    def from_pretrained(cls, checkpoint_dir) -> ProcessorConfig:
        """Read ``preprocessor_config.json`` of a checkpoint directory (defaults when it has none)."""
        import json
        from pathlib import Path

        p = Path(checkpoint_dir) / "preprocessor_config.json"
        return cls.from_dict(json.loads(p.read_text())) if p.is_file() else cls()


DEFAULT = ProcessorConfig()


def select_best_resolution(original_size: tuple[int, int], possible: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT rule. original_size and candidates are (width, height); returns (width, height)."""
    ow, oh = original_size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in possible:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    assert best is not None
    return best


def crop_grid(width: int, height: int, num_crops: int = 4, base: int = 512) -> tuple[int, int]:
    """(rows, cols) of the crop grid the official processor picks for a width x height image."""
    pins = [(i * base, j * base) for i in range(1, num_crops + 1) for j in range(1, num_crops // i + 1)]
    w, h = select_best_resolution((width, height), pins)
    return h // base, w // base


def _to_rgb_array(image, bgr: bool = False) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 RGB (or HxW / HxWx4), got shape {a.shape}")
    a = a[:, :, :3]
    if bgr:
        a = a[:, :, ::-1]
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got {a.dtype}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image {a.shape}")
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def _normalize(a: np.ndarray, cfg: ProcessorConfig) -> torch.Tensor:
    # same ops as torchvision ToTensor + Normalize: (3, H, W) float32
    t = torch.from_numpy(a).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    return t.sub_(mean).div_(std)


def preprocess(image, cfg: ProcessorConfig = DEFAULT, bgr: bool = False) -> dict[str, torch.Tensor]:
    """One image (HxWx3 uint8 RGB numpy or PIL) or a list of them -> model inputs.

    Returns ``pixel_values`` (n_crops, 3, S, S) float32 and ``image_sizes`` (n_images, 2) long as
    (rows, cols) — the official processor's output. Feed a batch of one as
    ``pixel_values[None]`` (1, n_crops, 3, S, S) and ``image_sizes[None]`` (1, n_images, 2)
    (or use `collate`).
    """
    images = image if isinstance(image, (list, tuple)) else [image]
    crops, sizes = [], []
    s = cfg.base_img_size
    for im in images:
        a = _to_rgb_array(im, bgr=bgr)
        t = _normalize(a, cfg)  # (3, H, W)
        rows, cols = crop_grid(a.shape[1], a.shape[0], cfg.num_crops, s)
        t = torch.nn.functional.interpolate(t[None], size=(rows * s, cols * s), mode="bilinear")
        p = t.unfold(2, s, s).unfold(3, s, s)  # (1, 3, rows, cols, S, S)
        crops.append(p.permute(0, 2, 3, 1, 4, 5).reshape(rows * cols, 3, s, s))
        sizes.append((rows, cols))
    return {"pixel_values": torch.cat(crops, 0), "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def resize_robot(image, size: int = 256, bgr: bool = False) -> np.ndarray:
    """Magma's SimplerEnv robot-frame resize: ``PIL.Image.fromarray(img).resize((256, 256))`` (BICUBIC)."""
    from PIL import Image

    a = _to_rgb_array(image, bgr=bgr)
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))


def preprocess_robot(image, cfg: ProcessorConfig = DEFAULT, bgr: bool = False) -> dict[str, torch.Tensor]:
    """Robot path: RGB frame resized to 256x256 (PIL BICUBIC), then `preprocess` (1 crop, 272 tokens)."""
    return preprocess(resize_robot(image, cfg.robot_size, bgr=bgr), cfg)


_STATS_CACHE: dict = {}


def _stats(cfg: ProcessorConfig, device, dtype=torch.float32):
    key = (cfg.image_mean, cfg.image_std, str(device), dtype)
    hit = _STATS_CACHE.get(key)
    if hit is None:
        mean = torch.tensor(cfg.image_mean, dtype=dtype, device=device)[:, None, None]
        std = torch.tensor(cfg.image_std, dtype=dtype, device=device)[:, None, None]
        hit = _STATS_CACHE[key] = (mean, std)
    return hit


def preprocess_fast(image, cfg: ProcessorConfig = DEFAULT, bgr: bool = False, device=None,
                    channels_last: bool = True, defer_upsample: bool = False) -> dict[str, torch.Tensor]:
    """`preprocess` for one image, for the fast engine: the same ops with fewer copies, on ``device``.

    uint8 HWC → torch without a float copy on the host (the frame moves to ``device`` as uint8);
    ``/255``, mean and std on the small image exactly as `preprocess`; one ``F.interpolate`` to the
    crop grid; the crops are a view (1x1 grid: no copy) / one permute copy. With ``channels_last``
    the interpolation runs on an NHWC tensor and the crops come out NHWC (what the vision tower's
    convolutions prefer); values equal `preprocess` within float rounding (tested ≤ 1e-5).
    Returns ``pixel_values`` (1, n_crops, 3, S, S) float32 (already batched, as `collate` of one),
    ``image_sizes`` (1, 1, 2) long (on the host) and ``upsample`` = 1.

    ``defer_upsample``: when the resize is an exact 2x (a 1x1 grid of an image of exactly half the
    crop size: every robot frame, 256 -> 512), stop before it: ``pixel_values`` is the normalized
    (1, 1, 3, S/2, S/2) image and ``upsample`` = 2. `FastGenerator` folds that resize into the
    vision tower's stem convolution (`upsample_pixels` performs it for any other consumer).
    """
    a = _to_rgb_array(image, bgr=bgr)
    s = cfg.base_img_size
    rows, cols = crop_grid(a.shape[1], a.shape[0], cfg.num_crops, s)
    mean, std = _stats(cfg, device)
    t = torch.from_numpy(a).to(device)  # (H, W, 3) uint8
    mf = torch.channels_last if channels_last else torch.contiguous_format
    t = t.permute(2, 0, 1)[None].to(torch.float32, memory_format=mf)  # (1, 3, H, W)
    t = t.div_(255).sub_(mean).div_(std)  # ToTensor + Normalize, same ops
    if defer_upsample and rows * cols == 1 and 2 * a.shape[0] == s and 2 * a.shape[1] == s:
        return {"pixel_values": t[None], "image_sizes": torch.tensor([[[1, 1]]], dtype=torch.long), "upsample": 2}
    t = torch.nn.functional.interpolate(t, size=(rows * s, cols * s), mode="bilinear")
    if rows * cols == 1:
        pv = t[None]  # (1, 1, 3, S, S) view
    else:
        pv = (t.view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, S, S)
              .reshape(rows * cols, 3, s, s).contiguous(memory_format=mf))[None]
    return {"pixel_values": pv, "image_sizes": torch.tensor([[[rows, cols]]], dtype=torch.long), "upsample": 1}


def preprocess_robot_fast(image, cfg: ProcessorConfig = DEFAULT, bgr: bool = False, device=None,
                          channels_last: bool = True, defer_upsample: bool = False) -> dict[str, torch.Tensor]:
    """`preprocess_robot` through `preprocess_fast` (the 256x256 PIL BICUBIC resize is kept: it is
    part of the reference semantics). ``defer_upsample``: see `preprocess_fast` (a robot frame is
    always the 2x case)."""
    return preprocess_fast(resize_robot(image, cfg.robot_size, bgr=bgr), cfg, device=device,
                           channels_last=channels_last, defer_upsample=defer_upsample)


def upsample_pixels(pixel_values: torch.Tensor, factor: int) -> torch.Tensor:
    """Finish a deferred resize (`preprocess_fast` with ``defer_upsample``): (B, 1, 3, h, w) ->
    (B, 1, 3, factor*h, factor*w) with the official processor's bilinear ``F.interpolate``."""
    if factor == 1:
        return pixel_values
    if pixel_values.dim() != 5 or pixel_values.shape[1] != 1:
        raise ValueError(f"a deferred resize needs (B, 1, 3, h, w) pixel values, got {tuple(pixel_values.shape)}")
    h, w = pixel_values.shape[-2:]
    up = torch.nn.functional.interpolate(pixel_values[:, 0], size=(factor * h, factor * w), mode="bilinear")
    return up[:, None]


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch `preprocess` outputs: pixel_values (B, max_crops, 3, S, S) and image_sizes (B, max_images, 2).

    Missing crops and images are zero-padded (the model ignores all-zero image_sizes rows and the
    crops past each sample's own count), as the official forward expects.
    """
    nc = max(s["pixel_values"].shape[0] for s in samples)
    ni = max(s["image_sizes"].shape[0] for s in samples)
    pv = samples[0]["pixel_values"]
    out_p = pv.new_zeros((len(samples), nc) + tuple(pv.shape[1:]))
    out_s = torch.zeros((len(samples), ni, 2), dtype=torch.long)
    for i, s in enumerate(samples):
        out_p[i, : s["pixel_values"].shape[0]] = s["pixel_values"]
        out_s[i, : s["image_sizes"].shape[0]] = s["image_sizes"]
    return {"pixel_values": out_p, "image_sizes": out_s}


def num_image_tokens(image_sizes, crop_tokens: int = 16, row_separator: bool = True) -> int:
    """Embeddings one image of grid (rows, cols) becomes: rows*16 * (cols*16 + 1) (272 for 1x1)."""
    rows, cols = (int(x) for x in image_sizes)
    return rows * crop_tokens * (cols * crop_tokens + (1 if row_separator else 0))
