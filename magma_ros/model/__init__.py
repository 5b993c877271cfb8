"""Magma in torch: vision tower, projector, Llama-3 language model, processor, loader, tokenizers.

No rclpy here. Heavy imports (torch, transformers, timm) happen on first use of a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from magma_ros.model.magma import MagmaConfig, MagmaModel, MagmaOutput
    from magma_ros.model.processor import collate, preprocess, preprocess_robot
    from magma_ros.model.tokenizer import build_llama3_tokenizer, load_tokenizer

_EXPORTS = {
    "MagmaModel": "magma_ros.model.magma",
    "MagmaConfig": "magma_ros.model.magma",
    "MagmaOutput": "magma_ros.model.magma",
    "preprocess": "magma_ros.model.processor",
    "preprocess_robot": "magma_ros.model.processor",
    "collate": "magma_ros.model.processor",
    "load_tokenizer": "magma_ros.model.tokenizer",
    "build_llama3_tokenizer": "magma_ros.model.tokenizer",
}

__all__ = [
    "MagmaConfig",
    "MagmaModel",
    "MagmaOutput",
    "build_llama3_tokenizer",
    "collate",
    "load_tokenizer",
    "preprocess",
    "preprocess_robot",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'magma_ros.model' has no attribute '{name}'")
