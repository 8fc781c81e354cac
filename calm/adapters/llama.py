"""Llama-family adapter: Llama, Mistral, Qwen2/Qwen3, SmolLM2/SmolLM3 (pre-norm, RoPE, grouped-query
attention; Mistral's and Qwen's sliding-window layers, SmolLM3's layers without RoPE).

LlamaAdapter is also the shared code of every Llama-like family (calm.adapters.gemma, .neox,
.llama_like): each declares its numeric differences as Traits and its structural ones by
overriding a hook (_q, _kv, _qkv_weights, _qk_norms, _attn_out, _residual, _layer_rope, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from calm.adapters.base import (
    Adapter,
    EncoderMemory,
    StepContext,
    attend,
    attention_mask,
    joint,
    padding_free_mask,
    pick,
    project,
    slot_mask,
)
from calm.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Traits:
    """How a Llama-like family's numerics differ from Llama's (the defaults: as Llama)."""

    embedding_multiplier: float = 1.0  # Granite: embeddings times this
    residual_multiplier: float = 1.0  # Granite: each sublayer's output times this before its residual add
    attn_softcap: float | None = None  # Gemma 2: attention scores s -> cap * tanh(s / cap)
    logits_divisor: float = 1.0  # Granite: logits / logits_scaling
    logit_softcap: float | None = None  # Gemma 2/3: logits z -> cap * tanh(z / cap)
    window_everywhere: bool = False  # Mistral, Phi-3: config.sliding_window masks every layer
    post_norms: bool = False  # Gemma 2/3, OLMo-2: sublayer outputs normalised before their residual add
    qk_norm_over_projection: bool = False  # OLMo-2: q/k norms over the whole projection, before the head split


class LogitHead(torch.nn.Module):
    """The LM head and its family's fixed logit transform (Granite's division, Gemma's tanh softcap).

    Not an nn.Linear, so calm.engine.lm_head's certified bfloat16 argmax is not used: a softcap that
    saturates can tie logits the raw head keeps apart, and the argmax must be the model's own."""

    def __init__(self, head: torch.nn.Module, divisor: float, softcap: float | None) -> None:
        super().__init__()
        self.head, self.divisor, self.softcap = head, divisor, softcap

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [..., B, H, T, D]; cos, sin [B, T, R], R <= D: the first R dims rotate, the rest pass (partial rotary)."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R]
    r = cos.shape[-1]
    if r == t.shape[-1]:
        return t * cos + rotate_half(t) * sin
    rot = t[..., :r]
    return torch.cat((rot * cos + rotate_half(rot) * sin, t[..., r:]), dim=-1)


def ready_rope(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] as apply_ready_rope reads them, built once per forward: [B, 1, T, D] each, the sine's
    first half negated (so rotate_half becomes one roll)."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def apply_ready_rope(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with full-width tables from ready_rope, bit for bit: rotate_half(t) * sin is
    roll(t) * signed_sin, since -a * b == a * -b exactly; four ops instead of nine."""
    return t * cos + t.roll(t.shape[-1] // 2, dims=-1) * signed_sin


def layer_windows(cfg: Any, num_layers: int, everywhere: bool = False) -> tuple[int | None, ...]:
    """Each layer's sliding attention window (None: full causal attention), as transformers masks it.

    Mistral and Phi-3 (`everywhere`) mask every layer with config.sliding_window. The others mask
    the layers that config.layer_types marks "sliding_attention" (Qwen2/Qwen3/SmolLM3 derive it from
    use_sliding_window and max_window_layers or the no-RoPE layers; Gemma 2/3 alternate local and
    global layers); Llama has no sliding window."""
    window = getattr(cfg, "sliding_window", None)
    if everywhere:
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


READY_ROPE = "ready_rope"  # StepContext.extras: the context's own tables through ready_rope (decode contexts)


def rope_tables(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, R] of the context; a Llama-family context always has them (LlamaAdapter.context)."""
    if ctx.rope is None:
        raise ValueError("a Llama-family layer needs the rotary tables of a LlamaAdapter context")
    return ctx.rope


