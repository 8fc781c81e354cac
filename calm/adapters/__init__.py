"""Adapters: the one place per architecture family that knows transformers' model internals.

May import calm.errors only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from calm.adapters.base import Adapter, EncoderMemory, StepContext
from calm.adapters.gemma import GemmaAdapter
from calm.adapters.gpt2 import GPT2Adapter
from calm.adapters.llama import LlamaAdapter
from calm.adapters.llama_like import GraniteAdapter, Olmo2Adapter, Phi3Adapter
from calm.adapters.neox import GPTNeoXAdapter, StableLmAdapter
from calm.adapters.t5 import T5Adapter
from calm.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTERS: list[type[Adapter]] = [
    LlamaAdapter,
    GemmaAdapter,
    Phi3Adapter,
    Olmo2Adapter,
    GraniteAdapter,
    GPTNeoXAdapter,
    StableLmAdapter,
    GPT2Adapter,
    T5Adapter,
]


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for a loaded transformers model, chosen by its config.model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(f"no calm adapter for model_type {model_type!r}; supported: {', '.join(supported)}")


__all__ = ["Adapter", "EncoderMemory", "StepContext", "adapter_for"]
