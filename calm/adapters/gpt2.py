"""GPT-2 adapter: pre-LayerNorm blocks, learned absolute positions, fused Conv1D q|k|v projection.

`scale_attn_by_inverse_layer_idx` divides layer i's attention scale by i + 1. `reorder_and_upcast_attn`
computes attention in float32 for half-precision models (the point of transformers' eager
implementation of it; its SDPA path ignores the flag); in float32 it changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from calm.adapters.base import Adapter, EncoderMemory, StepContext, attend, padding_free_mask, pick
from calm.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(
                "calm's GPT-2 adapter does not support GPT-2 models with add_cross_attention=True "
                "(a decoder of an encoder-decoder model)"
            )
        if not hasattr(model, "transformer") or model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head; load it as a GPT2LMHeadModel")
        super().__init__(model)
        self.inner: Any = cast(Any, model.transformer)  # transformers' modules: see Adapter
        self.layers: Any = self.inner.h
        self.num_layers = len(self.layers)
        self.num_heads = cfg.n_head
        self.num_kv_heads = cfg.n_head
        self.hidden_size = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.n_positions
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        by_layer = getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        self.scales = tuple(scale / (i + 1) if by_layer else scale for i in range(self.num_layers))
        self.upcast = bool(getattr(cfg, "reorder_and_upcast_attn", False))

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.inner.wte(ids) + self.inner.wpe(positions)

    def context(
        self,
        positions: torch.Tensor,
        key_mask: torch.Tensor,
        start: int,
        encoder: EncoderMemory | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> StepContext:
        return StepContext(
            positions=positions, mask=padding_free_mask(key_mask, start, positions.shape[1]), start=start
        )

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].ln_1(h)

    def _project(self, layer: int, x: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Columns first..first+count-1 (in units of hidden_size) of c_attn(x), as heads [B, n*H, T, D_head]."""
        c_attn = self.layers[layer].attn.c_attn  # Conv1D: x @ weight + bias
        d = self.hidden_size
        cols = slice(first * d, (first + count) * d)
        b, t, _ = x.shape
        y = torch.addmm(c_attn.bias[cols], x.reshape(b * t, d), c_attn.weight[:, cols])
        return y.view(b, t, count * self.num_heads, self.head_dim).transpose(1, 2)

    def kv(
        self, layer: int, x: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._project(layer, x, 1, 2)  # k | v
        return kv[:, : self.num_heads], kv[:, self.num_heads :]

    def finish_layer(
        self,
        layer: int,
        h: torch.Tensor,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: StepContext,
        rows: torch.Tensor | None = None,
        q: torch.Tensor | None = None,  # never made: this family's qkv is kv's
    ) -> torch.Tensor:
        block = self.layers[layer]
        q = self._project(layer, x, 0, 1)
        if self.upcast and q.dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        out = attend(q, k, v, pick(ctx.mask, rows), self.scales[layer], per_row=ctx.row_attention, ends=ctx.query_ends)
        out = out.to(h.dtype)
        h = h + block.attn.c_proj(out)
        return h + block.mlp(block.ln_2(h))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.ln_f(h)
