"""Lossless speculative decoding with calm's own exit heads: layers 1..E draft, layers E+1..L verify.

One cycle, for every unfinished row of the batch at once:

1. draft: each row's pending token (the last one committed, not yet in the cache), then each token
   drafted after it, runs through layers 1..E at the next cache slot, writing exact K/V for those
   layers. While the exit measure at layer E is confident at λ (CALM's signal, here a draft-length
   controller), the exit head proposes the next token, up to k per cycle;
2. verify: layers E+1..L run once over the pending token and the drafts (m+1 slots) from the layer-E
   states the draft left, and one LM-head call scores them. The matmuls and the LM head run on each
   row's own slots only (calm.engine.kernels.only_slots): a row that drafted nothing verifies one position,
   not the cycle's widest draft;
3. accept: greedy keeps the longest drafted prefix equal to the full model's argmax and takes the
   full model's token at the first mismatch (the bonus token when all match); sampling uses
   speculative sampling's accept/reject rule, so tokens follow the full model's distribution;
4. rollback: rejected slots leave the row's key_mask, nothing is copied. All rows share the write
   column (cache.length), which moves on by the most tokens any row kept; a row that kept fewer has
   masked holes there. Each row's length is its position counter (DecodeState.positions).

Every row drafts again in the next cycle from its own corrected token: no row sits a cycle out.

Drafts from the context (calm.speculative.lookup, draft layer E = 0): no layer runs to draft, the slots hold the
embeddings of the looked-up tokens, and all L layers verify. With lookup=True a cycle drafts from the
context when any row's lookup finds drafts, and from layer E otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from calm.adapters.base import pick
from calm.engine.decode import DecodeState, ExitPlan, Network, exit_decision, forward_layers
from calm.engine.sampling import SamplingConfig, filter_logits
from calm.engine.speculative_stats import SpeculativeStats as SpeculativeStats  # re-exported
from calm.errors import PolicyError
from calm.exits.policy import ExitPolicy
from calm.speculative.lookup import BatchLookup
from calm.speculative.tree import chain
from calm.speculative.verification import Draft, draft_positions, slot_context


@dataclass(frozen=True)
class SpeculativeConfig:
    draft_layer: int  # E: layers 1..E and the exit head of layer E draft (1..L-1); 0: the context drafts
    max_draft: int = 4  # k: most tokens drafted per cycle (DEFAULT_MAX_DRAFT)
    lookup: bool = False  # also draft from the context: a cycle where any row's lookup finds drafts uses those
    adaptive: bool = False  # context drafts: each row's length follows its last verification (BatchLookup)
    candidates: int = 1  # context drafts: continuations verified at once per row, as a tree (calm.speculative.tree)
    goodput: bool = False  # each row drafts only where its goodput beats a plain step (calm.speculative.goodput)
    twin: bool = False  # greedy: the 4-bit twin drafts where the context does not (calm.speculative.twin_drafts)

    @property
    def from_context(self) -> bool:
        """E = 0: no layer runs to draft; drafts are looked up in the row's own context (calm.speculative.lookup)."""
        return self.draft_layer == CONTEXT_DRAFT

    @property
    def looks_up(self) -> bool:
        return self.lookup or self.from_context

    def check(self, num_layers: int) -> None:
        if not 0 <= self.draft_layer < num_layers:
            raise PolicyError(
                f"draft layer {self.draft_layer} is out of range: this model has {num_layers} "
                f"layers, so drafts can come from layers 1..{num_layers - 1}, or 0 for drafts "
                "looked up in the context"
            )
        if self.max_draft < 1:
            raise PolicyError(f"max_draft must be >= 1, got {self.max_draft}")
        if self.candidates < 1:
            raise PolicyError(f"candidates must be >= 1, got {self.candidates}")


CONTEXT_DRAFT = 0  # the draft layer that means "draft from the context by n-gram lookup"
NO_CONTROLLER = (
    "draft layer 0 drafts whatever the context lookup finds: it takes no draft controller "
    "(measure or threshold); give one with a draft layer of 1 or more"
)


