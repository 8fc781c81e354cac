"""The early-exit decode step: prefill, and one token through the layer stack with per-row exits.

A row leaves the stack when its confidence at an allowed exit layer reaches the threshold. Its
hidden state then stays frozen in `h`, and every later layer still runs its input norm and K/V
projection over all rows: for an exited row that is CALM's state propagation (the exit state
copied upward fills the skipped layers' cache), fused into the batch's one K/V matmul. The rest
of each layer runs for the rows still going: attention per running row over its own view of the
cache once any row has left, the matmuls for every row (exited rows' outputs dropped) below
COMPACT_MIN_ROWS live rows and for the running rows only from there up. Once no row is left, the
remaining layers' K/V are filled in one fused call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from calm.adapters.base import Adapter, EncoderMemory, RowAttention, StepContext, pick
from calm.engine.kv_cache import KVCache
from calm.engine.lm_head import CertifiedArgmax
from calm.engine.sampling import SamplingConfig, next_token
from calm.errors import PolicyError
from calm.exits.confidence import softmax_margin, state_similarity
from calm.exits.heads import ExitHeads
from calm.exits.policy import ExitPolicy

COMPACT_MIN_ROWS = 16  # live rows from which layers run for the still-running rows only
PER_ROW_MAX_ROWS = 8  # up to this many running rows attend one by one over cache views; more: one batched call


@dataclass(frozen=True)
class Network:
    """A backbone seen through its adapter, with optional trained exit heads, and the certified
    greedy argmax of its LM head when that pays off (float32 heads)."""

    adapter: Adapter
    heads: ExitHeads | None = None
    argmax: CertifiedArgmax | None = None

    @classmethod
    def build(cls, adapter: Adapter, heads: ExitHeads | None = None) -> Network:
        return cls(adapter, heads, CertifiedArgmax.for_head(adapter.head_module))

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def head_input(self, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """What the LM head reads for hidden states h [R, D] taken at exit layers [R] (L = full depth)."""
        if self.heads is not None:
            h = self.heads.transform(h, layers)
        return self.adapter.final_norm(h)

    def token_logits(self, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """Next-token logits [R, V]."""
        return self.adapter.lm_head(self.head_input(h, layers))

    def greedy_tokens(self, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """argmax of token_logits [R], without the full float32 head where it can be certified."""
        if self.argmax is None:
            return self.token_logits(h, layers).argmax(dim=-1)
        return self.argmax(self.head_input(h, layers))

    def next_tokens(
        self, h: torch.Tensor, layers: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> torch.Tensor:
        if not sampling.do_sample:
            return self.greedy_tokens(h, layers)
        return next_token(self.token_logits(h, layers), sampling, generator)


def exit_floor(net: Network) -> int:
    """The lowest layer a confidence measure may exit at: the first layer with a trained exit head, or, on a
    model without heads, half the depth. Measured on SmolLM2-135M (benchmarks/results/agreement_smollm2.md),
    the plain LM head on layers 1-15 agrees with the final layer on 4-8% of tokens, so an exit there is
    garbage whatever the measure says; the agreement climbs from half the depth on (about 50% at layer 29)."""
    if net.heads is not None:
        return max(1, min(net.heads.config.min_layer, net.num_layers - 1))
    return max(1, net.num_layers // 2)


@dataclass(frozen=True)
class ExitPlan:
    """An ExitPolicy resolved against one model: the allowed layers as a set, the measure."""

    measure: str
    allowed: frozenset[int]

    @classmethod
    def resolve(cls, policy: ExitPolicy, net: Network) -> ExitPlan:
        allowed = frozenset(policy.allowed_layers(net.num_layers, exit_floor(net)))
        if policy.measure == "classifier" and allowed and (net.heads is None or not net.heads.config.classifier):
            raise PolicyError(
                "the 'classifier' measure needs trained exit heads with a classifier "
                "(load a calm checkpoint, or train one with `calm train`)"
            )
        return cls(measure=policy.measure, allowed=allowed)


NO_EXITS = ExitPlan(measure="softmax", allowed=frozenset())  # a step at full depth: no row may exit


@dataclass
class DecodeState:
    """What one decode step reads and advances, besides the tokens themselves."""

    cache: KVCache
    positions: torch.Tensor  # [B] position id of the next token
    first_slots: tuple[int, ...]  # each row's first real cache slot (after its left padding)
    encoder: EncoderMemory | None = None
    holes: bool = False  # some row's slots after its first hold rejected drafts (masked in key_mask)


@dataclass(frozen=True)
class StepOutput:
    hidden: torch.Tensor  # [B, D] each row's exit hidden state
    exit_layers: torch.Tensor  # [B] long, 1..L
    decided: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (rows, logits) the exit check computed

    def tokens(
        self, net: Network, rows: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The next token [B] of `rows` (others 0): from the exit check's logits where it made them,
        else one batched head call on the exit states."""
        tokens = torch.zeros(self.hidden.shape[0], dtype=torch.long, device=self.hidden.device)
        pending = torch.zeros_like(tokens, dtype=torch.bool).index_fill_(0, rows, True)
        for decided_rows, logits in self.decided:
            mine = pending[decided_rows]  # only the rows asked for draw from this generator
            if bool(mine.any()):
                tokens[decided_rows[mine]] = next_token(logits[mine], sampling, generator)
            pending[decided_rows] = False
        todo = rows if not self.decided else pending.nonzero()[:, 0]
        if todo.numel():
            chosen = net.next_tokens(
                self.hidden.index_select(0, todo), self.exit_layers.index_select(0, todo), sampling, generator
            )
            tokens = tokens.index_copy(0, todo, chosen)
        return tokens


