"""Weight-only quantization of Magma's language model (int8 and 4-bit), from the normal checkpoint.

``quantize_language_model(lm, "int8" | "int4", backend="auto")`` replaces the weights of every
``nn.Linear`` in the Llama decoder and ``lm_head`` in place (embeddings, norms, the vision tower and
the projector stay in the checkpoint's dtype) and returns the backend it used. Both the fast path
(``FastGenerator``) and the plain ``generate`` path then run the same quantized weights.

Backends and why each is the default where it is (docs/performance.md has the measurements):

* ``native`` int8 — :class:`Int8Linear`, symmetric per-output-channel scales (gpt-fast's
  ``WeightOnlyInt8Linear``): ``F.linear(x, W_int8.to(x.dtype)) * scale``. Under ``torch.compile``
  the dequantization fuses into the matmul (GPU). It is the CPU default, being the fastest int8
  option there (2048×1024 layer, 1 row: fp32 1.4 ms, native 1.5 ms, torchao 0.18
  ``Int8WeightOnlyConfig`` 7.8 ms, ``torch._weight_int8pack_mm`` 5.1 ms), but a whole CPU step in
  int8 is slower than fp32 (every call dequantizes): on CPU quantize to save memory only.
* ``torchao`` int8 / int4 — ``Int8WeightOnlyConfig`` and ``Int4WeightOnlyConfig`` with the tinygemm
  ``tile_packed_to_4d`` layout (bf16, CUDA only): the CUDA default when torchao imports.
* ``bnb`` int4 — bitsandbytes NF4 ``Linear4bit`` (CUDA fallback when torchao is missing; on CPU
  it works but is ~20× slower than fp32 here, so it is never chosen there automatically).
* ``native`` int4 — :class:`Int4Linear`, asymmetric 4-bit with per-group scale/zero (group 128,
  two values per byte), dequantized per call: the portable reference (CPU tests), not a fast path.

Memory: a layer is quantized right after it is moved to ``device``, so a CPU-loaded bf16 model
quantized onto a GPU never holds more than one full-precision layer there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Int4Linear", "Int8Linear", "available_backends", "backend_candidates", "language_model_linears",
           "pick_backend", "quantize_language_model", "quantize_linear", "quantize_linear_auto"]

MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """Weight-only int8 linear: W ≈ W_int8 · scale[:, None], per output channel, symmetric."""

    def __init__(self, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight_int8)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) in the compute dtype
        self.bias = bias
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        w = lin.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if lin.bias is None else lin.bias.detach()
        return cls(q, scale.to(lin.weight.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in) → (..., out)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """Weight-only 4-bit linear: asymmetric, per (output row, group of ``group_size`` inputs)."""

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor, in_features: int, group_size: int,
                 bias: Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed)  # (out, in/2) uint8, two 4-bit values per byte
        self.register_buffer("scale", scale)  # (out, in/g)
        self.register_buffer("zero", zero)  # (out, in/g) the float value of code 0
        self.in_features, self.out_features, self.group_size = in_features, packed.shape[0], group_size
        self.bias = bias

    @property
    def weight(self) -> Tensor:
        """The packed codes (uint8): lets code that reads ``lm_head.weight.device`` keep working."""
        return self.packed

    @staticmethod
    def pick_group(in_features: int, group_size: int = 128) -> int:
        g = min(group_size, in_features)
        while in_features % g:
            g //= 2
        return max(g, 1)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 128) -> Int4Linear:
        w = lin.weight.detach().float()  # (out, in)
        out_f, in_f = w.shape
        if in_f % 2:
            raise ValueError(f"Int4Linear needs an even in_features, got {in_f}")
        g = cls.pick_group(in_f, group_size)
        wg = w.view(out_f, in_f // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)  # (out, in/g)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.view(out_f, in_f)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in/2)
        bias = None if lin.bias is None else lin.bias.detach()
        dt = lin.weight.dtype
        return cls(packed, scale.to(dt), lo.to(dt), in_f, g, bias)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        n = self.out_features
        q = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).view(n, -1)  # (out, in)
        q = q.view(n, -1, self.group_size).to(dtype)  # (out, in/g, g)
        return (q * self.scale.to(dtype)[..., None] + self.zero.to(dtype)[..., None]).view(n, -1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g={self.group_size}"


def available_backends() -> list[str]:
    """Backends importable here (``native`` always)."""
    out = ["native"]
    try:
        import torchao.quantization  # noqa: F401

        out.append("torchao")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pass
    try:
        import bitsandbytes  # noqa: F401

        out.append("bnb")
    except Exception:  # noqa: BLE001
        pass
    return out


def backend_candidates(mode: str, device: torch.device | str) -> list[str]:
    """Backends ``backend='auto'`` tries for ``mode`` on ``device``, best first."""
    if torch.device(device).type != "cuda":
        return ["native"]  # measured fastest on CPU; the others are not even imported
    have = available_backends()
    order = ["torchao", "bnb", "native"] if mode == "int4" else ["torchao", "native"]
    return [b for b in order if b in have]


def pick_backend(mode: str, device: torch.device | str) -> str:
    """The backend ``backend='auto'`` prefers for ``mode`` on ``device``."""
    return backend_candidates(mode, device)[0]


def quantize_linear_auto(lin: nn.Linear, mode: str, backend: str = "auto") -> tuple[nn.Module, str]:
    """Quantize one layer with ``backend``, or with the first ``auto`` candidate that works here."""
    if backend != "auto":
        return quantize_linear(lin, mode, backend), backend
    errors = []
    for b in backend_candidates(mode, lin.weight.device):
        try:
            return quantize_linear(lin, mode, b), b
        except Exception as e:  # noqa: BLE001 - a backend that fails here is skipped, and said so
            errors.append(f"{b}: {type(e).__name__}: {e}")
    raise RuntimeError(f"no quantization backend worked for {mode}: " + "; ".join(errors))


def language_model_linears(lm: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) for every Linear of the decoder layers and lm_head."""
    out = []
    for parent in [*lm.model.layers.modules(), lm]:
        for name, child in parent.named_children():
            if type(child) is nn.Linear and (parent is not lm or name == "lm_head"):
                out.append((parent, name, child))
    return out