def default_draft_layer(num_layers: int) -> int:
    """Half the layers (at least 1: 0 would mean drafts from the context)."""
    return max(1, num_layers // 2)


MODES = ("calm", "speculative")
ALWAYS_DRAFT = ExitPolicy(measure="fixed", threshold=0.0)  # no controller: draft k tokens, or all a lookup finds
DEFAULT_DRAFT_THRESHOLD = 0.7
DEFAULT_MAX_DRAFT = 4


def default_draft_policy(net: Network) -> ExitPolicy:
    """The draft controller when none is given: the exit classifier at λ=0.7 with trained heads, else
    always draft (a fixed draft length, as LayerSkip)."""
    if net.heads is not None and net.heads.config.classifier:
        return ExitPolicy(measure="classifier", threshold=DEFAULT_DRAFT_THRESHOLD, decay_tau=0.0)
    return ALWAYS_DRAFT


def draft_plan(policy: ExitPolicy, net: Network, spec: SpeculativeConfig) -> ExitPlan:
    """The policy's measure as a draft controller at layer E (no allowed layer: it never drafts)."""
    spec.check(net.num_layers)
    if policy.never_exits or spec.from_context:
        return ExitPlan(measure=policy.measure, allowed=frozenset())
    return ExitPlan.resolve(replace(policy, exit_layers=(spec.draft_layer,), min_exit_layer=1), net)


def lower_step(
    net: Network,
    spec: SpeculativeConfig,
    state: DecodeState,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    column: int,
    offset: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers 1..E over tokens [B] at cache column `column`, position state.positions + offset [B];
    only `valid` rows [B] keep the slot; rows [R]: attention runs for those only (forward_layers). -> the states
    after layers E-1 and E, [B, D] each."""
    state.cache.key_mask[:, column] = valid
    positions = (state.positions + offset)[:, None]  # [B, 1]
    ctx = slot_context(net, state, positions, column)
    h = net.adapter.embed(tokens[:, None], positions)
    e = spec.draft_layer
    h_in = forward_layers(net, h, range(e - 1), ctx, state.cache, rows)
    h_out = forward_layers(net, h_in, range(e - 1, e), ctx, state.cache, rows)
    return h_in[:, 0], h_out[:, 0]


def propose(
    net: Network,
    spec: SpeculativeConfig,
    h: torch.Tensor,
    logits: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The exit head's next token [R] from layer-E states h [R, D] (and its distribution [R, V] when sampling)."""
    layers = torch.full((h.shape[0],), spec.draft_layer, dtype=torch.long, device=h.device)
    if not sampling.do_sample:
        return (net.greedy_tokens(h, layers) if logits is None else logits.argmax(-1)), None
    logits = net.token_logits(h, layers) if logits is None else logits
    q = filter_logits(logits, sampling).softmax(-1)
    return torch.multinomial(q, 1, generator=generator)[:, 0], q


def draft(
    net: Network,
    spec: SpeculativeConfig,
    plan: ExitPlan,
    state: DecodeState,
    pending: torch.Tensor,
    live: torch.Tensor,
    budget: torch.Tensor,
    threshold: float,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    rows: torch.Tensor | None = None,
) -> Draft:
    """Layers 1..E over each live row's pending token [B], then over each token drafted after it while
    the row is confident and has budget [B] (tokens it may still commit) left; at most k drafts. rows [R]:
    the layers, the exit check and the head run for those only (a continuous batch's live slots)."""
    start, b = state.cache.length, pending.shape[0]
    valid, inputs = live, pending
    counts = torch.zeros_like(pending)
    hidden, tokens, probs = [], [], []
    for s in range(spec.max_draft + 1):
        offset = torch.where(valid, s, 0)  # rows not feeding a token stay at a real position
        h_in, h = lower_step(net, spec, state, inputs, valid, start + s, offset, rows)
        hidden.append(h)
        if s == spec.max_draft or spec.draft_layer not in plan.allowed:
            break
        confident, logits = exit_decision(net, plan, spec.draft_layer, pick(h, rows), pick(h_in, rows), threshold)
        go = valid & spread(confident, rows, b) & (budget > s + 1)
        if not bool(go.any()):  # host sync, once per draft step
            break
        proposal, q = propose(net, spec, pick(h, rows), logits, sampling, generator)
        proposal, q = spread(proposal, rows, b), None if q is None else spread(q, rows, b)
        tokens.append(torch.where(go, proposal, 0))
        if q is not None:
            probs.append(q)
        counts += go
        valid, inputs = go, proposal
    drafted = torch.stack(tokens, 1) if tokens else pending.new_zeros(b, 0)  # [B, m]
    return Draft(
        start=start,
        tokens=drafted,
        counts=counts,
        hidden=torch.stack(hidden, 1),
        probs=torch.stack(probs, 1) if probs else None,
        layer=spec.draft_layer,
        parents=chain(b, drafted.shape[1] + 1, pending.device),
    )


def spread(t: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Values t [R, ...] of the rows `rows` as [batch, ...], zeros (False) at the others; t itself when rows is None."""
    return t if rows is None else t.new_zeros(batch, *t.shape[1:]).index_copy(0, rows, t)


def lookup_guesses(
    spec: SpeculativeConfig, lookup: BatchLookup, out: list[list[int]], live: list[bool], budget: list[int], count: int
) -> list[list[list[int]]]:
    """Each live row's candidate drafts from its context (prompt and tokens so far, pending included): what
    followed the latest occurrences of its final n-gram, up to `count` of them, each up to k and its budget - 1."""
    limits = [min(spec.max_draft, n - 1) if is_live else 0 for n, is_live in zip(budget, live)]
    return lookup.candidates(out, limits, count)


def context_draft(
    net: Network,
    state: DecodeState,
    pending: torch.Tensor,
    live: torch.Tensor,
    guesses: list[list[list[int]]],
    sample: bool,
) -> Draft:
    """Drafts from the context (lookup_guesses): no layer runs; the slots hold the token embeddings of the
    pending token and each row's candidates one after another, each continuing the pending token (a tree,
    calm.speculative.tree), and verification runs every layer over them."""
    flat = [[t for c in row for t in c] for row in guesses]
    width = max(map(len, flat)) + 1
    tokens = pending.new_zeros(len(flat), width - 1)  # [B, m]
    parents = chain(len(flat), width, pending.device).clone()  # [B, m]
    for b, row in enumerate(guesses):
        tokens[b, : len(flat[b])] = torch.tensor(flat[b], dtype=tokens.dtype)
        first = 0
        for c in row:  # a candidate's first token continues the pending token (slot 0)
            parents[b, first] = 0
            first += len(c)
    counts = torch.tensor([len(f) for f in flat], device=pending.device)
    start, steps = state.cache.length, torch.arange(width, device=pending.device)
    state.cache.key_mask[:, start : start + width] = (steps[None] <= counts[:, None]) & live[:, None]
    positions = draft_positions(state, counts, parents)
    hidden = net.adapter.embed(torch.cat([pending[:, None], tokens], 1), positions)  # [B, m+1, D]
    probs = None
    if sample and width > 1:  # a lookup proposes one token for sure: q is one-hot
        probs = torch.nn.functional.one_hot(tokens, net.adapter.vocab_size).to(hidden.dtype)  # [B, m, V]
    branched = any(len(row) > 1 for row in guesses)
    return Draft(start, tokens, counts, hidden, probs, CONTEXT_DRAFT, parents, branched)


def tree_candidates(net: Network, spec: SpeculativeConfig, sampling: SamplingConfig) -> int:
    """The context candidates a cycle verifies per row: spec.candidates, or one where a tree cannot be
    verified (sampling keeps speculative sampling's chain rule; sliding-window attention is by slot)."""
    windowed = getattr(net.adapter, "window", None) is not None
    return 1 if sampling.do_sample or windowed else spec.candidates


def default_cache_slots(max_new_tokens: int, spec: SpeculativeConfig) -> int:
    """Cache columns after the prompt: each cycle commits at least one token per row and moves the
    write column by at most its width, k × candidates + 1."""
    width = spec.max_draft * spec.candidates + 1
    return max_new_tokens * width + width
