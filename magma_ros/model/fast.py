"""Fast Magma generation: a static KV cache and plain ``prefill`` / ``decode_one_token`` functions.

The structure follows gpt-fast (``generate.py``): the language model's weights are read straight
out of transformers' ``LlamaForCausalLM`` and run by the small functions below (own RMSNorm, RoPE,
GQA attention through ``F.scaled_dot_product_attention``), over a KV cache that is allocated once.
One Magma policy step is

    preprocess → vision tower + projector → merged embeddings        (``model.prepare_inputs_embeds``)
    prefill(rest of the prompt)        one pass over ~300 positions  (the constant prefix is cached)
    decode_one_token × (n − 1)         greedy argmax on the device   (no host sync until the end)

Faithful by default: greedy, stops a row at EOS and pads it afterwards exactly as transformers'
``generate`` does, so the tokens equal ``MagmaModel.generate_plain`` (checked on the fixture in
``test/model/test_fast.py``). ``allowed_token_ids`` restricts the argmax (constrained mode);
``sampling`` draws tokens instead (:class:`Sampling`, e.g. Magma's evaluation-time T = 0.7, top-k 50).

Cache layout (slots of the static cache, per batch row)::

    [0, P)          the constant prompt prefix (system prompt + user header up to the first <image>),
                    positions 0..P-1, computed once per distinct prefix and copied in
    [P, P+T)        the rest of the prompt, left-padded (pad slots masked out), positions P..
    [P+T, P+T+n)    generated tokens

Attention is order-invariant over keys once masks and RoPE (applied before caching) are right, so
moving the left padding behind the shared prefix changes nothing but lets every row share it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastGenerator", "Sampling", "decode_one_token", "merge_one_image_per_row", "prefill"]


# ----------------------------------------------------------------------------------------------
# Weights: a flat view of the Llama decoder that the plain functions below read.
# ----------------------------------------------------------------------------------------------

def _w(linear: nn.Module):
    """A linear layer as the engine calls it: its weight tensor when it is a plain bias-free Linear
    (``F.linear``), else the module itself (quantized layers keep their own forward)."""
    if type(linear) is nn.Linear and linear.bias is None:
        return linear.weight
    return linear


def linear(x: Tensor, w) -> Tensor:
    return F.linear(x, w) if isinstance(w, Tensor) else w(x)


@dataclass
class LayerWeights:
    """One decoder layer's weights (shapes for Magma-8B: H=4096, nh=32, kvh=8, D=128, I=14336)."""

    ln1: Tensor  # (H,) input RMSNorm
    q: object  # (nh*D, H)
    k: object  # (kvh*D, H)
    v: object  # (kvh*D, H)
    o: object  # (H, nh*D)
    ln2: Tensor  # (H,) post-attention RMSNorm
    gate: object  # (I, H)
    up: object  # (I, H)
    down: object  # (H, I)
    qkv: Tensor | None = None  # (nh*D + 2*kvh*D, H) fused copy of q/k/v (small CPU models only)
    gate_up: Tensor | None = None  # (2*I, H) fused copy of gate/up (small CPU models only)


