"""Llama-family adapter: Llama, Mistral, Qwen2/Qwen3, SmolLM2/SmolLM3 (pre-norm, RoPE, grouped-query
attention; Mistral's and Qwen's sliding-window layers, SmolLM3's layers without RoPE)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from calm.adapters.base import (
    Adapter,
    EncoderMemory,
    StepContext,
    attend,
    attention_mask,
    padding_free_mask,
    pick,
    slot_mask,
)
from calm.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [..., B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    return t * cos + rotate_half(t) * sin


def layer_windows(cfg: Any, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding attention window (None: full causal attention), as transformers masks it.

    MistralModel masks every layer with config.sliding_window. Qwen2/Qwen3/SmolLM3 mask the layers
    that config.layer_types marks "sliding_attention" (their configs derive it from use_sliding_window
    and max_window_layers, or SmolLM3's no-RoPE layers); Llama has no sliding window."""
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral":
        return (window,) * num_layers
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(f"calm's Llama-family adapter does not support layer_types {unknown}")
    if "sliding_attention" in types and not window:
        raise UnsupportedModelError("layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(window if kind == "sliding_attention" else None for kind in types)


def rope_layers(cfg: Any, num_layers: int) -> tuple[bool, ...]:
    """Whether each layer applies RoPE: SmolLM3's no_rope_layers (1 = RoPE, 0 = none); others always."""
    flags = getattr(cfg, "no_rope_layers", None)
    return tuple(bool(f) for f in flags) if flags is not None else (True,) * num_layers


def rope_tables(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D_head] of the context; a Llama-family context always has them (LlamaAdapter.context)."""
    if ctx.rope is None:
        raise ValueError("a Llama-family layer needs the rotary tables of a LlamaAdapter context")
    return ctx.rope


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = model.config
        if not hasattr(model, "model") or model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head; load it as a ...ForCausalLM model")
        super().__init__(model)
        self.inner: Any = model.model  # transformers' modules: see Adapter
        self.layers: Any = self.inner.layers
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.windows = layer_windows(cfg, self.num_layers)
        self.window = next((w for w in self.windows if w is not None), None)
        self.rope_layers = rope_layers(cfg, self.num_layers)
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # see _stacked_kv

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(ids)

    def context(
        self,
        positions: torch.Tensor,
        key_mask: torch.Tensor,
        start: int,
        encoder: EncoderMemory | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> StepContext:
        cos, sin = self._rope_tables(positions)
        t = positions.shape[1]
        window_mask = padding_free_mask(key_mask, start, t, self.window) if self.window is not None else None
        if self.window is not None and slot_positions is not None:  # holes: window by position, not slot
            reach = slot_positions[:, None, None, : start + t] > positions[:, None, :, None] - self.window
            own = (
                torch.arange(start + t, device=positions.device)
                == torch.arange(start, start + t, device=positions.device)[:, None]
            )
            window_mask = attention_mask(key_mask, start, t) & (reach | own)  # [B, 1, T, S]
        return StepContext(
            positions=positions,
            mask=padding_free_mask(key_mask, start, t),
            start=start,
            rope=(cos, sin),
            window=self.window,
            window_mask=window_mask,
        )

    def static_context(
        self, positions: torch.Tensor, key_mask: torch.Tensor, slot: torch.Tensor, encoder: EncoderMemory | None = None
    ) -> StepContext:
        if self.window is not None:
            raise UnsupportedModelError(
                "the static engine does not implement sliding-window attention yet; use engine='dynamic' for this model"
            )
        return StepContext(positions=positions, mask=slot_mask(key_mask), start=slot, rope=self._rope_tables(positions))

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D_head] of positions [B, T]."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        return self.inner.rotary_emb(probe, positions)

    def _rope(self, layer: int, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(t, cos, sin) if self.rope_layers[layer] else t

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].input_layernorm(h)

    def _heads(self, proj: torch.nn.Module, x: torch.Tensor, n: int, norm: torch.nn.Module | None) -> torch.Tensor:
        b, t, _ = x.shape
        y = proj(x).view(b, t, n, self.head_dim)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)  # [B, n, T, D_head]

    def kv(self, layer: int, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.layers[layer].self_attn
        k = self._heads(attn.k_proj, x, self.num_kv_heads, getattr(attn, "k_norm", None))
        v = self._heads(attn.v_proj, x, self.num_kv_heads, None)
        cos, sin = rope_tables(ctx)
        return self._rope(layer, k, cos, sin), v

    def finish_layer(
        self,
        layer: int,
        h: torch.Tensor,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: StepContext,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        block = self.layers[layer]
        attn = block.self_attn
        q = self._heads(attn.q_proj, x, self.num_heads, getattr(attn, "q_norm", None))
        cos, sin = rope_tables(ctx)
        q = self._rope(layer, q, pick(cos, rows), pick(sin, rows))
        window = self.windows[layer]
        mask = ctx.mask if window is None else ctx.window_mask
        out = attend(q, k, v, pick(mask, rows), attn.scaling, per_row=ctx.row_attention, window=window)
        h = h + attn.o_proj(out)
        return h + block.mlp(block.post_attention_layernorm(h))

    def kv_layers(self, first: int, x_source: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, B, H_kv, T, D_head] of layers first..L-1 from one hidden state, as one batched matmul."""
        if getattr(self.layers[0].self_attn, "k_norm", None) is not None:
            return super().kv_layers(first, x_source, ctx)
        norm_w, kv_w, kv_b = self._stacked_kv()
        b, t, d = x_source.shape
        eps = self.layers[0].input_layernorm.variance_epsilon
        h = x_source.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x_source.dtype)  # [B, T, D]
        x = h.reshape(1, b * t, d) * norm_w[first:, None, :]  # [n, B*T, D]
        kv = torch.bmm(x, kv_w[first:].transpose(1, 2))  # [n, B*T, 2*H_kv*D_head]
        if kv_b is not None:
            kv = kv + kv_b[first:, None, :]
        kv = kv.view(-1, b, t, 2, self.num_kv_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)  # [2, n, B, H_kv, T, D]
        cos, sin = rope_tables(ctx)
        k = apply_rope(kv[0], cos, sin)
        if not all(self.rope_layers[first:]):
            no_rope = torch.tensor([not r for r in self.rope_layers[first:]], device=k.device)
            k = torch.where(no_rope[:, None, None, None, None], kv[0], k)
        return k, kv[1]

    def _stacked_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every layer's input-norm weight [L, D], fused K|V projection [L, 2*H_kv*D_head, D] and bias, built once."""
        if self._stacked is None:
            attn = [blk.self_attn for blk in self.layers]
            norms = torch.stack([blk.input_layernorm.weight.detach() for blk in self.layers])
            kv = torch.stack([torch.cat([a.k_proj.weight, a.v_proj.weight]).detach() for a in attn])
            bias = None
            if attn[0].k_proj.bias is not None:
                bias = torch.stack([torch.cat([a.k_proj.bias, a.v_proj.bias]).detach() for a in attn])
            self._stacked = (norms, kv, bias)
        return self._stacked

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(h)
