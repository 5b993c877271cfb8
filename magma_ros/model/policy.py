"""`MagmaPolicy`: image + instruction -> Magma's 7-DoF action; ToM traces; questions about images.

Composes the pieces in one place: prompt (``core.prompts``) -> tokenizer -> robot image path
(``model.processor.preprocess_robot``: 256x256 then one 512 crop) -> generation engine (``fast``
static-KV engine or transformers' ``generate``; greedy) -> action decoding (``core.actions``:
first 7 tokens, bins, q01/q99 statistics, gripper map). Results follow the ``BasePolicy`` contract
of ``magma_ros.core.policy_api`` so a remote server and a local node see the same thing.

Decoding is greedy (deterministic) by default. Magma's SimplerEnv/LIBERO evaluation sampled
(``do_sample=True, temperature=0.7`` under transformers 4.44, whose sampling default was
``top_k=50``): ``temperature=0.7, top_k=50`` reproduces that decoding (``seed`` makes it
repeatable). Its ToM demo sampled at 0.3. How much sampling matters for success rates is UNVERIFIED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magma_ros.core import prompts
from magma_ros.core.actions import (
    ACTION_DIM,
    BASE_VOCAB_SIZE,
    ActionDecoder,
    ActionStats,
    action_token_range,
    load_stats,
    make_gripper,
)
from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.policy_api import hold_result, validate_image, validate_observation, validate_text
from magma_ros.core.tom import (
    DEFAULT_MARKS,
    DEFAULT_SPEED,
    DEFAULT_STEPS,
    TraceResult,
    feature_marks,
    parse_traces,
)

log = logging.getLogger(__name__)

ENGINES = ("auto", "fast", "plain")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
MAX_QA_IMAGES = 8


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of a `MagmaPolicy` (the ROS policy node and the server parse their parameters into this)."""

    stats: str = "bridge_orig"  # action statistics: bridge_orig | google_robot | path to a JSON file
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: cuda when available
    dtype: str | None = None  # float32 | bfloat16 | float16; None: bfloat16 on cuda, float32 on cpu
    engine: str = "auto"  # auto (fast, else plain) | fast (static KV cache) | plain (transformers generate)
    constrained: bool = False  # only action tokens may be generated at the 7 action positions
    max_batch: int = 4  # arms served in one batch by infer_batch (the fast engine preallocates this)
    step_period: float | None = None  # [s] override the statistics' step period (user statistics w/o rate)
    compile: str | None = None  # fast engine: None | "default" | "reduce-overhead" (CUDA graphs; GPU)
    quant: str | None = None  # fast engine: None | "int8" | "int4" (language model weights, in place)
    temperature: float = 0.0  # 0: greedy; > 0: sample (Magma's evaluation: 0.7 with top_k 50)
    top_k: int = 50  # sampling only: keep the k largest logits (0: all)
    seed: int | None = None  # sampling only: seed of the policy's own generator (None: random)


def _torch_dtype(name: str | None, device):
    import torch

    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(name, str):
        return name  # already a torch.dtype
    return getattr(torch, DTYPES[choose(name.lower(), list(DTYPES), "dtype")])


def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use device cpu")
    return dev


