"""Gemma 1, 2 and 3 (text) as Llama-like models.

What the shared Llama code reads from transformers' own modules: the embeddings scaled by
sqrt(hidden) (Gemma's scaled embedding module), RMSNorm with the (1 + w) weight (Gemma's norm
modules), the query_pre_attn_scalar attention scale (the attention module's `scaling`), Gemma 3's
q/k norms. What this adapter declares:
- Gemma 2 and 3 normalise each sublayer's output before its residual add, and the MLP's input;
- Gemma 2 caps attention scores (attn_logit_softcapping) and both cap the logits
  (final_logit_softcapping), exit heads included, so the softmax measure reads the model's own
  distribution; Gemma 3's transformers attention ignores attn_logit_softcapping, and so does calm;
- Gemma 2 and 3 alternate sliding-window (local) and global layers (config.layer_types), and
  Gemma 3's local layers take their own RoPE base (rope_parameters["sliding_attention"]).
Bidirectional attention (use_bidirectional_attention, an embedding-model setting) is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from calm.adapters.base import StepContext
from calm.adapters.llama import LlamaAdapter, Traits
from calm.errors import UnsupportedModelError


class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")
    fuse_kv_layers = False

    @classmethod
    def read_traits(cls, cfg: Any) -> Traits:
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"calm does not support {cfg.model_type} with use_bidirectional_attention=True "
                "(a bidirectional encoder, not a causal decoder)"
            )
        if cfg.model_type == "gemma":
            return Traits()
        return Traits(
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None) if cfg.model_type == "gemma2" else None,
            logit_softcap=getattr(cfg, "final_logit_softcapping", None),
            post_norms=True,
        )

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        cfg = model.config
        # Gemma 3: each layer's rotary table kind (its layer type); None: one table for all layers
        self._rope_types = tuple(cfg.layer_types) if cfg.model_type == "gemma3_text" else None

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        types = self._rope_types
        if types is None:
            return super()._rope_tables(positions)
        return self._typed_rope(positions, types[0])

    def _typed_rope(self, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D_head] of Gemma 3's `kind` layers ("sliding_attention" or "full_attention")."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        return self.inner.rotary_emb(probe, positions, kind)

    def _extras(self, positions: torch.Tensor) -> dict:
        types = self._rope_types
        if types is None:
            return {}
        return {"rope": {kind: self._typed_rope(positions, kind) for kind in sorted(set(types))}}

    def _layer_rope(self, layer: int, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        types = self._rope_types
        return super()._layer_rope(layer, ctx) if types is None else ctx.extras["rope"][types[layer]]
