"""Verifying drafts: the full model's pass over each row's pending token and drafted slots, what it keeps,
and the rollback of the rest (calm.speculative drafts and runs the loop).

A cycle's drafts sit in cache columns start..start+m of every row (`Draft`), after the pending token at
column start. Layers E+1..L run once over all of them from the states the draft left (layer E, or the
embeddings for drafts from the context), attending by the tree of calm.speculative.tree (a chain unless
several candidates were drafted). The matmuls and the LM head run on each row's own slots only
(calm.engine.kernels.only_slots). Greedy acceptance keeps the deepest drafted path that equals the full
model's argmax; sampling uses speculative sampling's accept/reject rule on a chain. Rejected slots
leave the row's key_mask: nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from calm.adapters.base import StepContext, attention_mask, pick
from calm.engine.decode import DecodeState, Network, forward_layers
from calm.engine.generation import GenerationConfig
from calm.engine.kernels import only_slots
from calm.engine.sampling import SamplingConfig, filter_logits
from calm.errors import PolicyError
from calm.speculative.tree import Accepted, accept, ancestors, depths, path


@dataclass(frozen=True)
class Draft:
    start: int  # cache column of the pending token
    tokens: torch.Tensor  # [B, m] drafted tokens (0 past a row's count)
    counts: torch.Tensor  # [B] long, tokens drafted per row (0..m)
    hidden: torch.Tensor  # [B, m+1, D] layer-E states of the pending token and the drafts
    probs: torch.Tensor | None  # [B, m, V] the distributions drafts were sampled from (sampling only)
    layer: int  # the layer `hidden` comes out of: E, or 0 (embeddings) for drafts from the context
    parents: torch.Tensor  # [B, m] the slot each drafted slot continues (calm.speculative.tree); a chain: 0..m-1
    branched: bool = False  # some row verifies more than one candidate: attention follows the tree


def slot_context(
    net: Network, state: DecodeState, positions: torch.Tensor, start: int, tree: torch.Tensor | None = None
) -> StepContext:
    """The adapter's context for new tokens at positions [B, T] in cache columns start..; each earlier
    slot's position is the count of real slots before it (holes of rejected drafts are not counted).
    tree [B, T, T] (calm.speculative.tree.ancestors): a new slot attends to its ancestors among the new slots only."""
    mask = state.cache.key_mask
    slot_positions = mask.long().cumsum(-1) - 1  # [B, S]
    if tree is None:
        ctx = net.adapter.context(positions, mask, start, state.encoder, slot_positions)
        return replace(ctx, query_ends=chain_ends(mask, start, positions.shape[1]))
    t = positions.shape[1]
    slot_positions[:, start : start + t] = positions
    ctx = net.adapter.context(positions, mask, start, state.encoder, slot_positions)
    if ctx.window is not None:
        raise PolicyError("drafts verified as a tree need full attention; this model has a sliding window")
    tree_mask = attention_mask(mask, start, t) if ctx.mask is None else ctx.mask.clone()  # [B, 1, T, S]
    tree_mask[..., start : start + t] &= tree[:, None]
    return replace(ctx, mask=tree_mask)


def chain_ends(key_mask: torch.Tensor, start: int, t: int) -> tuple[int, ...] | None:
    """Each new slot's key count where one row's T > 1 new slots follow real slots only (no padding, no holes):
    slot start+j attends slots 0..start+j, as the one-token step there would (calm.adapters.base.attend);
    None otherwise (one host sync)."""
    if key_mask.shape[0] != 1 or t < 2 or not bool(key_mask[0, :start].all()):
        return None
    return tuple(range(start + 1, start + t + 1))


def draft_positions(state: DecodeState, counts: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Positions [B, m+1] of each row's pending token and drafts: the row's position plus the slot's depth
    in the tree (masked slots past counts [B] sit at the pending token's position: a tree's counts can
    exceed its depth, and a position past the row's budget may be past the model's position table)."""
    depth = depths(parents)
    real = torch.arange(depth.shape[1], device=depth.device)[None] <= counts[:, None]
    return state.positions[:, None] + torch.where(real, depth, 0)


