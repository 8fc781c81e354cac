"""Phi-3, OLMo-2 and Granite: Llama with one or two declared differences each.

- Phi-3: one fused q|k|v projection (qkv_proj; the K/V of a skipped layer reads its k|v rows only)
  and a fused gate|up MLP (its own module); partial rotary (partial_rotary_factor) through its
  rotary tables; config.sliding_window, when set, masks every layer (as Mistral).
- OLMo-2: no norm before attention or MLP; each sublayer's output normalised before its residual
  add; q/k RMSNorms over the whole projection, before the split into heads.
- Granite: embeddings times embedding_multiplier, each sublayer's output times residual_multiplier,
  attention scaled by attention_multiplier (its attention module's `scaling`), logits divided by
  logits_scaling (exit heads included, so the softmax measure reads the model's own distribution).
"""

from __future__ import annotations

from typing import Any

import torch

from calm.adapters.llama import LlamaAdapter, Traits


class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)
    projections_called = False  # its fused qkv_proj's weight is read (_qkv_weights)
    fuse_kv_layers = False

    @classmethod
    def read_traits(cls, cfg: Any) -> Traits:
        return Traits(window_everywhere=True)

    def _qkv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        proj = self._attention(layer).qkv_proj
        return proj.weight, proj.bias


class Olmo2Adapter(LlamaAdapter):
    model_types = ("olmo2",)
    fuse_kv_layers = False

    @classmethod
    def read_traits(cls, cfg: Any) -> Traits:
        return Traits(post_norms=True, qk_norm_over_projection=True)

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return h  # OLMo-2 normalises sublayer outputs, not inputs


class GraniteAdapter(LlamaAdapter):
    model_types = ("granite",)

    @classmethod
    def read_traits(cls, cfg: Any) -> Traits:
        return Traits(
            embedding_multiplier=float(cfg.embedding_multiplier),
            residual_multiplier=float(cfg.residual_multiplier),
            logits_divisor=float(cfg.logits_scaling),
        )