def quantize_linear(lin: nn.Linear, mode: str, backend: str = "native") -> nn.Module:
    """One ``nn.Linear`` → its quantized replacement (on the Linear's device)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(MODES)}")
    if backend == "native":
        return Int8Linear.from_linear(lin) if mode == "int8" else Int4Linear.from_linear(lin)
    if backend == "torchao":
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        if mode == "int8":
            cfg = Int8WeightOnlyConfig()
        else:
            if lin.weight.device.type != "cuda" or lin.weight.dtype != torch.bfloat16:
                raise ValueError("torchao int4 (tinygemm) needs a bf16 model on CUDA; "
                                 "use backend='native' here")
            cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        wrapper = nn.Sequential(lin)
        quantize_(wrapper, cfg)
        return wrapper[0]
    if backend == "bnb":
        import bitsandbytes as bnb

        dev = lin.weight.device
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(lin.weight.detach().cpu(), requires_grad=False,
                                         has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=lin.weight.dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().cpu(), requires_grad=False)
        return q.to(dev)
    raise ValueError(f"unknown quantization backend {backend!r}; choose from auto, native, torchao, bnb")


@torch.no_grad()
def quantize_language_model(lm: nn.Module, mode: str, backend: str = "auto",
                            device: torch.device | str | None = None) -> str:
    """Quantize ``lm`` (a ``LlamaForCausalLM``) in place; returns the backend used.

    mode: "int8" (weight-only, per-channel) or "int4" (weight-only, grouped). backend: "auto"
    (CUDA: torchao, else bitsandbytes for int4; CPU: native), "native", "torchao" or "bnb".
    device: move each layer there just before quantizing it (peak memory = quantized model + one
    layer); None keeps the model where it is. The rest of ``lm`` (embeddings, norms, rotary) is
    moved too when ``device`` is given.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(MODES)}")
    dev = torch.device(device) if device is not None else lm.lm_head.weight.device
    chosen = backend
    for parent, name, lin in language_model_linears(lm):
        if device is not None:
            lin = lin.to(dev)
        q, chosen = quantize_linear_auto(lin, mode, chosen)  # "auto" settles on the first layer
        setattr(parent, name, q)
        del lin
    if device is not None:
        lm.to(dev)
    lm.magma_quantization = f"{mode}/{chosen}"
    return chosen