class LlamaAdapter(Adapter):
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    projections_called: ClassVar[bool] = True
    inner_name: ClassVar[str] = "model"  # the ...ForCausalLM attribute holding the decoder stack
    final_norm_name: ClassVar[str] = "norm"
    fuse_kv_layers: ClassVar[bool] = True  # kv_layers as one batched matmul: Llama's RMSNorm and projections only

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = model.config
        if not hasattr(model, self.inner_name) or model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head; load it as a ...ForCausalLM model")
        super().__init__(model)
        self.traits = self.read_traits(cfg)
        self.inner: Any = getattr(model, self.inner_name)  # transformers' modules: see Adapter
        self.layers: Any = self.inner.layers
        self.blocks: tuple[Any, ...] = tuple(self.layers)  # indexing a ModuleList costs microseconds, 30 times a token
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.windows = layer_windows(cfg, self.num_layers, self.traits.window_everywhere)
        self.window = next((w for w in self.windows if w is not None), None)
        self.rope_layers = rope_layers(cfg, self.num_layers)
        head, t = model.get_output_embeddings(), self.traits
        plain = t.logits_divisor == 1.0 and t.logit_softcap is None
        self._head = head if plain else LogitHead(head, t.logits_divisor, t.logit_softcap)
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # see _stacked_kv

    @classmethod
    def read_traits(cls, cfg: Any) -> Traits:
        """The family's Traits, read from its config (and refusing what calm does not implement)."""
        return Traits(window_everywhere=cfg.model_type == "mistral")

    @property
    def head_module(self) -> torch.nn.Module:
        return self._head

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.inner.get_input_embeddings()(ids)
        m = self.traits.embedding_multiplier
        return h if m == 1.0 else h * m

    def context(
        self,
        positions: torch.Tensor,
        key_mask: torch.Tensor,
        start: int,
        encoder: EncoderMemory | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> StepContext:
        t = positions.shape[1]
        window_mask = padding_free_mask(key_mask, start, t, self.window) if self.window is not None else None
        if self.window is not None and slot_positions is not None:  # holes: window by position, not slot
            reach = slot_positions[:, None, None, : start + t] > positions[:, None, :, None] - self.window
            own = (
                torch.arange(start + t, device=positions.device)
                == torch.arange(start, start + t, device=positions.device)[:, None]
            )
            window_mask = attention_mask(key_mask, start, t) & (reach | own)  # [B, 1, T, S]
        rope = self._rope_tables(positions)
        return StepContext(
            positions=positions,
            mask=padding_free_mask(key_mask, start, t),
            start=start,
            rope=rope,
            window=self.window,
            window_mask=window_mask,
            extras={**self._extras(positions), READY_ROPE: ready_rope(*rope)},
        )

    def static_context(
        self, positions: torch.Tensor, key_mask: torch.Tensor, slot: torch.Tensor, encoder: EncoderMemory | None = None
    ) -> StepContext:
        if self.window is not None:
            raise UnsupportedModelError(
                "the static engine does not implement sliding-window attention yet; use engine='dynamic' for this model"
            )
        return StepContext(
            positions=positions,
            mask=slot_mask(key_mask),
            start=slot,
            rope=self._rope_tables(positions),
            extras=self._extras(positions),
        )

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, R] of positions [B, T] (R < D_head: partial rotary)."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        return self.inner.rotary_emb(probe, positions)

    def _extras(self, positions: torch.Tensor) -> dict:
        """Family-specific per-forward tensors of a context (Gemma 3: its local layers' rotary tables)."""
        return {}

    def _layer_rope(self, layer: int, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables layer `layer` applies; None: no RoPE in that layer (SmolLM3)."""
        return rope_tables(ctx) if self.rope_layers[layer] else None

    def _rope(self, layer: int, t: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None) -> torch.Tensor:
        tables = self._layer_rope(layer, ctx)
        if tables is None:
            return t
        ready = ctx.extras.get(READY_ROPE)  # None in a static (compiled) context
        if ready is not None and tables is ctx.rope and ready[0].shape[-1] == t.shape[-1]:
            return apply_ready_rope(t, pick(ready[0], rows), pick(ready[1], rows))
        return apply_rope(t, pick(tables[0], rows), pick(tables[1], rows))

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[layer].input_layernorm(h)

    def _attention(self, layer: int) -> Any:
        return self.blocks[layer].self_attn

    def _qkv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A fused q|k|v projection's weight [(H + 2*H_kv)*D_head, D] and bias, rows in that order; None: separate."""
        return None

    def _q(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The query projection [B, T, H*D_head] of x [B, T, D]."""
        fused = self._qkv_weights(layer)
        if fused is None:
            return self._attention(layer).q_proj(x)
        w, b = fused
        n = self.num_heads * self.head_dim
        return F.linear(x, w[:n], None if b is None else b[:n])

    def _kv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value projections [B, T, H_kv*D_head] of x [B, T, D]."""
        fused = self._qkv_weights(layer)
        if fused is None:
            attn = self._attention(layer)
            k, v = project((attn.k_proj, attn.v_proj), x)
            return k, v
        w, b = fused
        n = self.num_heads * self.head_dim
        kv = F.linear(x, w[n:], None if b is None else b[n:])
        k, v = kv.split(self.num_kv_heads * self.head_dim, dim=-1)
        return k, v

    def _qk_norms(self, layer: int) -> tuple[Any, Any]:
        """The query and key norms (Qwen3, Gemma 3, OLMo-2), or None."""
        attn = self._attention(layer)
        return getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

    def _heads(self, y: torch.Tensor, n: int, norm: Any) -> torch.Tensor:
        """A projection y [B, T, n*D_head] as heads [B, n, T, D_head], through its q/k norm if any."""
        b, t, _ = y.shape
        over_projection = norm is not None and self.traits.qk_norm_over_projection
        if over_projection:
            y = norm(y)
        y = y.view(b, t, n, self.head_dim).transpose(1, 2)
        return norm(y) if norm is not None and not over_projection else y

    def kv(
        self, layer: int, x: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._kv(layer, x)
        k = self._heads(k, self.num_kv_heads, self._qk_norms(layer)[1])
        return self._rope(layer, k, ctx, rows), self._heads(v, self.num_kv_heads, None)

    def qkv(
        self, layer: int, x: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        attn = self._attention(layer)
        run = joint((attn.q_proj, attn.k_proj, attn.v_proj)) if self._qkv_weights(layer) is None else None
        if run is None:
            return super().qkv(layer, x, ctx, rows)
        q, k, v = run(x)
        q_norm, k_norm = self._qk_norms(layer)
        q = self._rope(layer, self._heads(q, self.num_heads, q_norm), ctx, rows)
        k = self._rope(layer, self._heads(k, self.num_kv_heads, k_norm), ctx, rows)
        return q, k, self._heads(v, self.num_kv_heads, None)

    def finish_layer(
        self,
        layer: int,
        h: torch.Tensor,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: StepContext,
        rows: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if q is None:
            q = self._heads(self._q(layer, x), self.num_heads, self._qk_norms(layer)[0])
            q = self._rope(layer, q, ctx, rows)
        window = self.windows[layer]
        mask = ctx.mask if window is None else ctx.window_mask
        scale = self._attention(layer).scaling
        out = attend(
            q,
            k,
            v,
            pick(mask, rows),
            scale,
            per_row=ctx.row_attention,
            window=window,
            softcap=self.traits.attn_softcap,
            ends=ctx.query_ends,
        )
        return self._residual(layer, h, x, self._attn_out(layer, out))

    def _attn_out(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The attention output projection of out [B, T, H*D_head]."""
        return self._attention(layer).o_proj(out)

    def _residual(self, layer: int, h: torch.Tensor, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The layer output from its input h, normalised input x and attention output o, all [B, T, D]."""
        block = self.blocks[layer]
        if self.traits.post_norms:
            h = h + block.post_attention_layernorm(o)
            pre = getattr(block, "pre_feedforward_layernorm", None)  # Gemma 2/3 have it, OLMo-2 not
            return h + block.post_feedforward_layernorm(block.mlp(h if pre is None else pre(h)))
        m = self.traits.residual_multiplier
        h = h + (o if m == 1.0 else o * m)
        f = self._mlp(block.mlp, block.post_attention_layernorm(h))
        return h + (f if m == 1.0 else f * m)

    @staticmethod
    def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP down(act(gate(x)) * up(x)), with gate and up in one call where they run jointly
        (calm.adapters.base.project); the module itself otherwise (fused or unusual MLPs included)."""
        gate = getattr(mlp, "gate_proj", None)
        run = None if gate is None else joint((gate, mlp.up_proj))
        if run is None:
            return mlp(x)
        g, u = run(x)
        return mlp.down_proj(mlp.act_fn(g) * u)

    def kv_layers(self, first: int, x_source: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, B, H_kv, T, D_head] of layers first..L-1 from one hidden state, as one batched matmul."""
        attn = self.layers[0].self_attn if self.fuse_kv_layers else None
        plain = all(type(getattr(attn, p, None)) is torch.nn.Linear for p in ("k_proj", "v_proj"))
        if not plain or getattr(attn, "k_norm", None) is not None:
            return super().kv_layers(first, x_source, ctx)  # layer by layer, through the modules as they are
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
        return getattr(self.inner, self.final_norm_name)(h)