class Engine(nn.Module):
    """The language model's weights plus the static KV cache and RoPE tables (all device-resident).

    Caches are registered buffers (and marked static) so ``torch.compile(mode="reduce-overhead")``
    can capture ``decode_one_token`` in a CUDA graph while it writes into them.
    """

    def __init__(self, lm: nn.Module, max_batch: int, max_seq_len: int, lm_head_t: bool = True,
                 fuse: bool = True):
        super().__init__()
        cfg = lm.config
        dec = lm.model
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        if cfg.hidden_act != "silu":
            raise ValueError(f"FastGenerator supports Llama's silu MLP, not hidden_act={cfg.hidden_act!r}")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise ValueError("FastGenerator supports bias-free Llama layers only")
        self.embed = dec.embed_tokens.weight  # (V, H)
        self.norm = dec.norm.weight  # (H,)
        self.lm_head = _w(lm.lm_head)  # (V, H)
        # CPU: a (H, V) copy of a small lm_head makes the 1-row head a GEMM with contiguous rows
        # (x @ W^T through a pre-transposed weight: ~2.5x faster than F.linear's transposed GEMV
        # for the tiny checkpoint's 128k x 16 head; same values within float rounding)
        self.lm_head_t = None
        w = self.lm_head
        if (lm_head_t and isinstance(w, Tensor) and w.device.type == "cpu"
                and w.numel() * w.element_size() <= 256 * 2**20):
            self.lm_head_t = w.detach().t().contiguous()  # (H, V)
        self.layers = [
            LayerWeights(
                ln1=layer.input_layernorm.weight, q=_w(layer.self_attn.q_proj), k=_w(layer.self_attn.k_proj),
                v=_w(layer.self_attn.v_proj), o=_w(layer.self_attn.o_proj),
                ln2=layer.post_attention_layernorm.weight, gate=_w(layer.mlp.gate_proj),
                up=_w(layer.mlp.up_proj), down=_w(layer.mlp.down_proj))
            for layer in dec.layers
        ]
        # CPU, small decoder: q/k/v and gate/up as one matmul each (fewer ops per step; a copy of
        # those weights, so only when they are plain tensors and small)
        if fuse and self.embed.device.type == "cpu":
            for lw in self.layers:
                qkv, gu = (lw.q, lw.k, lw.v), (lw.gate, lw.up)
                if all(isinstance(t, Tensor) for t in qkv + gu) and \
                        sum(t.numel() * t.element_size() for t in qkv + gu) <= 64 * 2**20:
                    lw.qkv = torch.cat([t.detach() for t in qkv], 0)
                    lw.gate_up = torch.cat([t.detach() for t in gu], 0)
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        # RoPE exactly as transformers computes it (its inv_freq already holds llama3 / linear / ...
        # scaling from config.rope_parameters): cos/sin = cat(f, f) * attention_scaling, f = pos * inv_freq.
        rot = dec.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float().to(self.device)  # (D/2,)
        self.attention_scaling = float(rot.attention_scaling)
        self.max_batch = 0
        self.max_seq_len = 0
        self.allocate(max_batch, max_seq_len)

    def parameters_and_caches(self) -> list[Tensor]:
        """Every plain tensor the step functions read (quantized modules excluded)."""
        ts = [self.embed, self.norm, self.lm_head, self.lm_head_t, self.k_cache, self.v_cache, self.valid,
              self.cos, self.sin]
        for lw in self.layers:
            ts += [getattr(lw, f) for f in ("ln1", "q", "k", "v", "o", "ln2", "gate", "up", "down", "qkv",
                                            "gate_up")]
        return [t for t in ts if type(t) in (Tensor, nn.Parameter)]

    def allocate(self, max_batch: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache for ``max_batch`` rows × ``max_seq_len`` slots and the RoPE table."""
        shape = (self.n_layers, max_batch, self.n_kv, max_seq_len, self.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        self.register_buffer("k_cache", torch.zeros(shape, **kw), persistent=False)  # (Lyr, B, kvh, S, D)
        self.register_buffer("v_cache", torch.zeros(shape, **kw), persistent=False)
        self.layer_caches = [(self.k_cache[i], self.v_cache[i]) for i in range(self.n_layers)]  # views
        valid = torch.zeros(max_batch, max_seq_len, dtype=torch.bool, device=self.device)  # (B, S)
        self.register_buffer("valid", valid, persistent=False)
        pos = torch.arange(max_seq_len, device=self.device)
        freqs = pos[:, None].float() * self.inv_freq  # (S, D/2) float32, as transformers
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
        sin = emb.sin() * self.attention_scaling
        sin[:, : sin.shape[1] // 2].neg_()  # sin_signed = cat(-sin1, sin2), see apply_rope
        self.register_buffer("cos", (emb.cos() * self.attention_scaling).to(self.dtype), persistent=False)
        self.register_buffer("sin", sin.to(self.dtype), persistent=False)  # (S, D) signed
        if hasattr(torch, "_dynamo"):
            for t in (self.k_cache, self.v_cache, self.valid):
                torch._dynamo.mark_static_address(t)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len


# ----------------------------------------------------------------------------------------------
# The model, as plain functions.
# ----------------------------------------------------------------------------------------------

def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    # x: (..., H) — normalized in float32 and cast back before the weight, as LlamaRMSNorm (one fused
    # kernel instead of pow/mean/add/rsqrt/mul; in float32 the casts are no-ops and the weight goes
    # into the same kernel)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    # x: (B, T, heads, D); cos, sin_signed: (B, T, 1, D) → broadcast over heads.
    # Llama's x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1): the same as
    # roll(x, D/2)*cat(-sin1, sin2) = roll(x, D/2)*sin_signed, in three kernels instead of six
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def layer_forward(e: Engine, i: int, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, kv_len: int,
                  mask: Tensor | None, B: int) -> Tensor:
    # x: (B, T, H); cos/sin: (B, T, 1, D); slots: (T,) cache slots written;
    # mask: (B, 1, T, kv_len) additive float (0 / -inf) or None
    lw = e.layers[i]
    T, nq, nk, D = x.shape[1], e.n_heads, e.n_kv, e.head_dim
    h = rms_norm(x, lw.ln1, e.eps)
    if lw.qkv is not None:
        qkv = F.linear(h, lw.qkv).view(B, T, nq + 2 * nk, D)  # one matmul, RoPE on q and k at once
        qk = apply_rope(qkv[:, :, :nq + nk], cos, sin)  # (B, T, nq+nk, D)
        q, k, v = qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nk:]
    else:
        q = apply_rope(linear(h, lw.q).view(B, T, nq, D), cos, sin)
        k = apply_rope(linear(h, lw.k).view(B, T, nk, D), cos, sin)
        v = linear(h, lw.v).view(B, T, nk, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    k_cache, v_cache = e.layer_caches[i]  # (max_batch, kvh, S, D) views
    if B != e.max_batch:
        k_cache, v_cache = k_cache[:B], v_cache[:B]
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    a = F.scaled_dot_product_attention(  # (B, nh, T, D)
        q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask, scale=e.scaling,
        enable_gqa=nq != nk)
    x = x + linear(a.transpose(1, 2).reshape(B, T, nq * D), lw.o)
    h = rms_norm(x, lw.ln2, e.eps)
    if lw.gate_up is not None:
        g, u = F.linear(h, lw.gate_up).chunk(2, -1)
        return x + linear(F.silu(g) * u, lw.down)
    return x + linear(F.silu(linear(h, lw.gate)) * linear(h, lw.up), lw.down)


def forward_tokens(e: Engine, x: Tensor, pos: Tensor, slots: Tensor, kv_len: int,
                   mask: Tensor | None) -> Tensor:
    # x: (B, T, H) input embeddings; pos: (B, T) RoPE positions → logits of the LAST position (B, V) float32
    B = x.shape[0]
    cos, sin = e.cos[pos][:, :, None], e.sin[pos][:, :, None]  # (B, T, 1, D)
    for i in range(e.n_layers):
        x = layer_forward(e, i, x, cos, sin, slots, kv_len, mask, B)
    h = rms_norm(x[:, -1], e.norm, e.eps)  # (B, H)
    logits = torch.mm(h, e.lm_head_t) if e.lm_head_t is not None else linear(h, e.lm_head)  # (B, V)
    return logits if logits.dtype == torch.float32 else logits.float()


def prefill(e: Engine, embeds: Tensor, pos: Tensor, start: int, mask: Tensor | None) -> Tensor:
    """Run the prompt through the model, filling cache slots ``[start, start+T)``.

    embeds: (B, T, H); pos: (B, T) positions; mask: (B, 1, T, start+T) bool (None = plain causal,
    only valid when start == 0 and no row is padded). Returns last-position logits (B, V) float32.
    """
    T = embeds.shape[1]
    slots = torch.arange(start, start + T, device=embeds.device)  # (T,)
    if mask is None:
        # no padding and no prefix: causal over [0, T) — built explicitly (sdpa is_causal would
        # also work, but an explicit mask keeps one code path for every case)
        mask = torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()[None, None]
    return forward_tokens(e, embeds, pos, slots, start + T, additive_mask(mask, e.dtype))


def decode_one_token(e: Engine, tok: Tensor, pos: Tensor, slot: Tensor, kv_len: int,
                     mask: Tensor | None) -> Tensor:
    """One greedy step's forward: tok (B,) at positions pos (B,), written to cache slot ``slot`` (1,).

    mask: (B, 1, 1, kv_len) bool or additive float over cache slots (None: every slot < kv_len is
    valid). Returns logits (B, V) float32.
    """
    x = F.embedding(tok[:, None], e.embed)  # (B, 1, H)
    return forward_tokens(e, x, pos[:, None], slot, kv_len, mask)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool attention mask (True = attend) as the 0 / -inf float mask SDPA adds to the scores.

    Made once per forward instead of once per layer (SDPA converts a bool mask on every call).
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def argmax(x: Tensor) -> Tensor:
    # (B, V) → (B,) long. On the CPU numpy's argmax (same rule: the first maximum, NaN counts as the
    # maximum) is ~7x faster than torch's over a 128k vocabulary (0.02 vs 0.15 ms); CPU tensors
    # share memory with numpy, so this is no host sync.
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return torch.from_numpy(np.argmax(x.numpy(), -1))
    return x.argmax(-1)


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax(logits / temperature) over the ``top_k`` largest logits.

    Magma's SimplerEnv / LIBERO evaluation generated with ``do_sample=True, temperature=0.7`` under
    transformers 4.44, whose default ``top_k`` for sampling was 50 (MAGMA_FACTS §1.4) — so
    ``Sampling(0.7, 50)`` is that evaluation's decoding. ``top_k`` None or 0: no top-k cut.
    """

    temperature: float
    top_k: int | None = 50
    generator: torch.Generator | None = None  # on the logits' device; None: torch's default one

    def __post_init__(self):
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be > 0 and finite for sampling, got {self.temperature}")
        if self.top_k is not None and int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: off), got {self.top_k}")

    def perturb(self, logits: Tensor) -> Tensor:
        """(B, V) float32 logits → scores whose argmax is one sample (the Gumbel-max trick).

        argmax(logits/T + G), G = -log(-log(U)), U ~ U(0, 1), is an exact draw from
        softmax(logits/T): no host sync, no cumulative sums, and a 0/-inf constraint bias added
        before it keeps its meaning (a -inf logit is never drawn). The top-k cut is transformers'
        ``TopKLogitsWarper`` (ties at the k-th value are kept).
        """
        x = logits / self.temperature
        k = int(self.top_k or 0)
        if 0 < k < x.shape[-1]:
            kth = torch.topk(x, k, dim=-1).values[..., -1:]  # (B, 1)
            x = x.masked_fill(x < kth, float("-inf"))
        u = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x - torch.log(-torch.log(u))


