"""One Magma policy step, fast path vs plain transformers ``generate``, same weights, same run.

A step is what ``MagmaPolicy.infer`` does: robot prompt → token ids, 640×480 RGB frame →
``preprocess_robot`` (256×256, one 512×512 crop, 272 visual tokens) → vision tower + projector →
prefill → 7 greedy decode steps → 7-DoF action (``ActionDecoder``, bridge_orig statistics). Both
paths compute the same values; they differ in how:

* fast:  prompt ids made once per instruction, ``preprocess_robot_fast`` (same pixel values as the
  official processor, on the device), ``FastGenerator.generate`` (static KV cache, prefix KV
  reuse, NHWC vision tower, optional compile/quant) — what ``MagmaPolicy`` does with the fast engine
* plain: chat template + tokenizer every step, the official processor, ``MagmaModel.generate_plain``
  (``language_model.generate(inputs_embeds=..., do_sample=False)``) — what a user would write

The two are timed interleaved (fast, plain, fast, plain, … with the order alternating) so machine
noise hits both alike; ``tokens_equal`` says whether they produced the same tokens on every frame.

    python benchmarks/policy_step.py --device cpu --checkpoint tiny
    python benchmarks/policy_step.py --device cpu --checkpoint mid
    python benchmarks/policy_step.py --device cuda --checkpoint full --quant none,int8,int4 --batch 1,4,8

``--checkpoint``: tiny / mid (random weights written to a temporary directory by
``magma_ros.model.checkpoint``), full (the Magma-8B architecture with random weights, built directly
on the device — never on this CPU), or a checkpoint directory. Results go to the ``policy_step``
section of benchmarks/RESULTS.md (rows keyed by device/checkpoint/dtype/quant/batch/compile); the
last line printed is one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, machine, write_section  # noqa: E402

from magma_ros.core import prompts  # noqa: E402
from magma_ros.core.actions import ActionDecoder, action_token_range, load_stats  # noqa: E402

SECTION = "policy_step"
INSTRUCTION = "put the carrot on the plate"
FULL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128320, vision_depths=(3, 4, 30, 3),
            vision_dims=(384, 768, 1536, 3072), head_proj_dim=1024)
GPU_COMMAND = ("python benchmarks/policy_step.py --device cuda --checkpoint full --dtype bfloat16 "
               "--quant none,int8,int4 --batch 1,4,8")


# ---------------------------------------------------------------------------------------- models
def _materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Give every meta parameter/buffer real random storage on ``device`` (norm weights = 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
            if "norm" in type(mod).__name__.lower() or name in ("gamma",):
                t.fill_(1.0 if name in ("weight", "gamma") else 0.0)
            elif t.is_floating_point():
                t.normal_(0.0, 0.02, generator=g)
            else:
                t.zero_()
            if isinstance(p, torch.nn.Parameter):
                setattr(mod, name, torch.nn.Parameter(t, requires_grad=False))
            else:
                mod.register_buffer(name, t)


def full_config(sizes: dict | None = None):
    """The MagmaConfig of ``FULL`` (the Magma-8B architecture; the tests check it against the
    official parameter names and shapes) or of other ``sizes``."""
    from magma_ros.model.checkpoint import TinySizes, magma_config_dict
    from magma_ros.model.magma import MagmaConfig
    from magma_ros.model.vision import VisionTowerConfig

    s = TinySizes(**(sizes or FULL))
    cfg = MagmaConfig.from_dict(magma_config_dict(s))
    cfg.vision = VisionTowerConfig(depths=s.vision_depths, dims=s.vision_dims, head_proj_dim=s.head_proj_dim)
    return cfg


def build_full_random(device: torch.device, dtype: torch.dtype, quant: str | None, seed: int = 0):
    """The Magma-8B architecture with random weights, built on ``device`` layer by layer.

    With ``quant`` each language-model Linear is quantized right after it is created, so peak
    memory stays near the quantized size (a bf16 copy of the whole model never exists).
    """
    from magma_ros.model.magma import MagmaModel
    from magma_ros.model.quant import language_model_linears, quantize_linear_auto

    model = MagmaModel(full_config(), device="meta", dtype=dtype)
    backend = None
    if quant:
        backend = "auto"
        g = torch.Generator(device=device).manual_seed(seed + 1)
        for parent, name, lin in language_model_linears(model.language_model):
            new = torch.nn.Linear(lin.in_features, lin.out_features, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                new.weight.normal_(0.0, 0.02, generator=g)
            q, backend = quantize_linear_auto(new, quant, backend)  # "auto" settles on the first layer
            setattr(parent, name, q)
            del new
    _materialize(model, device, dtype, seed)
    model.reset_rotary(device)
    model.requires_grad_(False).eval()
    return model, backend


def load_model(args, device: torch.device, dtype: torch.dtype, quant: str | None, workdir: Path):
    """(model, tokenizer, quant backend, checkpoint label)."""
    from magma_ros.model.magma import MagmaModel
    from magma_ros.model.tokenizer import build_llama3_tokenizer, load_tokenizer

    if args.checkpoint == "full":
        model, backend = build_full_random(device, dtype, quant, args.seed)
        return model, build_llama3_tokenizer(), backend, "full (Magma-8B shapes, random)"
    if args.checkpoint in ("tiny", "mid"):
        from magma_ros.model.checkpoint import write_tiny_checkpoint

        path = workdir / f"{args.checkpoint}-{args.seed}"
        if not (path / "model.safetensors").is_file():
            write_tiny_checkpoint(path, seed=args.seed, size=args.checkpoint)
        label = f"{args.checkpoint} (random)"
    else:
        path, label = Path(args.checkpoint), Path(args.checkpoint).name
    model = MagmaModel.from_pretrained(path, dtype=dtype, device=device, progress=False)
    backend = None
    if quant:
        from magma_ros.model.quant import quantize_language_model

        backend = quantize_language_model(model.language_model, quant)
    return model, load_tokenizer(path), backend, label


# ------------------------------------------------------------------------------------------ step
class Step:
    """One policy step for a batch of frames: prompt + preprocessing + generation + action decode."""

    def __init__(self, model, tokenizer, device, fast):
        self.model, self.tok, self.device, self.fast = model, tokenizer, device, fast
        self.vocab = int(getattr(tokenizer, "vocab_size", 128000))
        self.decoder = ActionDecoder(load_stats("bridge_orig"), self.vocab)
        self.mm = bool(model.config.mm_use_image_start_end)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = int(pad if pad is not None else model.config.pad_token_id)
        self._ids_key, self._ids = None, None

    def inputs(self, frames):
        """Plain path: what a user writes — chat template + tokenizer every step, the official
        processor (``preprocess_robot`` + ``collate``) on the host, then ``.to(device)``."""
        from magma_ros.model.processor import collate, preprocess_robot

        ids = [prompts.encode(self.tok, prompts.robot_prompt(self.tok, INSTRUCTION, self.mm)) for _ in frames]
        input_ids, mask = self._pad(ids)
        batch = collate([preprocess_robot(f) for f in frames])
        pv = batch["pixel_values"].to(self.device, non_blocking=True)
        return input_ids, mask, pv, batch["image_sizes"].to(self.device)

    def _pad(self, ids):
        n = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, r in enumerate(ids):
            input_ids[i, n - len(r):] = torch.tensor(r)
            mask[i, n - len(r):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def inputs_fast(self, frames):
        """Fast path, as ``MagmaPolicy`` with the fast engine: prompt ids made once per instruction
        (they do not change between steps), ``preprocess_robot_fast`` on the device (same values)."""
        from magma_ros.model.processor import preprocess_robot_fast

        key = (INSTRUCTION, len(frames))
        if self._ids_key != key:
            ids = [prompts.encode(self.tok, prompts.robot_prompt(self.tok, INSTRUCTION, self.mm)) for _ in frames]
            self._ids, self._ids_key = self._pad(ids), key
        samples = [preprocess_robot_fast(f, device=self.device, defer_upsample=True) for f in frames]
        pv = samples[0]["pixel_values"] if len(samples) == 1 else torch.cat([s["pixel_values"] for s in samples])
        sizes = torch.cat([s["image_sizes"] for s in samples]).to(self.device)
        return (*self._ids, pv, sizes, samples[0]["upsample"])

    def __call__(self, frames, engine: str, allowed=None, clock=time.perf_counter):
        """→ (tokens (B, n), actions, seconds spent in the generation call: vision + prefill + decode)."""
        ids, mask, pv, sizes, up = self.inputs_fast(frames) if engine == "fast" else (*self.inputs(frames), 1)
        _sync(self.device)
        t0 = clock()
        if engine == "fast":
            out = self.fast.generate(ids, mask, pv, sizes, max_new_tokens=7, allowed_token_ids=allowed,
                                     pixel_upsample=up)
        else:
            out = self.model.generate_plain(ids, mask, pv, sizes, max_new_tokens=7)
        out = out.cpu().numpy()
        t_gen = clock() - t0
        actions = [self.decoder(row) for row in out]
        return out, actions, t_gen


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: Step, frames_list, iters: int, warmup: int, device, engines=("fast", "plain"),
            allowed=None, clock=time.perf_counter):
    """Interleaved timings: {engine: [step s]}, {engine: [generate-call s]}, all tokens equal."""
    times = {e: [] for e in engines}
    gen = {e: [] for e in engines}
    equal = True
    for it in range(warmup + iters):
        frames = frames_list[it % len(frames_list)]
        order = engines if it % 2 == 0 else engines[::-1]
        toks = {}
        for e in order:
            _sync(device)
            t0 = clock()
            toks[e], _, t_gen = step(frames, e, allowed if e == "fast" else None, clock)
            _sync(device)
            if it >= warmup:
                times[e].append(clock() - t0)
                gen[e].append(t_gen)
        if len(engines) == 2:
            a, b = toks[engines[0]], toks[engines[1]]
            equal &= a.shape == b.shape and bool((a == b).all())
    return times, gen, equal


def stats_ms(ts):
    ts = sorted(ts)
    p50 = statistics.median(ts)
    p99 = ts[min(len(ts) - 1, int(round(0.99 * (len(ts) - 1))))]
    return p50 * 1e3, p99 * 1e3


# --------------------------------------------------------------------------------------- results
HEADER = ("| device | checkpoint | dtype | quant | batch | compile | clock | fast p50 / p99 ms | fast Hz | "
          "plain p50 / p99 ms | plain Hz | speedup | generate call ms fast / plain | actions/s | peak GPU GB | "
          "tokens equal | machine |")
SEP = "|" + "---|" * 17


def _row(r: dict) -> str:
    peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "–"
    plain = (f"{r['plain_p50_ms']:.1f} / {r['plain_p99_ms']:.1f}", f"{r['plain_hz']:.2f}",
             f"{r['speedup']:.2f}×") if r.get("plain_hz") else ("–", "–", "–")
    gen = f"{r['fast_gen_ms']:.1f} / " + (f"{r['plain_gen_ms']:.1f} ({r['gen_speedup']:.2f}×)"
                                          if r.get("plain_gen_ms") else "–")
    return (f"| {r['device']} | {r['checkpoint']} | {r['dtype']} | {r['quant']} | {r['batch']} | "
            f"{r['compile']} | {r.get('clock', 'wall')} | "
            f"{r['fast_p50_ms']:.1f} / {r['fast_p99_ms']:.1f} | {r['fast_hz']:.2f} | "
            f"{plain[0]} | {plain[1]} | {plain[2]} | {gen} | {r['actions_per_s']:.2f} | {peak} | "
            f"{r['tokens_equal']} | {r['machine']} |")


PREAMBLE = f"""## policy_step — one Magma policy step (image + instruction → 7-DoF action)

