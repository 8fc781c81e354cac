"""Llama-family adapter: Llama, Mistral, Qwen2/Qwen3, SmolLM2 (pre-norm, RoPE, grouped-query attention)."""

from __future__ import annotations

import torch

from calm.adapters.base import Adapter, EncoderMemory, StepContext, attend, attention_mask, pick


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
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
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        cos, sin = self.inner.rotary_emb(probe, positions)
        return StepContext(positions=positions, mask=attention_mask(key_mask, start, positions.shape[1]),
                           start=start, rope=(cos, sin))

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
        h = h + attn.o_proj(attend(q, k, v, pick(ctx.mask, rows), attn.scaling))
        return h + block.mlp(block.post_attention_layernorm(h))

    def final_norm(self, h):
        return self.inner.norm(h)

    def lm_head(self, h):
        return self.model.lm_head(h)