def verify(
    net: Network, state: DecodeState, d: Draft, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers E+1..L (E = d.layer) over every row's m+1 drafted slots, from their layer-E states.
    -> [B*(m+1), D] full-depth states, and the flattened slots that count [N]: each live row's pending
    token and its own drafts. The matmuls run on those N slots only (calm.engine.kernels.only_slots), so a row
    pays for its own draft, not the cycle's widest; rows [R]: attention too runs for those rows only (a
    continuous batch's free slots cost nothing)."""
    width = d.hidden.shape[1]
    keep = state.cache.key_mask[:, d.start : d.start + width]  # [B, m+1]
    tree = ancestors(d.parents) if d.branched else None
    ctx = slot_context(net, state, draft_positions(state, d.counts, d.parents), d.start, tree)
    with only_slots(pick(keep, rows)) as kept:  # the slots of the rows that run: [R, m+1]
        h = forward_layers(net, d.hidden, range(d.layer, net.num_layers), ctx, state.cache, rows)
    if rows is not None:
        kept = keep.reshape(-1).nonzero()[:, 0]  # in the whole batch's [B*(m+1)] slots
    return h.reshape(-1, h.shape[-1]), kept


def accept_greedy(net: Network, d: Draft, h: torch.Tensor, kept: torch.Tensor) -> Accepted:
    """The longest drafted path that equals the full model's argmax (calm.speculative.tree.accept), scored at the
    kept slots [N] of h [B*(m+1), D] only."""
    b, m = d.tokens.shape
    full = torch.full((kept.shape[0],), net.num_layers, dtype=torch.long, device=h.device)
    scored = net.greedy_tokens(h.index_select(0, kept), full)  # [N]
    targets = torch.zeros(b * (m + 1), dtype=torch.long, device=h.device).index_copy_(0, kept, scored)
    return accept(d.tokens, d.parents, d.counts, targets.view(b, m + 1))  # 0 at slots no live row drafted


def accept_sampled(
    net: Network, d: Draft, h: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> Accepted:
    """Speculative sampling over a chain of drafts: draft i is kept with probability min(1, p_i/q_i); the
    first rejected one is replaced by a sample of norm(max(p - q, 0)); when all are kept, the bonus token
    is a sample of p."""
    b, m = d.tokens.shape
    full = torch.full((h.shape[0],), net.num_layers, dtype=torch.long, device=h.device)
    p = filter_logits(net.token_logits(h, full), sampling).softmax(-1).view(b, m + 1, -1)  # [B, m+1, V]
    accepted = torch.zeros(b, dtype=torch.long, device=h.device)
    rejected = torch.zeros(b, dtype=torch.bool, device=h.device)
    residual = p[:, 0]
    if m:
        if d.probs is None:
            raise ValueError("sampled drafts carry the distributions they were drawn from (Draft.probs)")
        tok = d.tokens[..., None]
        p_d, q_d = p[:, :m].gather(-1, tok)[..., 0], d.probs.gather(-1, tok)[..., 0]  # [B, m]
        u = torch.rand(b, m, generator=generator, device=h.device)
        drafted = torch.arange(m, device=h.device)[None] < d.counts[:, None]
        accepted = ((u * q_d < p_d) & drafted).long().cumprod(1).sum(1)  # P = min(1, p/q); 0 where p = 0
        rejected = accepted < d.counts
        at = accepted.clamp(max=m - 1)[:, None, None].expand(-1, 1, p.shape[-1])
        residual = (p.gather(1, at)[:, 0] - d.probs.gather(1, at)[:, 0]).clamp(min=0)
    p_next = p.gather(1, accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]  # [B, V]
    use_residual = rejected & (residual.sum(-1) > 0)
    dist = torch.where(use_residual[:, None], residual, p_next)
    return Accepted(accepted, accepted, torch.multinomial(dist, 1, generator=generator)[:, 0])


def rollback(state: DecodeState, d: Draft, acc: Accepted, live: torch.Tensor) -> torch.Tensor:
    """Keep each live row's pending token and its accepted path, mask its other drafted slots, and move
    the shared write column past the furthest kept slot; positions advance per row. -> the kept slots [B, m+1]."""
    keep = path(d.parents, acc.last) & live[:, None]  # [B, m+1]
    state.cache.key_mask[:, d.start : d.start + keep.shape[1]] = keep
    state.cache.length = d.start + int(torch.where(live, acc.last, 0).max()) + 1  # host sync
    state.positions = state.positions + torch.where(live, acc.count + 1, 0)
    state.holes = True
    return keep


def finished(row: list[int], config: GenerationConfig) -> bool:
    return len(row) >= config.max_new_tokens or row[-1] in config.eos_token_ids


def commit(
    out: list[list[int]],
    d: Draft,
    keep: torch.Tensor,
    following: torch.Tensor,
    live_rows: list[bool],
    config: GenerationConfig,
) -> list[int]:
    """Append each live row's accepted drafts (its kept slots [B, m+1] past the pending one) and the full
    model's next token, up to its first EOS. -> each row's count of kept drafts."""
    drafted, kept_slots, nxt = d.tokens.tolist(), keep[:, 1:].tolist(), following.tolist()  # one sync
    kept = []
    for b, row in enumerate(out):
        path_tokens = [t for t, on in zip(drafted[b], kept_slots[b]) if on]
        kept.append(len(path_tokens))
        if not live_rows[b]:
            continue
        for token in path_tokens + [nxt[b]]:
            row.append(token)
            if token in config.eos_token_ids:
                break
    return kept
