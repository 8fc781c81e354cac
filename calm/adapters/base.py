"""The contract between a transformers architecture and calm's decode loop.

An adapter splits one decoder layer into the pieces early exit needs: the input norm, the
K/V projection (run for every row, which is what fills a skipped layer's cache by state
propagation) and the rest of the layer (run only for rows that have not exited). Adapters are
the only modules that touch transformers' model internals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, overload

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class EncoderMemory:
    """What an encoder-decoder's decoder attends to, computed once per generation."""

    cross_k: tuple[torch.Tensor, ...]  # per layer [B, H, T_enc, D_head]
    cross_v: tuple[torch.Tensor, ...]  # per layer [B, H, T_enc, D_head]
    mask: torch.Tensor  # [B, T_enc] bool


@dataclass(frozen=True)
class RowAttention:
    """Self-attention for some rows of a batch only, each over its own view of the cache.

    Query j attends cache row rows[j] over slots starts[j]..S-1: left padding is sliced away, so
    no mask is needed and no keys or values are copied. Queries not listed get zeros (rows that
    exited, whose layer output is dropped). Costs one attention call per listed row.
    """

    queries: tuple[int, ...]  # indices into the query batch
    rows: tuple[int, ...]  # the cache row each of them reads
    starts: tuple[int, ...]  # that row's first real slot


@dataclass(frozen=True)
class StepContext:
    """Per-forward tensors shared by all layers: positions, attention mask, rotary tables."""

    positions: torch.Tensor  # [B, T] long
    mask: torch.Tensor | None  # [B, 1, T, S] bool, True = may attend; None: causal, no padding
    start: int | torch.Tensor  # cache slot of the first of the T new tokens (static path: long [1])
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [B, T, D_head]
    position_bias: torch.Tensor | None = None  # [1, H, T, S] (T5)
    encoder: EncoderMemory | None = None
    extras: dict = field(default_factory=dict)
    row_attention: RowAttention | None = None  # None: every query row attends at once
    # one row's T > 1 new tokens, each attending slots 0..query_ends[t]-1 and no others (a verified chain, no
    # holes): attention runs query by query without a mask, bit for bit what a one-token step computes
    query_ends: tuple[int, ...] | None = None
    window: int | None = None  # sliding-window layers: keys within `window` slots
    window_mask: torch.Tensor | None = None  # their [B, 1, T, S] mask; None: every key is in reach


