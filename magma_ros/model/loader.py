"""Load a Hugging Face-format Magma checkpoint (as published) into `MagmaModel`, memory-lean.

* ``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` with shards; never
  pickle (``*.bin`` checkpoints are refused).
* The model is built on the meta device, every checkpoint shape is checked against it from the
  safetensors headers first (one error lists all missing / unexpected / mis-shaped names), then each
  shard's tensors are assigned in place (``load_state_dict(assign=True)``): host RAM stays about the
  size of the weights in the requested dtype.
* The checkpoint's own names are used, including ConvNeXt ``gamma`` (no transformers renaming); a
  copy whose ``gamma`` was renamed to ``weight`` by old transformers is read too.
* A path that is not a local directory is taken as a hub id and fetched with
  ``huggingface_hub.snapshot_download`` (configs, tokenizer files and safetensors only).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from magma_ros.core.errors import ConfigError
from magma_ros.model.magma import MagmaConfig, MagmaModel
from magma_ros.model.vision import VisionTowerConfig

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
# parameters the official projector defines when vision_config.mm_use_im_start_end is set; its
# forward never uses them, so a checkpoint may or may not carry them
OPTIONAL_KEYS = ("multi_modal_projector.img_start_seperator", "multi_modal_projector.img_end_seperator")
_GAMMA_AS_WEIGHT = re.compile(r"^(vision_tower\.clip_vision_model\.trunk\.stages\.\d+\.blocks\.\d+)\.weight$")


class CheckpointError(ConfigError):
    """The checkpoint does not match the model its config.json describes."""


def resolve_checkpoint(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """Local directory as is; otherwise a hub id downloaded with huggingface_hub (needs network)."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_hub_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise ConfigError(f"checkpoint '{s}' is neither a local directory nor a hub id like 'microsoft/Magma-8B'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=s, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one clear line
        raise ConfigError(
            f"cannot fetch '{s}' from the Hugging Face hub ({type(e).__name__}: {e}); "
            "pass a local checkpoint directory instead"
        ) from e


def checkpoint_files(ckpt: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> safetensors file holding it."""
    if (ckpt / INDEX_FILE).is_file():
        with open(ckpt / INDEX_FILE) as f:
            wm = json.load(f)["weight_map"]
        return {k: ckpt / v for k, v in wm.items()}
    if (ckpt / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(ckpt / SINGLE_FILE), framework="pt") as f:
            return {k: ckpt / SINGLE_FILE for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if list(ckpt.glob("*.bin")) or list(ckpt.glob("*.pt")):
        raise ConfigError(f"{ckpt} holds only pickle weights (*.bin/*.pt); convert them to safetensors first")
    raise ConfigError(f"{ckpt} has no {SINGLE_FILE} or {INDEX_FILE}")


def read_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers only (no data is read)."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                if files.get(k) == path:
                    out[k] = tuple(f.get_slice(k).get_shape())
    return out


def _model_name(ckpt_name: str, expected: dict) -> str:
    if ckpt_name not in expected:
        m = _GAMMA_AS_WEIGHT.match(ckpt_name)
        if m and m.group(1) + ".gamma" in expected:
            return m.group(1) + ".gamma"
    return ckpt_name


def _check(expected: dict[str, tuple], got: dict[str, tuple], cfg: MagmaConfig, ckpt: Path) -> None:
    missing = sorted(k for k in expected if k not in got and not k.startswith(OPTIONAL_KEYS))
    unexpected = sorted(k for k in got if k not in expected and not k.startswith(OPTIONAL_KEYS))
    shaped = sorted(
        f"{k}: checkpoint {list(got[k])} vs model {list(expected[k])}"
        for k in got
        if k in expected and tuple(got[k]) != tuple(expected[k])
    )
    if not (missing or unexpected or shaped):
        return

    def show(name, items):
        more = f" … (+{len(items) - 8} more)" if len(items) > 8 else ""
        return f"\n  {name} ({len(items)}): " + "; ".join(items[:8]) + more if items else ""

    hint = ""
    emb = got.get("language_model.model.embed_tokens.weight")
    if emb is not None and emb[0] != cfg.vocab_size:
        hint = f"\n  hint: config.json vocab_size is {cfg.vocab_size} but embed_tokens has {emb[0]} rows"
    raise CheckpointError(
        f"checkpoint {ckpt} does not match its config.json:"
        + show("missing", missing)
        + show("unexpected", unexpected)
        + show("mis-shaped", shaped)
        + hint
    )


def _device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load_magma(
    path_or_hub_id: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    progress: bool = True,
    revision: str | None = None,
) -> MagmaModel:
    """Build `MagmaModel` from a checkpoint directory or hub id; eval mode, no grad, on ``device``."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    ckpt = resolve_checkpoint(path_or_hub_id, revision)
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"{ckpt} has no config.json (not a Hugging Face-format Magma checkpoint)")
    cfg = MagmaConfig.from_file(ckpt / "config.json", attn_implementation=attn_implementation)
    files = checkpoint_files(ckpt)
    shapes = read_shapes(files)
    try:
        cfg.vision = VisionTowerConfig.from_shapes(shapes)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from e
    if "mm_hidden_size" not in (cfg.raw.get("vision_config") or {}):
        cfg.mm_hidden_size = cfg.vision.out_channels  # the official tower's hidden_size: last trunk width
    dev = _device(device)
    model = MagmaModel(cfg, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = {k: _model_name(k, expected) for k in shapes}
    _check(expected, {renamed[k]: s for k, s in shapes.items()}, cfg, ckpt)

    by_file: dict[Path, list[str]] = {}
    for k, p in files.items():
        if renamed[k] in expected:
            by_file.setdefault(p, []).append(k)
    shards = sorted(by_file)
    for path in tqdm(shards, desc="Loading Magma shards", unit="shard", disable=not progress or len(shards) < 2):
        with safe_open(str(path), framework="pt", device=str(dev)) as f:
            sd = {renamed[k]: f.get_tensor(k).to(dtype) for k in by_file[path]}
        model.load_state_dict(sd, strict=False, assign=True)
        del sd
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            if name.startswith(OPTIONAL_KEYS):  # unused separators absent from the checkpoint
                mod_name, _, attr = name.rpartition(".")
                setattr(
                    model.get_submodule(mod_name),
                    attr,
                    torch.nn.Parameter(torch.zeros(p.shape, dtype=dtype, device=dev)),
                )
            else:  # pragma: no cover - _check guarantees this
                raise CheckpointError(f"{name} was not loaded from {ckpt}")
    model.reset_rotary(dev)
    model.requires_grad_(False)
    model.eval()
    model.checkpoint_dir = ckpt
    return model