def prefill(net: Network, ids: torch.Tensor, state: DecodeState) -> StepOutput:
    """Run all layers over the prompt ids [B, T] (cache slots 0..T-1); the last token's state, at full depth."""
    a, cache = net.adapter, state.cache
    t = ids.shape[1]
    positions = (cache.key_mask[:, :t].long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    ctx = a.context(positions, cache.key_mask, 0, state.encoder)
    h = forward_layers(net, a.embed(ids, positions), range(a.num_layers), ctx, cache)  # [B, T, D]
    cache.length = t
    state.positions = positions[:, -1] + 1
    full = torch.full((ids.shape[0],), a.num_layers, dtype=torch.long, device=ids.device)
    return StepOutput(hidden=h[:, -1], exit_layers=full, decided=())


def forward_layers(
    net: Network, h: torch.Tensor, layers: range, ctx: StepContext, cache: KVCache, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Layers `layers` (0-based) over T new tokens h [B, T, D] at cache slots ctx.start..ctx.start+T-1: each
    layer writes their K/V there, then every row attends over slots 0..start+T-1 under ctx.mask. rows [R]: each
    layer runs for those rows only (their K/V written, their attention); the others' outputs stay h, their cache
    untouched. -> [B, T, D]."""
    if not isinstance(ctx.start, int):
        raise TypeError("forward_layers writes at a slot the host knows: ctx.start must be an int (dynamic path)")
    a, start = net.adapter, ctx.start
    end = start + h.shape[1]
    sel = None if rows is None else row_selector(rows)
    out = pick(h, rows)  # [R, T, D]
    for i in layers:
        x = a.attn_input(i, out)
        q, k, v = a.qkv(i, x, ctx, rows)
        cache.write(i, start, k, v, sel)
        kc, vc = cache.keys_values(i, end, sel)
        out = a.finish_layer(i, out, x, kc, vc, ctx, rows, q)
    return out if rows is None else h.index_copy(0, rows, out)


def row_selector(rows: torch.Tensor) -> slice | torch.Tensor:
    """rows [R] (long, ascending) as a slice where they are consecutive, so their cache rows are read as views,
    not copied; else rows itself. One host sync."""
    ids = rows.tolist()
    return slice(ids[0], ids[0] + len(ids)) if ids == list(range(ids[0], ids[0] + len(ids))) else rows


def exit_decision(
    net: Network, plan: ExitPlan, layer: int, h_out: torch.Tensor, h_in: torch.Tensor, threshold: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which of R running rows exit at `layer`: bool [R], and their logits [R, V] when the measure made them."""
    if plan.measure == "fixed":
        return torch.ones(h_out.shape[0], dtype=torch.bool, device=h_out.device), None
    if plan.measure == "softmax":
        logits = net.token_logits(h_out, torch.full((h_out.shape[0],), layer, device=h_out.device))
        return softmax_margin(logits) >= threshold, logits
    if plan.measure == "state":
        return state_similarity(h_out, h_in) >= threshold, None
    if net.heads is None:
        raise PolicyError("the 'classifier' measure needs trained exit heads (ExitPlan.resolve checks this)")
    return net.heads.classify(h_out, layer) >= threshold, None


# long: one pass down the layer stack; h, running, compute and layer_ctx change together at each exit layer
def decode_one_token(
    net: Network,
    plan: ExitPlan,
    tokens: torch.Tensor,
    state: DecodeState,
    threshold: float | torch.Tensor,
    rows: torch.Tensor,
) -> StepOutput:
    """Advance the rows `rows` (long [R], the unfinished ones) by one token. tokens [B]; threshold: one
    for every row, or each row's own [B] (a continuous batch's rows each follow their own policy).

    Exited rows keep their exit state in `h`. Below COMPACT_MIN_ROWS live rows the matmuls run for
    every row and exited rows' outputs are dropped: a decode matmul that small costs about the same
    for any number of rows (reading the weights dominates). From COMPACT_MIN_ROWS up they run for
    the still-running rows only. Self-attention, whose cost grows with the rows and their context,
    runs for all rows at once while every row runs, and then, for up to PER_ROW_MAX_ROWS running
    rows, for each alone over its own view of the cache (calm.adapters.base.RowAttention): no keys
    or values are copied. More running rows attend in one call over their gathered K/V. Rows not in
    `rows` (finished rows, a continuous batch's free slots) compute nothing, their K/V included."""
    a, cache = net.adapter, state.cache
    slot = cache.length
    batch = tokens.shape[0]
    cache.key_mask[:, slot] = True
    positions = state.positions[:, None]  # [B, 1]
    ctx = a.context(positions, cache.key_mask, slot, state.encoder)
    h = a.embed(tokens[:, None], positions)  # [B, 1, D]
    exit_layers = torch.full((batch,), a.num_layers, dtype=torch.long, device=tokens.device)
    running = torch.zeros(batch, dtype=torch.bool, device=tokens.device).index_fill_(0, rows, True)
    compute = None if rows.numel() == batch else rows  # None: every row
    live = compute  # the rows whose K/V each layer writes: free slots of a continuous batch write none
    sel = None if live is None else row_selector(live)
    compact = rows.numel() >= COMPACT_MIN_ROWS
    layer_ctx = _per_row(ctx, state, compute, rows) if per_row_attention(state, rows.numel()) else ctx
    decided: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, logits)
    exited_any = False
    for i in range(a.num_layers):
        x = a.attn_input(i, pick(h, live))  # [R, 1, D]
        q, k, v = a.qkv(i, x, ctx, live) if compute is live else (None, *a.kv(i, x, ctx, live))  # q: compute's
        cache.write(i, slot, k, v, sel)
        x = x if live is None else torch.zeros_like(h).index_copy(0, live, x)  # [B, 1, D]
        kc, vc = cache.keys_values(i, slot + 1)
        if layer_ctx.row_attention is None and compute is not None:
            kc, vc = kc.index_select(0, compute), vc.index_select(0, compute)
        h_in = pick(h, compute)
        h_out = a.finish_layer(i, h_in, pick(x, compute), kc, vc, layer_ctx, compute, q)
        going = pick(running, compute)  # [C]
        h_new = torch.where(going[:, None, None], h_out, h_in) if exited_any else h_out  # until an exit: all going
        h = h_new if compute is None else h.index_copy(0, compute, h_new)
        layer = i + 1
        if layer not in plan.allowed:
            continue
        row_threshold = threshold
        if isinstance(threshold, torch.Tensor) and threshold.dim() == 1:
            row_threshold = pick(threshold, compute)
        confident, logits = exit_decision(net, plan, layer, h_out[:, 0], h_in[:, 0], row_threshold)
        exits = confident & going
        ids = compute if compute is not None else torch.arange(batch, device=tokens.device)
        exited = ids[exits]  # host sync
        if exited.numel() == 0:
            continue
        exit_layers[exited] = layer
        running[exited] = False
        exited_any = True
        if logits is not None:
            decided.append((exited, logits[exits]))
        still = running.nonzero()[:, 0]
        if still.numel() == 0:
            if layer < a.num_layers:
                k, v = a.kv_layers(layer, h, ctx)
                cache.write_layers(layer, slot, k, v)
            break
        if compact:
            compute = still
        layer_ctx = _per_row(ctx, state, compute, still)
    cache.length = slot + 1
    state.positions = state.positions + 1
    return StepOutput(hidden=h[:, 0], exit_layers=exit_layers, decided=tuple(decided))


def per_row_attention(state: DecodeState, live: int) -> bool:
    """Whether a step's `live` running rows attend each alone over its own slots: up to PER_ROW_MAX_ROWS rows, in
    a cache without holes, where some row is not running. With every row running, one batched call reads a
    continuous batch's padding too (2.4x the real keys on 8 SmolLM2 rows of 100-1,100 tokens); whether one call
    per row pays then is not settled: benchmarks/results/slots_smollm2.md measured it 1.16x faster at low load (a
    run before, 1.13x), an earlier run under heavy load 1.17x slower, and a static batch of equal lengths has no
    padding to skip, so the rule stays the engine's old one."""
    return live <= PER_ROW_MAX_ROWS and not state.holes and live < len(state.first_slots)


def _per_row(ctx: StepContext, state: DecodeState, compute: torch.Tensor | None, live: torch.Tensor) -> StepContext:
    """ctx with self-attention for the `live` rows only, each over its own cache view; queries are
    the rows of `compute` (every row when None). Beyond PER_ROW_MAX_ROWS rows the per-call cost
    outweighs the saving, and a cache with holes (drafts rejected by speculative decoding) needs its
    mask: then ctx itself, one batched call (over the computed rows' gathered K/V)."""
    if not per_row_attention(state, live.numel()):
        return ctx
    first_slots = state.first_slots
    computed = range(len(first_slots)) if compute is None else compute.tolist()
    query_of = {row: j for j, row in enumerate(computed)}
    live_rows = live.tolist()
    per_row = RowAttention(
        queries=tuple(query_of[r] for r in live_rows),
        rows=tuple(live_rows),
        starts=tuple(first_slots[r] for r in live_rows),
    )
    return replace(ctx, row_attention=per_row)