@overload
def pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor: ...
@overload
def pick(t: None, rows: torch.Tensor | None) -> None: ...
@overload
def pick(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None: ...
def pick(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Rows of a batch-first tensor; all of them when rows is None."""
    return t if rows is None or t is None else t.index_select(0, rows)


def attention_mask(key_mask: torch.Tensor, start: int, num_new: int, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, S] causal mask over slots 0..S-1 for T new tokens at slots start.., padding removed;
    with a sliding `window`, a query sees only the keys less than `window` slots before it (as
    transformers' sliding-window mask: a row's real tokens fill consecutive slots, so slot distance
    is position distance).

    A padding query always sees itself, so no softmax row is empty (an empty row gives NaN,
    which would leak through zero-weighted values into real rows).
    """
    end = start + num_new
    slots = torch.arange(end, device=key_mask.device)
    query_slots = torch.arange(start, end, device=key_mask.device)
    causal = slots[None, :] <= query_slots[:, None]  # [T, S]
    if window is not None:
        causal &= slots[None, :] > query_slots[:, None] - window
    allowed = causal[None] & key_mask[:, None, :end]  # [B, T, S]
    allowed |= slots[None, None, :] == query_slots[None, :, None]
    return allowed[:, None]


def padding_free_mask(
    key_mask: torch.Tensor, start: int, num_new: int, window: int | None = None
) -> torch.Tensor | None:
    """Like attention_mask, but None when no row has padding and the new tokens start at slot 0 (a
    plain causal prompt) or are a single decode token, and every key is within the window: attention
    then needs no mask (one host sync)."""
    in_reach = window is None or start + num_new <= window
    if in_reach and (start == 0 or num_new == 1) and bool(key_mask[:, : start + num_new].all()):
        return None
    return attention_mask(key_mask, start, num_new, window)


def slot_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, S] mask of one decode query over every slot of the cache: the static path's fixed
    shape. Slots not written yet are False in key_mask, so no causal part is needed."""
    return key_mask[:, None, None, :]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    bias: torch.Tensor | None = None,
    per_row: RowAttention | None = None,
    window: int | None = None,
    softcap: float | None = None,
    ends: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, T, H*D].

    With ends (B = 1, no window or bias), query t attends keys 0..ends[t]-1, one call each without a mask:
    exactly what a one-token step computes for it. One masked call over all T rounds differently where the
    keys' count crosses a vector width (SDPA's CPU kernel: 1e-7 apart, enough to flip a bfloat16 rounding).

    With per_row, k and v are the whole batch's cache and only the listed queries attend (see
    RowAttention); mask is then not used (the slices hold real slots only, and for a sliding
    `window` only the last `window` of them: per-row attention is for one decode query, T = 1).
    With softcap, scores s become softcap * tanh(s / softcap) before the softmax (Gemma 2)."""
    if ends is not None and window is None and bias is None and q.shape[0] == 1 and per_row is None:
        return torch.cat([_attend_batch(q[:, :, t : t + 1], k[:, :, :e], v[:, :, :e], None, scale, None, softcap)
                          for t, e in enumerate(ends)], dim=1)  # fmt: skip
    if per_row is None:
        return _attend_batch(q, k, v, mask, scale, bias, softcap)
    b, h, t, d = q.shape
    if window is not None and t != 1:
        raise ValueError(f"per-row attention with a sliding window takes one query per row, got {t}")
    first_in_reach = 0 if window is None else k.shape[2] - window
    out = q.new_zeros(b, t, h * d)
    for j, r, s in zip(per_row.queries, per_row.rows, per_row.starts):
        s = max(s, first_in_reach)
        row_bias = None if bias is None else bias[..., s:]
        out[j] = _attend_batch(q[j : j + 1], k[r : r + 1, :, s:], v[r : r + 1, :, s:], None, scale, row_bias, softcap)[
            0
        ]
    return out


def joint(modules: tuple[torch.nn.Module, ...]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None:
    """One call running `modules` (projections of one input: K and V, gate and up) together, where the first
    module's type offers it (a `joint(modules)` method; calm's native 4-bit linears stack their blocks); None
    where it does not."""
    offer = getattr(modules[0], "joint", None)
    return offer(modules) if callable(offer) else None


def project(modules: tuple[torch.nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of `modules` applied to x: jointly where they run so (`joint`), else one by one."""
    run = joint(modules)
    return run(x) if run is not None else tuple(m(x) for m in modules)


FOLD_MAX_QUERIES = 8  # up to this many masked queries per row, grouped-query attention folds heads (_attend_grouped)


def _attend_batch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    bias: torch.Tensor | None,
    softcap: float | None = None,
) -> torch.Tensor:
    if softcap is not None:
        return _attend_softcapped(q, k, v, mask, scale, softcap)
    if bias is not None:
        mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    causal = mask is None and t > 1  # None: no padding (see padding_free_mask)
    if h != kv_heads and (t == 1 or (mask is not None and mask.shape[1] == 1 and t <= FOLD_MAX_QUERIES)):
        return _attend_grouped(q, k, v, mask, scale)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, is_causal=causal, enable_gqa=h != kv_heads
    )
    return out.transpose(1, 2).reshape(b, t, h * d)


def _attend_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """Grouped-query attention for a few queries per row (a decode token, or a verified draft): a group's
    query heads become query rows over their shared K/V, so each K/V head is read once instead of once
    per query head (SDPA's enable_gqa takes a slower path on the CPU). q [B, H, T, D], k/v [B, H_kv, S, D],
    mask [B, 1, T, S] or None (T = 1) -> [B, T, H*D]."""
    b, h, t, d = q.shape
    kv_heads, group = k.shape[1], h // k.shape[1]
    if mask is not None and t > 1:  # each group row (head j, query i) keeps query i's mask
        mask = (
            mask.expand(-1, -1, t, -1)[:, :, None]
            .expand(-1, -1, group, -1, -1)
            .reshape(mask.shape[0], 1, group * t, -1)
        )
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, group * t, d), k, v, attn_mask=mask, scale=scale)
    return out.view(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)  # [B, H_kv, G*T, D] -> [B, T, H*D]


def _attend_softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None, softcap: float
) -> torch.Tensor:
    """Attention with tanh-capped scores, in the order of transformers' eager attention (which Gemma 2
    runs: SDPA cannot cap scores). q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, T, H*D]."""
    b, h, t, d = q.shape
    k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))  # [B, H, S, D]
    scores = torch.matmul(q, k.transpose(2, 3)) * (d**-0.5 if scale is None else scale)  # [B, H, T, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and t > 1:  # causal, no padding (see padding_free_mask)
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2).reshape(b, t, h * d)


class Adapter(ABC):
    """One transformers architecture family seen as a stack of exit-able layers.

    Subclasses hold the model's inner modules (layers, norms, embeddings) as Any: they are reached by
    attribute, which torch types as Tensor | Module, and their classes differ by architecture."""

    model_types: ClassVar[tuple[str, ...]] = ()  # the transformers config.model_type values it takes
    # every projection of a layer is called as a module and its weight never read, so another module computing
    # the same map (calm.engine.twin's 4-bit linears) may stand in for it
    projections_called: ClassVar[bool] = False
    model: PreTrainedModel
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    is_encoder_decoder: bool = False

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abstractmethod
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions [B, T] -> h [B, T, D]."""

    @abstractmethod
    def context(
        self,
        positions: torch.Tensor,
        key_mask: torch.Tensor,
        start: int,
        encoder: EncoderMemory | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> StepContext:
        """The shared tensors of one forward over T new tokens at cache slots start..start+T-1.

        slot_positions [B, S]: the position of the token in each cache slot, for caches whose real
        slots have masked holes (rejected speculative drafts); None: a row's real slots hold
        consecutive positions. Only attention that depends on key positions at attention time (T5's
        relative bias) reads it: RoPE and absolute positions are already in the cached keys."""

    def static_context(
        self, positions: torch.Tensor, key_mask: torch.Tensor, slot: torch.Tensor, encoder: EncoderMemory | None = None
    ) -> StepContext:
        """context() for one decode token at cache slot `slot` (long [1]) attending over every slot of
        the cache: fixed shapes and no host sync, for the static path (calm.engine.static_decode)."""
        return StepContext(positions=positions, mask=slot_mask(key_mask), start=slot, encoder=encoder)

    @abstractmethod
    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The normalised input of layer's self-attention, [B, T, D]."""

    @abstractmethod
    def kv(
        self, layer: int, x: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention K, V [R, H_kv, T, D_head] of attn_input x [R, T, D] (positions applied): x holds the
        rows `rows` of ctx's batch (all of them when None)."""

    def qkv(
        self, layer: int, x: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """kv's K and V, with the queries [R, H, T, D_head] that finish_layer would make of the same x and rows,
        where one call projects all three; None for the queries where not (finish_layer projects them)."""
        k, v = self.kv(layer, x, ctx, rows)
        return None, k, v

    @abstractmethod
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
        """The rest of the layer for `rows` (all when None): h, x [R, T, D]; k, v the cache
        [R, H_kv, S, D_head] including the new slots; q: qkv's queries of the same x and rows, if it made
        them. Returns the layer output [R, T, D]."""

    @abstractmethod
    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The model's final norm (and any scaling before the LM head)."""

    @property
    def head_module(self) -> torch.nn.Module:
        """The LM head: transformers' output embeddings."""
        return self.model.get_output_embeddings()

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] after final_norm -> logits [..., V]."""
        return self.head_module(h)

    def kv_layers(self, first: int, x_source: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, B, H_kv, T, D_head] of layers first..L-1, all fed the same hidden state
        (state propagation after every row has exited). Adapters may fuse this."""
        ks, vs = zip(*(self.kv(i, self.attn_input(i, x_source), ctx) for i in range(first, self.num_layers)))
        return torch.stack(ks), torch.stack(vs)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderMemory:
        raise NotImplementedError(f"{type(self).__name__} is a decoder-only adapter")

    def decoder_start_ids(self, batch: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a decoder-only adapter")
