"""The batch loop of lossless speculative decoding (calm.speculative.drafting drafts, calm.speculative.verification
verifies): one cycle per step for every unfinished row, under the goodput rule (calm.speculative.goodput) where the
setting asks for it. A step where no row drafts runs the full model's plain decode step (greedy, no sliding window).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from calm.engine.decode import NO_EXITS, DecodeState, Network, decode_one_token, prefill
from calm.engine.generation import GenerationConfig, GenerationResult, PromptBatch, Timings, _start, _sync
from calm.engine.kernels import packed_linears
from calm.engine.speculative_stats import SpeculativeStats, Tally
from calm.engine.twin import twin_of
from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import (
    SpeculativeConfig,
    context_draft,
    default_cache_slots,
    draft,
    draft_plan,
    lookup_guesses,
    tree_candidates,
)
from calm.speculative.goodput import CONTEXT, LAYER, PLAIN, TWIN, GoodputGate, RowPlan, gate_step, gate_verified
from calm.speculative.lookup import BatchLookup
from calm.speculative.twin_drafts import looked_up_lengths, twin_lengths, twin_limits, with_twin_drafts
from calm.speculative.verification import Draft, accept_greedy, accept_sampled, commit, finished, rollback, verify


@torch.inference_mode()
def generate_speculative(
    net: Network, prompts: PromptBatch, policy: ExitPolicy, config: GenerationConfig, spec: SpeculativeConfig
) -> GenerationResult:
    """Generate with drafts from layer E checked by the full model: the full model's tokens (greedy:
    exactly; sampling: in distribution). policy's measure and λ (fixed, no decay) control draft length."""
    twin = twin_of(net) if spec.twin and not config.sampling.do_sample else None  # built before kernels are packed
    with packed_linears(net.adapter.model, config.kernels):
        return _speculative_loop(net, prompts, policy, config, spec, twin)


def _speculative_loop(
    net: Network,
    prompts: PromptBatch,
    policy: ExitPolicy,
    config: GenerationConfig,
    spec: SpeculativeConfig,
    twin: Network | None,
) -> GenerationResult:
    loop = _Loop(net, policy, config, spec, twin)
    t0 = time.perf_counter()
    state, first_ids = _start(net, prompts, default_cache_slots(config.max_new_tokens, spec))
    rows = torch.arange(first_ids.shape[0], device=loop.device)
    first = prefill(net, first_ids, state).tokens(net, rows, config.sampling, loop.generator)
    out = [[t] for t in first.tolist()]
    _sync(loop.device)
    t1 = time.perf_counter()
    tally = Tally()
    pending = first
    contexts = [ids[m].tolist() for ids, m in zip(prompts.ids, prompts.mask)]
    lookup = BatchLookup(contexts, spec.max_draft, spec.adaptive) if spec.looks_up else None
    gate = GoodputGate(len(out), spec.draft_layer / net.num_layers) if spec.goodput else None
    while True:
        live_rows = [not finished(r, config) for r in out]
        if not any(live_rows):
            break
        live = torch.tensor(live_rows, device=loop.device)
        ta, cpu = time.perf_counter(), time.process_time()
        step = loop.draft(state, pending, live, live_rows, out, lookup, gate)
        _sync(loop.device)
        tb, verify_cpu = time.perf_counter(), time.process_time()
        before = [len(r) for r in out]
        done = loop.commit(state, step, pending, live, live_rows, out)
        drafted = [max(map(len, g), default=0) for g in step.guesses]  # the longest path, not the total
        if lookup is not None and step.kind != LAYER:
            lookup.verified(looked_up_lengths(step.twin, drafted), done.kept)
        context = step.kind == CONTEXT or (gate is None and step.kind == PLAIN)  # the gate's plain steps draft none
        tally.add(done.counts, done.accepted, live_rows, (tb - ta, time.perf_counter() - tb), context)
        if gate is not None:
            end = time.process_time()
            gate.timed_step(step.kind, done.width, end - cpu, end - verify_cpu)
            committed = [r[n] if len(r) > n else None for r, n in zip(out, before)]
            gate_verified(gate, step.plans, step.looked_up, drafted, done.kept, committed, step.kind)
        pending = torch.where(live, done.following, config.pad_token_id)
    _sync(loop.device)
    stats = tally.stats(spec.draft_layer, spec.max_draft)
    stats = stats if gate is None else replace(stats, drafting_off=gate.off)
    return _result(net, out, t1 - t0, time.perf_counter() - t1, stats)


@dataclass(frozen=True)
class Committed:
    """What one step committed: each row's next token from the full model [B], its drafts [B] and accepted ones
    [B], its kept drafts (host ints), and the step's width (1 + its widest row's drafts)."""

    following: torch.Tensor
    counts: torch.Tensor
    accepted: torch.Tensor
    kept: list[int]
    width: int


@dataclass(frozen=True)
class Step:
    """One step's drafts (None: a greedy plain step, the full model's decode step), its kind
    (calm.speculative.goodput: plain, context, twin or layer), the looked-up candidates it drafts (guesses) and all it
    looked up (looked_up), and each row's goodput plan."""

    draft: Draft | None
    kind: str
    guesses: list[list[list[int]]]
    looked_up: list[list[list[int]]]
    plans: list[RowPlan]
    twin: tuple[int, ...] = ()  # the tokens each row drafted with the twin (kind TWIN)


