"""Llama-family adapter: Llama, Mistral, Qwen2/Qwen3, SmolLM2 (pre-norm, RoPE, grouped-query attention)."""

from __future__ import annotations

import torch

from calm.adapters.base import (Adapter, EncoderMemory, StepContext, attend, padding_free_mask, pick,
                                 slot_mask)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [..., B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]                                   # [B, 1, T, D]
    return t * cos + rotate_half(t) * sin


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.layers = self.inner.layers
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size

    def embed(self, ids, positions):
        return self.inner.embed_tokens(ids)

    def context(self, positions, key_mask, start, encoder: EncoderMemory | None = None):
        return StepContext(positions=positions, mask=padding_free_mask(key_mask, start, positions.shape[1]),
                           start=start, rope=self._rope(positions))

    def static_context(self, positions, key_mask, slot, encoder: EncoderMemory | None = None):
        return StepContext(positions=positions, mask=slot_mask(key_mask), start=slot, rope=self._rope(positions))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D_head] of positions [B, T]."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        return self.inner.rotary_emb(probe, positions)

    def attn_input(self, layer, h):
        return self.layers[layer].input_layernorm(h)

    def _heads(self, proj: torch.nn.Module, x: torch.Tensor, n: int, norm: torch.nn.Module | None) -> torch.Tensor:
        b, t, _ = x.shape
        y = proj(x).view(b, t, n, self.head_dim)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)                                    # [B, n, T, D_head]

    def kv(self, layer, x, ctx):
        attn = self.layers[layer].self_attn
        k = self._heads(attn.k_proj, x, self.num_kv_heads, getattr(attn, "k_norm", None))
        v = self._heads(attn.v_proj, x, self.num_kv_heads, None)
        cos, sin = ctx.rope
        return apply_rope(k, cos, sin), v

    def finish_layer(self, layer, h, x, k, v, ctx, rows=None):
        block = self.layers[layer]
        attn = block.self_attn
        q = self._heads(attn.q_proj, x, self.num_heads, getattr(attn, "q_norm", None))
        cos, sin = ctx.rope
        q = apply_rope(q, pick(cos, rows), pick(sin, rows))
        h = h + attn.o_proj(attend(q, k, v, pick(ctx.mask, rows), attn.scaling, per_row=ctx.row_attention))
        return h + block.mlp(block.post_attention_layernorm(h))

    def kv_layers(self, first, x_source, ctx):
        """K, V [n, B, H_kv, T, D_head] of layers first..L-1 from one hidden state, as one batched matmul."""
        if getattr(self.layers[0].self_attn, "k_norm", None) is not None:
            return super().kv_layers(first, x_source, ctx)
        norm_w, kv_w, kv_b = self._stacked_kv()
        b, t, d = x_source.shape
        eps = self.layers[0].input_layernorm.variance_epsilon
        h = x_source.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x_source.dtype)    # [B, T, D]
        x = h.reshape(1, b * t, d) * norm_w[first:, None, :]                                # [n, B*T, D]
        kv = torch.bmm(x, kv_w[first:].transpose(1, 2))                                    # [n, B*T, 2*H_kv*D_head]
        if kv_b is not None:
            kv = kv + kv_b[first:, None, :]
        kv = kv.view(-1, b, t, 2, self.num_kv_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)  # [2, n, B, H_kv, T, D]
        cos, sin = ctx.rope
        return apply_rope(kv[0], cos, sin), kv[1]

    def _stacked_kv(self):
        """Every layer's input-norm weight [L, D], fused K|V projection [L, 2*H_kv*D_head, D] and bias, built once."""
        if getattr(self, "_stacked", None) is None:
            attn = [blk.self_attn for blk in self.layers]
            norms = torch.stack([blk.input_layernorm.weight.detach() for blk in self.layers])
            kv = torch.stack([torch.cat([a.k_proj.weight, a.v_proj.weight]).detach() for a in attn])
            bias = None
            if attn[0].k_proj.bias is not None:
                bias = torch.stack([torch.cat([a.k_proj.bias, a.v_proj.bias]).detach() for a in attn])
            self._stacked = (norms, kv, bias)
        return self._stacked

    def final_norm(self, h):
        return self.inner.norm(h)