`benchmarks/policy_step.py`: preprocessing + vision + prefill + 7 decode steps + action decode,
fast path (`FastGenerator`) vs plain transformers `generate` on the same weights in the same run,
interleaved. Hz = 1 / p50 of one step; actions/s = batch / p50; clock = wall (perf_counter) or
process (this process's CPU time) and torch threads. Random-weight checkpoints (same
shapes, same cost as trained ones). CPU figures on a shared, noisy 2-core machine.

**No GPU machine has been lent to this project's sessions so far**, so the GPU rows (the
Magma-8B architecture with random weights; bf16, int8, 4-bit; peak GPU memory; batch 1/4/8) are
still to be produced, with:

    {GPU_COMMAND}

(each configuration appends/replaces its own row below and names the card in the machine column;
with a 10-minute command limit run `--quant none`, `int8`, `int4` as separate commands — see
docs/performance.md, "Running the GPU rows").

CPU tiny target (fast ≥ 3× plain) **not reached**: 1.68× interleaved (≈ 2.0× when each path is timed
in its own loop), 1.51× on mid. In a fast tiny step the 256×256 PIL resize (reference semantics,
~4 ms) and the vision tower (~13–17 ms, already NHWC with the 2× resize folded into its stem) alone
take more than a third of the plain step, and the width-16 language model is per-op overhead that
compiling does not remove on this CPU (breakdown and the rejected attempts in docs/performance.md).
The fast step uses its own preprocessing (the official values, tested), prompt ids made once per
instruction, the resize folded into the stem, the NHWC vision tower and a leaner LM step; the plain
step is unchanged. Shared machine: absolute times move by up to 1.7× between runs (load average
6–7 during the latest rows); compare the speedups, each from one run.
"""


def write_rows(rows: list[dict]) -> None:
    """Merge ``rows`` into the section's table (same key → replaced), keep the other rows."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    m = re.search(rf"<!-- {SECTION}:begin -->(.*?)<!-- {SECTION}:end -->", text, re.S)
    lines = m.group(1).splitlines() if m else []
    old = [ln for ln in lines if ln.startswith(("| cpu", "| cuda"))]
    table = {tuple(c.strip() for c in ln.split("|")[1:8]): ln for ln in old}
    for r in rows:
        ln = _row(r)
        table[tuple(c.strip() for c in ln.split("|")[1:8])] = ln
    body = "\n".join([PREAMBLE, HEADER, SEP, *sorted(table.values())])
    write_section(SECTION, body)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--checkpoint", default="tiny", help="tiny | mid | full | PATH")
    ap.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float16 (default: fp32 on cpu, bf16 on cuda)")
    ap.add_argument("--quant", default="none", help="comma list of none | int8 | int4")
    ap.add_argument("--batch", default="1", help="comma list of batch sizes (several arms per step)")
    ap.add_argument("--compile", default="auto", help="auto | none | default | reduce-overhead")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--clock", default="wall", choices=["wall", "process"],
                    help="wall: perf_counter; process: this process's CPU time (with --threads 1 on a "
                         "shared, oversubscribed CPU it leaves out time spent waiting for other tenants)")
    ap.add_argument("--plain-iters", type=int, default=None, help="plain-path iterations on cuda full (slow)")
    ap.add_argument("--constrained", action="store_true", help="fast path only considers action tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None,
                    help="where tiny/mid checkpoints are written (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    a = ap.parse_args(argv)

    from magma_ros.model.fast import FastGenerator

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, a.dtype) if a.dtype else default_dtype
    compile_mode = a.compile
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if device.type == "cuda" else "none"
    compile_mode = None if compile_mode == "none" else compile_mode
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="policy_step-"))
    rng = np.random.default_rng(a.seed)
    batches = [int(b) for b in a.batch.split(",")]
    frames_pool = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]
    mach = machine() if device.type == "cpu" else f"{torch.cuda.get_device_name(device)}, {machine()}"
    clock_label = a.clock if device.type == "cuda" else f"{a.clock}, {torch.get_num_threads()} thr"

    rows, summary = [], None
    for quant in [q.strip() for q in a.quant.split(",")]:
        quant = None if quant in ("none", "") else quant
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model, tok, backend, label = load_model(a, device, dtype, quant, workdir)
        fast = FastGenerator(model, max_batch=max(batches), max_seq_len=512, compile=compile_mode)
        step = Step(model, tok, device, fast)
        allowed = [list(action_token_range(step.vocab))] * 7 if a.constrained else None
        for b in batches:
            frames_list = [[frames_pool[(i + j) % len(frames_pool)] for j in range(b)] for i in range(4)]
            full_gpu = a.checkpoint == "full"
            engines = ("fast", "plain") if (b == 1 or not full_gpu) else ("fast",)
            iters = a.iters
            if full_gpu and a.plain_iters is not None and "plain" in engines:
                iters = a.plain_iters
            times, gen, equal = measure(step, frames_list, iters, a.warmup, device, engines, allowed, clock)
            f50, f99 = stats_ms(times["fast"])
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
            r = dict(device=device.type, checkpoint=label, dtype=str(dtype).replace("torch.", ""),
                     quant=f"{quant}/{backend}" if quant else "none", batch=b, compile=compile_mode or "none",
                     fast_p50_ms=f50, fast_p99_ms=f99, fast_hz=1e3 / f50, actions_per_s=b * 1e3 / f50,
                     plain_p50_ms=None, plain_p99_ms=None, plain_hz=None, speedup=None,
                     tokens_equal=bool(equal) if "plain" in times else None, machine=mach,
                     peak_gb=peak,
                     constrained=a.constrained, clock=clock_label)
            r["fast_gen_ms"] = stats_ms(gen["fast"])[0]
            if "plain" in times:
                p50, p99 = stats_ms(times["plain"])
                r.update(plain_p50_ms=p50, plain_p99_ms=p99, plain_hz=1e3 / p50, speedup=p50 / f50,
                         plain_gen_ms=stats_ms(gen["plain"])[0])
                r["gen_speedup"] = r["plain_gen_ms"] / r["fast_gen_ms"]
            rows.append(r)
            print(_row(r), flush=True)
            if summary is None or (b == 1 and quant is None):
                summary = r
        del fast, step, model
    if not a.no_write:
        write_rows(rows)
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}
    out["rows"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "machine"}
                   for r in rows]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