def pick(logits: Tensor, bias: Tensor | None, finished: Tensor, eos: Tensor, pad: int,
         sampling: Sampling | None = None) -> Tensor:
    # logits: (B, V) float32; bias: (V,) 0 / -inf or None; finished: (B,) bool, updated in place;
    # sampling: None = greedy
    if bias is not None:
        logits = logits + bias
    if sampling is not None:
        logits = sampling.perturb(logits)
    tok = argmax(logits).masked_fill_(finished, pad)  # (B,); rows past EOS emit pad, as generate
    finished |= (tok == eos) if eos.numel() == 1 else torch.isin(tok, eos)
    return tok


# ----------------------------------------------------------------------------------------------
# The vision tower (timm ConvNeXt trunk) in NHWC, without the layout round trips.
# ----------------------------------------------------------------------------------------------

def _ln(x: Tensor, m: nn.Module) -> Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def convnext_nhwc_supported(trunk: nn.Module) -> bool:
    """Whether :func:`convnext_forward_nhwc` covers this trunk (open_clip / Magma ConvNeXt layout)."""
    try:
        from timm.layers import LayerNorm, LayerNorm2d
        from timm.layers.activations import GELU as TimmGELU
        from timm.models.convnext import ConvNeXtBlock
    except ImportError:
        return False
    stem = getattr(trunk, "stem", None)
    if not (isinstance(stem, nn.Sequential) and len(stem) == 2 and type(stem[0]) is nn.Conv2d
            and type(stem[1]) is LayerNorm2d and isinstance(getattr(trunk, "stages", None), nn.Sequential)):
        return False
    for st in trunk.stages:
        ds = st.downsample
        if not (isinstance(ds, nn.Identity) or (isinstance(ds, nn.Sequential) and len(ds) == 2
                                                 and type(ds[0]) is LayerNorm2d and type(ds[1]) is nn.Conv2d)):
            return False
        for b in st.blocks:
            if not (type(b) is ConvNeXtBlock and not b.use_conv_mlp and type(b.norm) is LayerNorm
                    and type(b.conv_dw) is nn.Conv2d and isinstance(b.shortcut, nn.Identity)
                    and isinstance(b.drop_path, nn.Identity) and isinstance(b.mlp.norm, nn.Identity)
                    and type(b.mlp.fc1) is nn.Linear and type(b.mlp.fc2) is nn.Linear
                    and (type(b.mlp.act) is TimmGELU
                         or (type(b.mlp.act) is nn.GELU and b.mlp.act.approximate == "none"))
                    and isinstance(b.mlp.drop1, nn.Dropout | nn.Identity)):
                return False
    return True


