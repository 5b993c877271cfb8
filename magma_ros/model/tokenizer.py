"""Tokenizers: the checkpoint's own (``load_tokenizer``) or an offline Llama-3 + Magma one.

`build_llama3_tokenizer` needs no network: the ``llama-models`` wheel ships Meta's Llama-3 BPE
ranks (``llama_models/llama3/tokenizer.model``); transformers' ``TikTokenConverter`` turns them into
a fast tokenizer with the real Llama-3 ids (``"\\n\\n"`` -> 271, ``"system"`` -> 9125). On top:

* the 256 Llama-3 special tokens 128000..128255 (Llama-3.0 names: ``<|begin_of_text|>`` 128000,
  ``<|end_of_text|>`` 128001, ``<|start_header_id|>`` 128006, ``<|end_header_id|>`` 128007,
  ``<|eot_id|>`` 128009, the rest ``<|reserved_special_token_N|>``);
* Magma's added tokens from 128256 on: ``<pad>`` 128256, ``<image>`` 128257 (both verified), then
  128258 (UNVERIFIED, named ``<action>`` here), ``<image_start>`` 128259, ``<image_end>`` 128260
  (derived from a token dump, MAGMA_FACTS §5) — override with ``added_tokens=``;
* the standard Llama-3-Instruct chat template (Magma's own template text is UNVERIFIED; token
  dumps match this one). The template emits ``<|begin_of_text|>`` and the tokenizer adds BOS again
  with ``add_special_tokens=True``: Magma's prompts start with 128000, 128000 (MAGMA_FACTS §1.2).

``tokenizer.vocab_size`` is 128000 (base vocabulary, no added tokens), the number Magma's action
decoding uses; ``len(tokenizer)`` counts the added tokens too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<pad>"
LLAMA3_BASE_VOCAB = 128000
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [
    f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)
]  # ids 128000..128255 (Meta-Llama-3-8B-Instruct naming)
# Magma's added tokens in id order from 128256; 128258's name is UNVERIFIED
MAGMA_ADDED_TOKENS = ("<pad>", "<image>", "<action>", "<image_start>", "<image_end>")
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_tokenizer_model_path() -> Path:
    """Meta's Llama-3 BPE ranks as shipped in the ``llama-models`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("build_llama3_tokenizer needs the 'llama-models' package (pip install llama-models)")
    p = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing from the llama-models install")
    return p


@lru_cache(maxsize=4)
def _tokenizer_json(added_tokens: tuple[str, ...]) -> str:
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(
        vocab_file=str(llama3_tokenizer_model_path()), extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    if tok.get_vocab_size(with_added_tokens=False) != LLAMA3_BASE_VOCAB:
        raise RuntimeError(f"unexpected Llama-3 base vocabulary {tok.get_vocab_size(with_added_tokens=False)}")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added_tokens])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok.to_str()


def build_llama3_tokenizer(added_tokens: tuple[str, ...] = MAGMA_ADDED_TOKENS):
    """Offline Llama-3 fast tokenizer with Magma's added tokens and the Llama-3 chat template (~2 s once)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(tuple(added_tokens))),
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD if PAD in added_tokens else None,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        padding_side="left",
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def load_tokenizer(checkpoint_dir: str | Path):
    """The checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json) via transformers.

    With a ``tokenizer.json`` (Magma-8B ships one) the fast tokenizer class is used directly, so
    transformers never has to understand the checkpoint's ``model_type: magma`` config.
    """
    from magma_ros.core.errors import ConfigError
    from magma_ros.model.loader import resolve_checkpoint

    d = resolve_checkpoint(checkpoint_dir)
    if (d / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(d))
    if (d / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d))
    raise ConfigError(f"{d} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