class _Loop:
    """What every step of a speculative generation shares: the network, the draft controller and its plan,
    the generation settings and the tree candidates."""

    def __init__(
        self, net: Network, policy: ExitPolicy, config: GenerationConfig, spec: SpeculativeConfig, twin: Network | None
    ) -> None:
        self.net, self.policy, self.config, self.spec = net, policy, config, spec
        self.plan = draft_plan(policy, net, spec)
        self.candidates = tree_candidates(net, spec, config.sampling)
        self.device = net.adapter.device
        self.generator = config.sampling.generator(self.device)
        # greedy steps without drafts run the full model's decode step, but a sliding window masks by slot distance,
        # which rejected drafts' holes stretch: only verification's positions (slot_context) see through them
        self.plain_decodes = not config.sampling.do_sample and getattr(net.adapter, "window", None) is None
        self.twin = twin  # the 4-bit twin that drafts where the context does not (None: none)

    def draft(
        self,
        state: DecodeState,
        pending: torch.Tensor,
        live: torch.Tensor,
        live_rows: list[bool],
        out: list[list[int]],
        lookup: BatchLookup | None,
        gate: GoodputGate | None,
    ) -> Step:
        """This step's drafts: from the twin where any row drafts with it (each other row its looked-up ones), else
        looked up in the context where any row drafts them, else from layer E, else (the goodput gate turned every
        row's drafting off) none."""
        spec, config = self.spec, self.config
        budget_left = [config.max_new_tokens - len(r) for r in out]
        looked_up = lookup_guesses(spec, lookup, out, live_rows, budget_left, self.candidates) if lookup else []
        limits = twin_limits(spec.max_draft, live_rows, budget_left) if self.twin is not None else []
        guesses, plans = looked_up, [RowPlan(layer=True, twin=n) for n in limits or [0] * len(out)]
        if gate is not None:
            layer_source = not spec.from_context and self.twin is None
            guesses, plans = gate_step(gate, looked_up, live_rows, layer_source, limits)
        lengths = twin_lengths([p.twin for p in plans], guesses)
        if self.twin is not None and any(lengths):
            guesses = with_twin_drafts(self.twin, state, pending, guesses, lengths)
            d = context_draft(self.net, state, pending, live, guesses, False)
            return Step(d, TWIN, guesses, looked_up, plans, tuple(lengths))
        if spec.from_context or any(guesses) or not any(p.layer for p in plans):
            kind = CONTEXT if any(guesses) else PLAIN
            empty = guesses if any(guesses) else [[] for _ in out]
            if kind == PLAIN and self.plain_decodes:
                return Step(None, kind, empty, looked_up, plans)
            return Step(context_draft(self.net, state, pending, live, empty, config.sampling.do_sample),
                        kind, empty, looked_up, plans)  # fmt: skip
        budget = torch.tensor([n if p.layer else 1 for n, p in zip(budget_left, plans)], device=self.device)
        d = draft(self.net, spec, self.plan, state, pending, live, budget, float(self.policy.threshold),
                  config.sampling, self.generator)  # fmt: skip
        return Step(d, LAYER, [[] for _ in out], looked_up, plans)

    def commit(
        self, state: DecodeState, step: Step, pending: torch.Tensor, live: torch.Tensor, live_rows: list[bool],
        out: list[list[int]],
    ) -> Committed:  # fmt: skip
        """Verify the step's drafts and commit what the full model keeps (each row's accepted path and next token)."""
        d = step.draft
        if d is None:
            return self._plain(state, pending, live, live_rows, out)
        h, kept_slots = verify(self.net, state, d)
        if self.config.sampling.do_sample:
            acc = accept_sampled(self.net, d, h, self.config.sampling, self.generator)
        else:
            acc = accept_greedy(self.net, d, h, kept_slots)
        kept = commit(out, d, rollback(state, d, acc, live), acc.following, live_rows, self.config)
        return Committed(acc.following, d.counts, acc.count, kept, d.tokens.shape[1] + 1)

    def _plain(
        self, state: DecodeState, pending: torch.Tensor, live: torch.Tensor, live_rows: list[bool], out: list[list[int]]
    ) -> Committed:
        """The full model's greedy decode step, where no row drafts: it costs less than verifying one slot (no
        drafted columns, no mask of holes to build where none were left)."""
        rows = live.nonzero()[:, 0]
        following = decode_one_token(self.net, NO_EXITS, pending, state, math.inf, rows).tokens(
            self.net, rows, self.config.sampling, None
        )
        for b, token in enumerate(following.tolist()):
            if live_rows[b]:
                out[b].append(token)
        none = torch.zeros_like(pending)
        return Committed(following, none, none, [0] * len(out), 1)


def _result(
    net: Network, out: list[list[int]], prefill_s: float, decode_s: float, stats: SpeculativeStats
) -> GenerationResult:
    token_ids = tuple(tuple(r) for r in out)
    timings = Timings(
        prefill_s=prefill_s,
        decode_s=decode_s,
        new_tokens=sum(len(r) for r in token_ids),
        decode_tokens=sum(max(len(r) - 1, 0) for r in token_ids),
    )
    exit_layers = tuple((net.num_layers,) * len(r) for r in token_ids)
    return GenerationResult(token_ids, exit_layers, net.num_layers, timings, speculative=stats)
