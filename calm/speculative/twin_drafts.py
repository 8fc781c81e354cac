"""Drafts from the model's 4-bit twin (calm.engine.twin): where the context offers nothing to copy, the twin decodes
a few tokens greedily, one full-depth step each, and the full model verifies them in one pass like drafts looked up
in the context (every layer over the slots, from their embeddings).

The twin writes its K/V into the drafting rows' own next cache columns, start..start+d-1, as a decode step
would; its key_mask follows the row's drafts. Verification then writes the full model's K/V over every one of
those columns (the pending token's and each drafted token's), and rolls back the rejected ones: nothing the twin
computed stays in the cache, and every committed token is the full model's argmax. Greedy only: sampling would
need the twin's distributions (speculative sampling), which it does not draft with.
"""

from __future__ import annotations

import torch

from calm.adapters.base import pick
from calm.engine.decode import DecodeState, Network, forward_layers
from calm.speculative.drafting import spread
from calm.speculative.verification import slot_context


def twin_step(
    twin: Network,
    state: DecodeState,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    column: int,
    offset: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """The twin's greedy next token [B] after tokens [B] at cache column `column`, position state.positions + offset
    [B]; only `valid` rows [B] keep the slot; rows [R]: the twin runs for those only (0 at the others)."""
    state.cache.key_mask[:, column] = valid
    positions = (state.positions + offset)[:, None]  # [B, 1]
    ctx = slot_context(twin, state, positions, column)
    h = twin.adapter.embed(tokens[:, None], positions)  # [B, 1, D]
    h = forward_layers(twin, h, range(twin.num_layers), ctx, state.cache, rows)[:, 0]  # [B, D]
    h = pick(h, rows)
    full = torch.full((h.shape[0],), twin.num_layers, dtype=torch.long, device=h.device)
    return spread(twin.greedy_tokens(h, full), rows, tokens.shape[0])


def twin_guesses(
    twin: Network, state: DecodeState, pending: torch.Tensor, lengths: list[int], rows: torch.Tensor | None = None
) -> list[list[list[int]]]:
    """Each row's drafts from the twin: up to lengths[b] tokens greedily after its pending token [B] (0: none), as
    calm.speculative.drafting.context_draft takes them (one candidate per row). rows [R]: the batch rows that run."""
    start, steps = state.cache.length, max(lengths, default=0)
    wanted = torch.tensor(lengths, device=pending.device)  # [B]
    if not all(lengths):  # the twin runs for the drafting rows only
        rows = wanted.nonzero()[:, 0] if rows is None else rows[wanted.index_select(0, rows) > 0]
    drafted, inputs = [], pending
    for s in range(steps):
        valid = wanted > s  # the rows feeding a token at this column
        offset = torch.where(valid, s, 0)  # rows not feeding a token stay at a real position
        inputs = twin_step(twin, state, inputs, valid, start + s, offset, rows)
        drafted.append(inputs)
    table = torch.stack(drafted, 1).tolist() if drafted else [[] for _ in lengths]  # [B, steps], one host sync
    return [[table[b][:n]] if n else [] for b, n in enumerate(lengths)]


def twin_limits(max_draft: int, live_rows: list[bool], budget_left: list[int]) -> list[int]:
    """How many tokens each row's twin may draft: k, and at most the row's budget - 1 (0 for finished rows)."""
    return [min(max_draft, n - 1) if live else 0 for n, live in zip(budget_left, live_rows)]


def twin_lengths(twin_plans: list[int], guesses: list[list[list[int]]]) -> list[int]:
    """Tokens each row drafts with the twin: its plan's, where it drafts nothing looked up (guesses[b] empty)."""
    rows = guesses or [[] for _ in twin_plans]
    return [0 if row else n for n, row in zip(twin_plans, rows)]


def looked_up_lengths(twin_lengths: tuple[int, ...] | list[int], drafted: list[int]) -> list[int]:
    """The looked-up drafts' lengths of a step, as BatchLookup.verified adapts to them: each row's drafted length,
    0 where the row drafted with the twin (twin_lengths; empty: none did)."""
    return [0 if t else n for t, n in zip(twin_lengths or [0] * len(drafted), drafted)]


def with_twin_drafts(
    twin: Network,
    state: DecodeState,
    pending: torch.Tensor,
    guesses: list[list[list[int]]],
    lengths: list[int],
    rows: torch.Tensor | None = None,
) -> list[list[list[int]]]:
    """Each row's drafts: the twin's (twin_guesses) where lengths[b] > 0, else its looked-up ones."""
    drafted = twin_guesses(twin, state, pending, lengths, rows)
    looked_up = guesses or [[] for _ in lengths]
    return [drafted[b] if n else looked_up[b] for b, n in enumerate(lengths)]