def upsample2x_stem_weight(stem: nn.Conv2d) -> Tensor:
    """The stem convolution with the official processor's 2x bilinear resize folded in.

    The stem is a p x p / stride-p patchify (p = 4) on the 2x-resized image. ``F.interpolate``
    (bilinear, align_corners=False, exact 2x) makes up-sampled row 2k from 0.25 x[k-1] + 0.75 x[k]
    and row 2k+1 from 0.75 x[k] + 0.25 x[k+1], clamped at the borders. The p up-sampled rows of one
    patch therefore come from p/2 + 2 source rows through a fixed (p, p/2+2) matrix A, so

        stem(resize2x(x)) == conv(replicate_pad(x, 1), A^T W A, stride = p/2)

    in exact arithmetic (the clamping is the replicate padding). Same bias. The 512x512 image is
    never made: one small convolution replaces the resize and the large one.
    stem.weight: (C, 3, p, p) → (C, 3, p/2+2, p/2+2).
    """
    p = stem.kernel_size[0]
    A = torch.zeros(p, p // 2 + 2, dtype=torch.float64)  # up-sampled row u ← padded source rows
    for u in range(p):
        k = u // 2
        if u % 2 == 0:
            A[u, k], A[u, k + 1] = 0.25, 0.75
        else:
            A[u, k + 1], A[u, k + 2] = 0.75, 0.25
    w = stem.weight.detach()
    folded = torch.einsum("uk,ocuv,vl->ockl", A, w.double().cpu(), A)
    return folded.to(device=w.device, dtype=w.dtype)


def stem_upsample2x_supported(stem: nn.Module) -> bool:
    """Whether :func:`upsample2x_stem_weight` applies (a square, even, patchify stem without padding)."""
    return (type(stem) is nn.Conv2d and stem.kernel_size[0] == stem.kernel_size[1] == stem.stride[0]
            == stem.stride[1] and stem.kernel_size[0] % 2 == 0 and tuple(stem.padding) == (0, 0)
            and tuple(stem.dilation) == (1, 1) and stem.groups == 1 and stem.padding_mode == "zeros")


def convnext_forward_nhwc(trunk: nn.Module, x: Tensor, stem_2x: Tensor | None = None) -> Tensor:
    """``trunk.stages(trunk.stem(x))`` (eval) as NHWC: x (N, 3, H, W) → features (N, h, w, C).

    The same ops as timm's ConvNeXt blocks (conv_dw → LayerNorm → fc1 → GELU → fc2 → gamma →
    + shortcut), but the convolutions run on channels_last tensors, so every ``permute`` between
    NCHW convolutions and NHWC LayerNorm/MLP is a free view instead of a copy, and the layer-scale
    multiply and residual add are in place. Values equal the module's within float rounding
    (different convolution kernels for NHWC); tokens are tested equal to the plain path.

    ``stem_2x`` (from :func:`upsample2x_stem_weight`): ``x`` is the normalized image at half the
    crop size and the processor's exact 2x bilinear resize happens inside the stem convolution.
    """
    stem = trunk.stem
    if stem_2x is not None:
        s = stem_2x.shape[-1] - 2  # = p/2
        xp = F.pad(x, (1, 1, 1, 1), mode="replicate").contiguous(memory_format=torch.channels_last)
        h = F.conv2d(xp, stem_2x, stem[0].bias, stride=s)
    else:
        h = stem[0](x.contiguous(memory_format=torch.channels_last))
    h = _ln(h.permute(0, 2, 3, 1), stem[1])  # (N, H, W, C), contiguous
    for st in trunk.stages:
        ds = st.downsample
        if not isinstance(ds, nn.Identity):
            h = ds[1](_ln(h, ds[0]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        for b in st.blocks:
            y = b.conv_dw(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # NHWC view of an NHWC conv
            y = _ln(y, b.norm)
            y = F.linear(y, b.mlp.fc1.weight, b.mlp.fc1.bias)
            y = torch.ops.aten.gelu_(y)  # exact (erf) GELU, in place: the same kernel as F.gelu
            y = F.linear(y, b.mlp.fc2.weight, b.mlp.fc2.bias)
            if b.gamma is not None:
                y = y.mul_(b.gamma)
            h = y.add_(h)
    return h


class NHWCVisionTower(nn.Module):
    """``MagmaVisionTower`` through :func:`convnext_forward_nhwc`: pixels → (N, h, w, C).

    ``forward(pixel_values, upsample=2)`` takes the processor's output before its exact 2x resize
    (`preprocess_fast(..., defer_upsample=True)`) and folds the resize into the stem. The folded
    weight is made here, once, outside any compiled region: build a new tower (a new
    `FastGenerator`) after changing the weights, dtype or device.
    """

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        stem = tower.clip_vision_model.trunk.stem[0]
        self.stem_2x = upsample2x_stem_weight(stem) if stem_upsample2x_supported(stem) else None

    def forward(self, pixel_values: Tensor, upsample: int = 1) -> Tensor:
        trunk = self.tower.clip_vision_model.trunk
        if upsample == 1:
            return convnext_forward_nhwc(trunk, pixel_values)
        if upsample == 2 and self.stem_2x is not None:
            return convnext_forward_nhwc(trunk, pixel_values, self.stem_2x)
        from magma_ros.model.processor import upsample_pixels

        return convnext_forward_nhwc(trunk, upsample_pixels(pixel_values[:, None], upsample)[:, 0])


# ----------------------------------------------------------------------------------------------
# The multimodal merge, vectorized for the policy case (one image per row).
# ----------------------------------------------------------------------------------------------

def merge_one_image_per_row(model: nn.Module, vision, input_ids: Tensor, attention_mask: Tensor,
                            pixel_values: Tensor, image_sizes: Tensor, nhwc: bool = False,
                            upsample: int = 1) -> tuple[Tensor, Tensor, Tensor] | None:
    """``MagmaModel.prepare_inputs_embeds`` for rows that each hold exactly one ``<image>``.

    Same result (bit for bit in eager mode with the module's own tower: same ops on the same
    values), but the vision tower is ``vision`` (e.g. a compiled one; ``nhwc``: it returns
    (N, h, w, C) features and takes ``upsample``, as :class:`NHWCVisionTower`), the per-row Python
    merge becomes one gather, and the only host reads are of the small id/mask/size tensors.
    ``upsample`` > 1: ``pixel_values`` still need the processor's exact resize by that factor
    (`preprocess_fast` with ``defer_upsample``). Returns None when the inputs are not that
    case (several or no images, right padding, "global" anyres), and the caller falls back.

    input_ids, attention_mask: (B, T); pixel_values: (B, max_crops, 3, S, S); image_sizes: (B, 1, 2).
    Returns embeds (B, L, H), mask (B, L) long, position_ids (B, L) long, right-aligned.
    """
    cfg = model.config
    if getattr(cfg, "anyres_strategy", "crop") != "crop" or pixel_values is None or pixel_values.dim() != 5:
        return None
    img = cfg.image_token_index
    ids_h, m_h = input_ids.cpu(), attention_mask.cpu().bool()  # host copies (small)
    sizes = torch.as_tensor(image_sizes).cpu().reshape(ids_h.shape[0], -1, 2)
    B, T = ids_h.shape
    if sizes.shape[1] != 1 or not bool(m_h[:, -1].all()) or pixel_values.shape[0] != B:
        return None
    is_img = (ids_h == img) & m_h
    if not bool((is_img.sum(1) == 1).all()):
        return None
    grids = [(int(r), int(c)) for r, c in sizes[:, 0].tolist()]
    if any(r * c == 0 or r * c > pixel_values.shape[1] for r, c in grids):
        return None
    dev = model.language_model.get_input_embeddings().weight.device
    # vision: all crops of the batch at once, as the official code
    ncrop = [r * c for r, c in grids]
    if len(set(ncrop)) == 1:
        crops = pixel_values[:, : ncrop[0]].flatten(0, 1)  # (B*n, 3, S, S)
    else:
        crops = torch.cat([pixel_values[b, :n] for b, n in enumerate(ncrop)], 0)
    if crops.is_cuda:
        crops = crops.contiguous(memory_format=torch.channels_last)  # NHWC convolutions
    if nhwc:
        x = vision(crops, upsample)  # (N, h, w, C)
    else:
        from magma_ros.model.processor import upsample_pixels

        x = vision(upsample_pixels(crops[:, None], upsample)[:, 0]).permute(0, 2, 3, 1)  # (N, h, w, C)
    x = model.multi_modal_projector(x)  # (N, h, w, H)
    h, w, H = x.shape[1:]
    ids_d = input_ids.to(dev)
    text = model.language_model.get_input_embeddings()(ids_d.masked_fill(ids_d == img, 0))  # (B, T, H)
    sep = model.multi_modal_projector.row_seperator  # (1, 1, H)
    feats, k = [], 0
    for r, c in grids:  # (r*h, c*w, H) → with the row separator (r*h*(c*w+1), H)
        f = x[k:k + r * c].view(r, c, h, w, H).permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)
        if cfg.mm_use_row_seperator:
            f = torch.cat((f, sep.repeat(f.shape[0], 1, 1).to(f.dtype)), dim=1)
        feats.append(f.flatten(0, 1).to(text.dtype))
        k += r * c
    nf = [f.shape[0] for f in feats]
    F_max = max(nf)
    if len(set(nf)) == 1:
        feat = torch.stack(feats)  # (B, F, H)
    else:
        feat = text.new_zeros(B, F_max, H)
        for b, f in enumerate(feats):
            feat[b, : f.shape[0]] = f
    # gather index into cat(text, feat) per row: valid text before <image>, the image, text after
    rows = []
    for b in range(B):
        valid = m_h[b].nonzero().flatten()
        at = int(is_img[b].nonzero()[0])
        rows.append(torch.cat((valid[valid < at], T + torch.arange(nf[b]), valid[valid > at])))
    L = max(len(r) for r in rows)
    src = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, r in enumerate(rows):
        src[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    src, mask = src.to(dev), mask.to(dev)
    both = torch.cat((text, feat), 1)  # (B, T+F, H)
    embeds = both.gather(1, src[..., None].expand(-1, -1, H))  # (B, L, H)
    embeds = torch.where(mask[..., None].bool(), embeds, torch.zeros((), dtype=embeds.dtype, device=dev))
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return embeds, mask, pos


# ----------------------------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------------------------

class FastGenerator:
    """Greedy Magma generation over a static KV cache (the fast path behind ``MagmaPolicy``).

    ``model`` is a ``MagmaModel`` (or anything with ``language_model`` = ``LlamaForCausalLM`` and
    ``prepare_inputs_embeds``). ``dtype`` casts the whole model in place (bf16 on GPU: vision tower
    too, in channels_last); ``quant`` ("int8" / "int4") quantizes the language model's linear layers
    in place (``magma_ros.model.quant``), so the plain path on the same model uses the same weights.
    ``compile``: None (eager, the CPU default), "default", or "reduce-overhead" (CUDA graphs for
    the decode step); ``compile_vision`` (default: on when ``compile`` is set) compiles the vision
    tower for this path only. ``reuse_prefix`` caches the KV of the tokens before the first
    ``<image>``. ``fast_merge`` merges one-image-per-row batches with one gather
    (:func:`merge_one_image_per_row`) instead of the model's per-row loop; ``nhwc_vision`` runs
    the ConvNeXt trunk channels_last without layout copies (:func:`convnext_forward_nhwc`; only
    on that merge path, the model's own merge keeps the module). ``lm_head_t`` keeps a transposed
    copy of a small (≤ 256 MiB) CPU ``lm_head`` for a faster 1-row head; ``fuse`` keeps fused
    q/k/v and gate/up copies of a small CPU decoder's weights (one matmul each). The KV cache holds
    ``max_batch`` × ``max_seq_len`` slots and grows when a call needs more.
    """

    def __init__(self, model: nn.Module, *, max_seq_len: int = 1024, max_batch: int = 1,
                 compile: str | None = None, dtype: torch.dtype | None = None, quant: str | None = None,
                 reuse_prefix: bool = True, prefix_cache_size: int = 4, compile_vision: bool | None = None,
                 fast_merge: bool = True, nhwc_vision: bool = True, lm_head_t: bool = True,
                 fuse: bool = True):
        self.model = model
        self.fast_merge = fast_merge
        if dtype is not None:
            model.to(dtype)
        lm = model.language_model
        self.device = lm.model.embed_tokens.weight.device
        if self.device.type == "cuda" and getattr(model, "vision_tower", None) is not None:
            model.vision_tower.to(memory_format=torch.channels_last)
        self.quant_backend = None
        if quant is not None:
            from magma_ros.model.quant import quantize_language_model

            self.quant_backend = quantize_language_model(lm, quant)
        model.eval()
        self.engine = Engine(lm, max_batch, max_seq_len, lm_head_t=lm_head_t, fuse=fuse)
        # the ids generate_plain passes to transformers' generate (config first, then generation_config)
        cfg = getattr(model, "config", None)
        gen = getattr(lm, "generation_config", None)
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(gen, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(gen, "pad_token_id", None)
        self.pad = int(pad if pad is not None else (eos[0] if eos else 0))
        self.image_token_id = getattr(cfg, "image_token_index", None) or getattr(cfg, "image_token_id", None)
        self.reuse_prefix = bool(reuse_prefix and self.image_token_id is not None)
        self._prefix_cache: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._prefix_cache_size = prefix_cache_size
        self._bias_cache: dict = {}
        self.compile = compile
        vt = getattr(model, "vision_tower", None)
        self._vision = vt
        self._vision_nhwc = False
        trunk = getattr(getattr(vt, "clip_vision_model", None), "trunk", None)
        if nhwc_vision and trunk is not None and convnext_nhwc_supported(trunk):
            self._vision, self._vision_nhwc = NHWCVisionTower(vt), True
        if vt is not None and (compile_vision if compile_vision is not None else bool(compile)):
            self._vision = torch.compile(self._vision)
        self._decode = decode_one_token
        if compile:
            # weights and caches keep their addresses: CUDA graphs may read them in place
            for t in self.engine.parameters_and_caches():
                torch._dynamo.mark_static_address(t)
            self._decode = torch.compile(decode_one_token, mode=compile, fullgraph=True)

    # -- prompt prefix -------------------------------------------------------------------------
    def _prefix_ids(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[int, ...]:
        """The token ids before the first ``<image>``, when identical in every row (else ())."""
        if not self.reuse_prefix:
            return ()
        ids, m = input_ids.cpu(), attention_mask.cpu().bool()  # host-side, before the loop
        prefix = None
        for r in range(ids.shape[0]):
            row = ids[r][m[r]]
            hit = (row == self.image_token_id).nonzero()
            if len(hit) == 0:
                return ()
            p = tuple(row[: int(hit[0])].tolist())
            if prefix is not None and p != prefix:
                return ()
            prefix = p
        return prefix or ()

    def _prefix_kv(self, key: tuple, embeds: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """KV of the prefix (Lyr, kvh, P, D), computed once per distinct prefix (small LRU)."""
        hit = self._prefix_cache.get(key)
        if hit is not None:
            self._prefix_cache.move_to_end(key)
            return hit
        e, P = self.engine, len(key)
        prefill(e, embeds, pos, 0, None)  # (1, P, H) into row 0, slots [0, P)
        kv = (e.k_cache[:, 0, :, :P].clone(), e.v_cache[:, 0, :, :P].clone())
        self._prefix_cache[key] = kv
        if len(self._prefix_cache) > self._prefix_cache_size:
            self._prefix_cache.popitem(last=False)
        return kv

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 pixel_values: Tensor | None = None, image_sizes: Tensor | None = None,
                 max_new_tokens: int = 7,
                 allowed_token_ids: Sequence[int] | Sequence[Sequence[int] | None] | Tensor | None = None,
                 pixel_upsample: int = 1, sampling: Sampling | None = None,
                 between_steps: Callable[[], None] | None = None) -> Tensor:
        """Greedy tokens (B, n), n ≤ max_new_tokens (shorter only when every row hit EOS, as ``generate``).

        ``allowed_token_ids``: ids the argmax may pick at every step, or one entry per step
        (None = unconstrained at that step), e.g. the 256 action ids for the 7 action positions.
        ``pixel_upsample``: the ``upsample`` of `preprocess_fast` (2: ``pixel_values`` are the
        normalized frames before the processor's exact 2x resize, which the NHWC tower folds into
        its stem; any other path performs the resize first).
        ``sampling``: draw each token from the tempered (top-k) softmax instead (:class:`Sampling`).
        ``between_steps``: called before every decode step (a long answer yields to more urgent work:
        the policy node's ToM and question instances wait there while an action is inferred).
        """
        e = self.engine
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B = input_ids.shape[0]
        key = self._prefix_ids(input_ids, attention_mask)
        P = len(key)
        if pixel_values is not None:
            vt = getattr(self.model, "vision_tower", None)
            vdtype = next(vt.parameters()).dtype if vt is not None else e.dtype
            pixel_values = pixel_values.to(self.device, vdtype)
        if image_sizes is not None:
            image_sizes = image_sizes.to(self.device)
        # merged multimodal sequence, right-aligned: (B, L, H), (B, L), (B, L)
        merged = None
        if self.fast_merge and pixel_values is not None and self._vision is not None:
            merged = merge_one_image_per_row(self.model, self._vision, input_ids, attention_mask,
                                             pixel_values, image_sizes, nhwc=self._vision_nhwc,
                                             upsample=pixel_upsample)
        if merged is None:
            if pixel_values is not None and pixel_upsample != 1:
                from magma_ros.model.processor import upsample_pixels

                pixel_values = upsample_pixels(pixel_values, pixel_upsample)
            merged = self.model.prepare_inputs_embeds(
                input_ids.to(self.device), attention_mask.to(self.device), pixel_values, image_sizes)
        embeds, mask, pos = merged
        embeds = embeds.to(e.dtype)
        mask = mask.bool()
        L = embeds.shape[1]
        # host-side facts about the merged sequence, read once before the loop (rows can be padded
        # even with an all-ones input mask when their images give different token counts)
        padded = not bool(mask.all())
        if padded and not bool(mask[:, -1].all()):  # right padding → left padding (stable: order kept)
            order = torch.argsort(mask.int(), dim=1, stable=True)  # (B, L) pads first
            embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
            mask = mask.gather(1, order)
            pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        T = L - P
        need = L + max_new_tokens
        if B > e.max_batch or need > e.max_seq_len:
            e.allocate(max(B, e.max_batch), max(need, e.max_seq_len))

        if P:
            # the prefix is the first P valid positions of every row: take it from row 0's embeddings
            npad0 = L - int(mask[0].sum()) if padded else 0
            k_pre, v_pre = self._prefix_kv(key, embeds[:1, npad0:npad0 + P], pos[:1, npad0:npad0 + P])
            e.k_cache[:, :B, :, :P] = k_pre[:, None]  # (Lyr, B, kvh, P, D)
            e.v_cache[:, :B, :, :P] = v_pre[:, None]
            # drop each row's prefix: row r = [pad × npad_r, prefix, rest] → [pad × npad_r, rest]
            npad = L - mask.sum(1)  # (B,)
            j = torch.arange(T, device=self.device)
            src = j + P * (j >= npad[:, None])  # (B, T)
            embeds = embeds.gather(1, src[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, T, H)
            mask, pos = mask.gather(1, src), pos.gather(1, src)  # (B, T)
        pos = pos.clamp(min=0)

        valid = e.valid[:B]  # (B, S)
        valid.zero_()
        valid[:, :P] = True
        valid[:, P:L] = mask
        if P or padded:
            q = torch.arange(T, device=self.device)[:, None]
            s = torch.arange(L, device=self.device)[None, :]
            # causal over slots, valid keys only; a pad query sees itself (its output is unused)
            pmask = ((s <= q + P) & valid[:, None, :L]) | (s == q + P)  # (B, T, L)
            logits = prefill(e, embeds, pos, P, pmask[:, None])
        else:
            logits = prefill(e, embeds, pos, 0, None)

        bias = self._bias(allowed_token_ids, max_new_tokens, logits.shape[-1])
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        tok = pick(logits, None if bias is None else bias[0], finished, self.eos, self.pad, sampling)
        out[:, 0] = tok
        cur_pos = pos[:, -1]  # (B,) last prompt position
        # every slot index the loop will use, made on the device once (a host→device copy inside
        # the loop would wait for the queued GPU work: a host sync per step)
        slots = torch.arange(L, L + max_new_tokens, device=self.device)  # (n,)
        for t in range(1, max_new_tokens):
            if between_steps is not None:
                between_steps()
            slot = L + t - 1
            cur_pos = cur_pos + 1
            valid[:, slot] = True
            slot_t = slots[t - 1:t]  # (1,)
            if self.compile:  # static shapes for the compiled / CUDA-graph step
                kv_len, dmask = e.max_seq_len, e.valid[:B, None, None, :]
            else:
                # unpadded rows attend to every slot < kv_len (prefix, prompt, generated): no mask
                kv_len = slot + 1
                dmask = additive_mask(valid[:, None, None, :kv_len], e.dtype) if padded else None
            logits = self._decode(e, tok, cur_pos, slot_t, kv_len, dmask)
            tok = pick(logits, None if bias is None else bias[t], finished, self.eos, self.pad, sampling)
            out[:, t] = tok
        # the one host sync: trim the steps after every row had finished (generate stops there)
        done = torch.isin(out, self.eos).cumsum(1).clamp(max=1).bool().all(0)  # (n,) all rows finished by t
        n = int(done.int().argmax()) + 1 if bool(done.any()) else max_new_tokens
        return out[:, :n]

    def _bias(self, allowed, n: int, V: int) -> Tensor | None:
        # → (n, V) float32 additive bias (0 allowed / -inf not) or None; validated on the host,
        # built on the device once per distinct spec
        if allowed is None:
            return None
        if isinstance(allowed, Tensor):
            allowed = allowed.tolist()
        per_step = len(allowed) > 0 and (allowed[0] is None or hasattr(allowed[0], "__len__"))
        steps = list(allowed) if per_step else [allowed] * n
        steps = [None if ids is None else tuple(int(i) for i in ids) for ids in (steps + [None] * n)[:n]]
        key = (V, tuple(steps))
        hit = self._bias_cache.get(key)
        if hit is not None:
            return hit
        bias = torch.zeros(n, V, dtype=torch.float32)
        for t, ids in enumerate(steps):
            if ids is None:
                continue
            if not ids or min(ids) < 0 or max(ids) >= V:
                raise ValueError(f"allowed_token_ids at step {t} must be non-empty ids in [0, {V})")
            bias[t].fill_(float("-inf"))
            bias[t, list(ids)] = 0.0
        bias = bias.to(self.device)
        self._bias_cache = {key: bias}  # keep the latest spec only
        return bias