class MagmaPolicy:
    """Magma as a robot policy. Thread-safe (one inference at a time).

    ``model_or_path``: a checkpoint directory / hub id, or a loaded ``MagmaModel``. ``stats``: a
    built-in dataset name or a statistics JSON path (``load_stats``). ``engine``: "auto" uses the
    fast engine when it can be built and falls back to transformers' ``generate`` with a log line.
    ``constrained=True`` lets only the 256 action tokens be generated at the 7 action positions
    (random-weight checkpoints then still move the arm). ``compile`` / ``quant`` (and any other
    ``FastGenerator`` keyword in ``fast_options``) configure the fast engine; ``dtype`` is the
    model's dtype (the fast engine runs the model as loaded). With the fast engine, robot frames
    go through ``preprocess_robot_fast`` (same values as the official processor, on the device).
    ``temperature`` > 0 samples the action tokens from the tempered top-``top_k`` softmax (Magma's
    evaluation used 0.7 / 50) with the policy's own generator, seeded by ``seed``; 0 is greedy.
    """

    def __init__(self, model_or_path, *, stats: str | Path | ActionStats = "bridge_orig", device=None,
                 dtype=None, engine: str = "auto", constrained: bool = False, tokenizer=None,
                 max_batch: int = 4, step_period: float | None = None,
                 mm_use_image_start_end: bool | None = None, compile: str | None = None,
                 quant: str | None = None, fast_options: dict | None = None,
                 temperature: float = 0.0, top_k: int | None = 50, seed: int | None = None):
        choose(engine, ENGINES, "engine")
        temperature = float(temperature)
        if not (0.0 <= temperature < float("inf")):
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if top_k is not None and int(top_k) < 0:
            raise ConfigError(f"top_k must be >= 0 (0: no cut), got {top_k}")
        self.temperature, self.top_k, self.seed = temperature, (int(top_k) if top_k else None), seed
        if isinstance(stats, ActionStats):
            self.stats = stats
        else:
            self.stats = load_stats(stats, step_period=step_period)
        if step_period is not None:
            if not step_period > 0:
                raise ConfigError(f"step_period must be > 0 s, got {step_period}")
            from dataclasses import replace

            self.stats = replace(self.stats, step_period=float(step_period))
        if isinstance(model_or_path, (str, Path)):
            from magma_ros.model.magma import MagmaModel
            from magma_ros.model.tokenizer import load_tokenizer

            dev = _device(device)
            self.model = MagmaModel.from_pretrained(str(model_or_path), dtype=_torch_dtype(dtype, dev),
                                                    device=dev)
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_or_path)
        else:
            self.model = model_or_path
            if device is not None or dtype is not None:
                dev = _device(device) if device is not None else self.model.device
                self.model.to(device=dev, dtype=_torch_dtype(dtype, dev) if dtype is not None else None)
                if hasattr(self.model, "reset_rotary"):
                    self.model.reset_rotary(dev)
            if tokenizer is None:
                d = getattr(self.model, "checkpoint_dir", None)
                if d is None:
                    raise ConfigError("pass tokenizer= with a model object not loaded from a directory")
                from magma_ros.model.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(d)
            self.tokenizer = tokenizer
        cfg = self.model.config
        self.mm_use_image_start_end = bool(cfg.mm_use_image_start_end if mm_use_image_start_end is None
                                           else mm_use_image_start_end)
        self.vocab_size = int(getattr(self.tokenizer, "vocab_size", BASE_VOCAB_SIZE))
        self.action_ids = list(action_token_range(self.vocab_size))
        if max(self.action_ids) >= cfg.vocab_size:
            raise ConfigError(f"tokenizer base vocabulary {self.vocab_size} does not fit the model's "
                              f"{cfg.vocab_size} rows")
        self.decoder = ActionDecoder(self.stats, self.vocab_size)
        self.constrained = bool(constrained)
        self.max_batch = int(max_batch)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pad_id = int(pad)
        self._grippers: dict[str, object] = {}  # robot_id -> gripper map (sticky state per arm)
        self._held: dict[str, float] = {}  # robot_id -> last gripper command (0 closed .. 1 open)
        self._lock = threading.Lock()
        self.last_prompt = ""  # exact prompt text of the last ask / ui_answer (for logs and tests)
        self._ids_cache: OrderedDict[str, list[int]] = OrderedDict()
        self.engine_name = "plain"
        self._fast = None
        if engine in ("auto", "fast"):
            try:
                from magma_ros.model.fast import FastGenerator

                opts = dict(fast_options or {})
                for k, v in (("compile", compile), ("quant", quant)):
                    if v is not None:  # "" / "none" (e.g. from a ROS parameter) mean off
                        opts[k] = None if str(v).lower() in ("", "none") else v
                self._fast = FastGenerator(self.model, max_batch=self.max_batch, **opts)
                self.engine_name = "fast"
            except Exception as e:
                if engine == "fast":
                    raise ConfigError(f"fast engine unavailable: {type(e).__name__}: {e}") from e
                log.warning("fast engine unavailable (%s: %s); using transformers generate",
                            type(e).__name__, e)
        self.engine = engine
        # called between generated tokens of ToM plans and answers (not of actions: 7 tokens); the policy
        # node sets it on its second instance to wait while the action instance infers
        self.yield_to: Callable[[], None] | None = None
        self._sampling = None
        if self.temperature > 0:
            import torch

            from magma_ros.model.fast import Sampling

            gen = torch.Generator(device=self.model.device)
            if seed is not None:
                gen.manual_seed(int(seed))
            else:
                gen.seed()  # a non-deterministic seed
            self._sampling = Sampling(self.temperature, self.top_k, gen)

    @classmethod
    def from_config(cls, model_or_path, cfg: PolicyConfig, **kw) -> MagmaPolicy:
        """Build from a `PolicyConfig` (extra keyword arguments, e.g. ``tokenizer=``, pass through)."""
        return cls(model_or_path, stats=cfg.stats, device=cfg.device, dtype=cfg.dtype, engine=cfg.engine,
                   constrained=cfg.constrained, max_batch=cfg.max_batch, step_period=cfg.step_period,
                   compile=cfg.compile, quant=cfg.quant, temperature=cfg.temperature, top_k=cfg.top_k,
                   seed=cfg.seed, **kw)

    # ------------------------------------------------------------------ properties
    @property
    def step_period(self) -> float:
        """Seconds per action (the statistics' dataset rate): one action is one step of this length."""
        return self.stats.step_period

    @property
    def device(self):
        return self.model.device

    def metadata(self) -> dict:
        """What a remote client needs to know (sent by the server on connect)."""
        return {"stats": self.stats.name, "step_period": self.step_period, "engine": self.engine_name,
                "constrained": self.constrained, "temperature": self.temperature, "top_k": self.top_k,
                "action_dim": ACTION_DIM,
                "gripper": "normalized 0 closed .. 1 open", "max_batch": self.max_batch}

    def reset(self, robot_id: str | None = None) -> None:
        """Forget per-arm state (the sticky gripper) for one arm, or for all when ``robot_id`` is None."""
        with self._lock:
            if robot_id is None:
                self._grippers.clear()
                self._held.clear()
            else:
                self._grippers.pop(robot_id, None)
                self._held.pop(robot_id, None)

    # ------------------------------------------------------------------ generation
    def _batch(self, texts: list[str], images_per_row: list[list[np.ndarray]], robot: bool):
        """-> input_ids (B, T), mask (B, T), pixel values, image_sizes (B, n_images, 2), upsample."""
        import torch

        from magma_ros.model.processor import collate, preprocess, preprocess_robot, preprocess_robot_fast

        ids = [self._encode(t) for t in texts]
        n = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, r in enumerate(ids):  # left padding
            input_ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, n - len(r):] = 1
        if robot and self._fast is not None:
            # fast engine: the same values (tested), fewer copies, made on the model's device; the
            # exact 2x resize to the 512x512 crop is left to the engine's vision stem (upsample = 2)
            samples = [preprocess_robot_fast(imgs[0], device=self.model.device, defer_upsample=True)
                       for imgs in images_per_row]
            pv = torch.cat([s["pixel_values"] for s in samples], 0) if len(samples) > 1 \
                else samples[0]["pixel_values"]  # (B, 1, 3, 256, 256): robot frames are one crop
            sizes = torch.cat([s["image_sizes"] for s in samples], 0)
            upsample = samples[0]["upsample"]
        else:
            samples = [preprocess_robot(imgs[0]) if robot else preprocess(list(imgs)) for imgs in images_per_row]
            batch = collate(samples)
            pv, sizes, upsample = batch["pixel_values"], batch["image_sizes"], 1
        pv = pv.to(self.model.device, self.model.dtype)  # (B, crops, 3, 512, 512) (/ upsample)
        sizes = sizes.to(self.model.device)  # (B, n_images, 2)
        return input_ids.to(self.model.device), mask.to(self.model.device), pv, sizes, upsample

    def _encode(self, text: str) -> list[int]:
        """Token ids of a prompt, cached (the same instruction repeats every step)."""
        ids = self._ids_cache.get(text)
        if ids is None:
            ids = prompts.encode(self.tokenizer, text)
            self._ids_cache[text] = ids
            if len(self._ids_cache) > 256:
                self._ids_cache.popitem(last=False)
        else:
            self._ids_cache.move_to_end(text)
        return ids

    def _generate(self, input_ids, mask, pv, sizes, upsample: int = 1, max_new_tokens: int = 7, allowed=None,
                  sample: bool = False, yield_to: Callable[[], None] | None = None):
        """New token ids (B, n) as a numpy int64 array (``upsample``: see `preprocess_fast`;
        ``sample``: use the policy's sampling settings, when it has any; ``yield_to``: called between
        generated tokens)."""
        if self._fast is not None:
            try:
                out = self._fast.generate(input_ids, mask, pv, sizes, max_new_tokens=max_new_tokens,
                                          allowed_token_ids=allowed, pixel_upsample=upsample,
                                          sampling=self._sampling if sample else None, between_steps=yield_to)
                return out.cpu().numpy()
            except ValueError:
                raise
            except Exception as e:
                if self.engine == "fast":
                    raise
                log.warning("fast engine failed (%s: %s); falling back to transformers generate",
                            type(e).__name__, e)
                self._fast, self.engine_name = None, "plain"
        kw = {}
        if allowed is not None:
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList([_AllowedTokens(allowed)])
        if yield_to is not None:
            from transformers import StoppingCriteriaList

            kw["stopping_criteria"] = StoppingCriteriaList([_Yield(yield_to)])
        if sample and self._sampling is not None:
            # transformers' sampler draws from torch's global generator: repeatable with
            # torch.manual_seed, not with this policy's seed
            kw.update(do_sample=True, temperature=self.temperature, top_k=self.top_k)
        from magma_ros.model.processor import upsample_pixels

        pv = upsample_pixels(pv, upsample)
        out = self.model.generate_plain(input_ids, mask, pv, sizes, max_new_tokens=max_new_tokens, **kw)
        return out.cpu().numpy()

    def _gripper(self, robot_id: str):
        g = self._grippers.get(robot_id)
        if g is None:
            g = self._grippers[robot_id] = make_gripper(self.stats.gripper)
        return g

    # ------------------------------------------------------------------ public API
    def infer(self, obs: dict) -> dict:
        """``{"image": HxWx3 uint8 RGB, "instruction": str}`` -> action result (see ``magma_ros.core.policy_api``)."""
        return self.infer_batch([obs])[0]

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        """Several observations (e.g. several arms) in one left-padded batch -> one result each.

        Each observation may carry ``"robot_id"`` so per-arm gripper state stays apart.
        """
        if not isinstance(observations, (list, tuple)) or not observations:
            raise ValueError("infer_batch needs a non-empty list of observations")
        checked = [validate_observation(o) for o in observations]
        results: list[dict] = []
        with self._lock:
            for start in range(0, len(checked), self.max_batch):
                results += self._infer_chunk(checked[start:start + self.max_batch])
        return results

    def _infer_chunk(self, checked) -> list[dict]:
        t0 = time.perf_counter()
        texts = [prompts.robot_prompt(self.tokenizer, task, self.mm_use_image_start_end)
                 for _, task, _ in checked]
        batch = self._batch(texts, [[img] for img, _, _ in checked], robot=True)
        allowed = [self.action_ids] * ACTION_DIM if self.constrained else None
        gen = self._generate(*batch, max_new_tokens=ACTION_DIM, allowed=allowed, sample=True)  # (B, <=7)
        latency = (time.perf_counter() - t0)
        out = []
        for row, (_, _, rid) in zip(gen, checked):
            d = self.decoder(row)
            if not d.valid:  # no motion; the gripper keeps its last command
                out.append(hold_result(d.reason, gripper=self._held.get(rid, 1.0), latency_s=latency,
                                       tokens=row.tolist()))
                continue
            action = d.raw.astype(np.float32)
            action[6] = self._gripper(rid)(d.raw[6])
            self._held[rid] = float(action[6])
            out.append({"action": action, "tokens": list(d.tokens), "latency_s": latency, "valid": True,
                        "reason": ""})
        return out

    def predict_tom(self, image, task: str, marks=DEFAULT_MARKS, speed: int = DEFAULT_SPEED,
                    steps: int = DEFAULT_STEPS, max_new_tokens: int = 512) -> TraceResult:
        """Trace-of-Mark plan for ``task``: future traces of numbered marks, in pixels of ``image``.

        ``marks``: a number of marks (ids 1..N named in the prompt only, as Magma's ToM demo does) or
        an (N, 2) array of pixel positions, which are drawn on the image as numbered SoM marks first
        (Magma's training-time SoM prompting). The model's answer names each moved mark's start; where
        it does not, given positions fill ``starts``. Parse problems are in ``result.errors``.
        """
        img = validate_image(image)
        task = validate_text(task, "task")
        positions = None
        if np.ndim(marks) == 0:
            n = int(marks)
            if not 1 <= n <= 50:
                raise ValueError(f"marks must be 1..50, got {n}")
        else:
            positions = np.asarray(marks, dtype=np.float64).reshape(-1, 2)
            if not np.isfinite(positions).all() or not 1 <= len(positions) <= 50:
                raise ValueError("marks must be 1..50 finite (x, y) pixel positions")
            n = len(positions)
            from magma_ros.core.som import draw_marks

            img = draw_marks(img, positions)
        if not (1 <= int(speed) <= 256 and 1 <= int(steps) <= 64):
            raise ValueError("speed must be 1..256 grid cells and steps 1..64")
        text = prompts.tom_prompt(self.tokenizer, list(range(1, n + 1)), task, speed, steps,
                                  self.mm_use_image_start_end)
        with self._lock:
            batch = self._batch([text], [[img]], robot=True)  # the demo resizes to 256x256 too
            gen = self._generate(*batch, max_new_tokens=max_new_tokens, yield_to=self.yield_to)
        answer = self.tokenizer.decode(gen[0].tolist(), skip_special_tokens=True)
        h, w = img.shape[:2]
        res = parse_traces(answer, w, h)
        if positions is not None:
            for k, p in enumerate(positions, start=1):
                if k in res.traces and k not in res.starts:
                    res.starts[k] = p
        res.text = answer
        return res

    def place_marks(self, image, n: int = DEFAULT_MARKS) -> np.ndarray:
        """Mark positions (n, 2) pixel on strong image corners (see ``core.tom.feature_marks``)."""
        return feature_marks(validate_image(image), n)

    def ask(self, images, question: str, max_new_tokens: int = 128, brief: bool = True) -> str:
        """Answer a question about one image or several recent frames (oldest first), greedily.

        Several frames are one ``<image>\\n`` each at the start of the user turn, each through the
        full anyres processor: Magma's lmms-eval image/video path (MAGMA_FACTS §4). ``last_prompt``
        holds the exact prompt text afterwards.
        """
        imgs = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        if not 1 <= len(imgs) <= MAX_QA_IMAGES:
            raise ValueError(f"ask needs 1..{MAX_QA_IMAGES} images, got {len(imgs)}")
        imgs = [validate_image(im, f"image {i}") for i, im in enumerate(imgs)]
        question = validate_text(question, "question")
        text = prompts.qa_prompt(self.tokenizer, question, len(imgs), brief, self.mm_use_image_start_end)
        return self._answer(imgs, text, max_new_tokens)

    def ui_answer(self, image, task: str, max_new_tokens: int = 128) -> str:
        """Magma's UI-agent answer for a screenshot with SoM marks drawn on it (MAGMA_FACTS §3.1).

        The prompt is the demo's Set-of-Mark click prompt for ``task``; greedy, ``max_new_tokens``
        128 as the demo. Returns the raw answer (parse it with ``core.ui.parse_ui_answer``).
        """
        img = validate_image(image)
        task = validate_text(task, "task")
        text = prompts.chat_prompt(self.tokenizer, prompts.som_click_user_prompt(task), self.mm_use_image_start_end)
        return self._answer([img], text, max_new_tokens)

    def _answer(self, imgs: list, text: str, max_new_tokens: int) -> str:
        """Greedy answer text (new tokens only, special tokens skipped) for a prompt over images."""
        if not 1 <= int(max_new_tokens) <= 4096:
            raise ValueError(f"max_new_tokens must be 1..4096, got {max_new_tokens}")
        self.last_prompt = text
        with self._lock:
            batch = self._batch([text], [imgs], robot=False)
            gen = self._generate(*batch, max_new_tokens=int(max_new_tokens), yield_to=self.yield_to)
        return self.tokenizer.decode(gen[0].tolist(), skip_special_tokens=True).strip()


class _Yield:
    """transformers StoppingCriteria that never stops: calls ``fn`` after every generated token."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.fn()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _AllowedTokens:
    """transformers LogitsProcessor: at generated step t < len(allowed) only ``allowed[t]`` may win."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.start = None
        self._masks = {}

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        t = input_ids.shape[1] - self.start
        if t >= len(self.allowed) or self.allowed[t] is None:
            return scores
        key = (t, scores.shape[-1], scores.device)
        m = self._masks.get(key)
        if m is None:
            m = torch.full((scores.shape[-1],), float("-inf"), device=scores.device)
            m[torch.as_tensor(list(self.allowed[t]), device=scores.device)] = 0.0
            self._masks[key] = m
        return scores + m.to(scores.dtype)
