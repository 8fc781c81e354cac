"""Lossless speculative cycles inside a continuous batch (calm.engine.scheduler's Drafter).

The scheduler asks, at every step, whether drafting pays for the rows now live: `wants(n)` follows the
measurement stored with the checkpoint for n rows (MeasuredSetting: batch 1, and batch 8 from
LARGE_BATCH_FROM rows), as vLLM turns speculation off under load. A cycle is the one of
calm.speculative.drafting (draft from the context or layer E, verify with the full model, accept, roll back) run
over the batch's slots: each row's drafts are looked up in its own prompt and output, and a row that
joins gets a fresh index.

In lossless mode each slot drafts only where its goodput says drafting pays (calm.speculative.goodput, as in
generate_speculative): a cycle where no live row drafts is handed back (None), the scheduler runs the full
model's plain decode step, and tells the drafter what it committed and cost (`plain`). A request that joins
starts from the gate's priors.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from calm.engine.decode import Network
from calm.engine.sampling import SamplingConfig
from calm.engine.scheduler import Cycle
from calm.engine.slots import SlotBatch
from calm.engine.speculative_stats import SpeculativeStats, Tally
from calm.engine.twin import twin_of
from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import (
    CONTEXT_DRAFT,
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
from calm.speculative.lossless import LOSSLESS, MeasuredModel, drafts_description, resolve_mode
from calm.speculative.twin_drafts import looked_up_lengths, twin_lengths, twin_limits, with_twin_drafts
from calm.speculative.verification import Draft, accept_greedy, rollback, verify

GREEDY = SamplingConfig()


class LosslessDrafter:
    """Speculative cycles with one setting (spec and its draft controller) while at most `most_rows` rows are live."""

    def __init__(self, net: Network, spec: SpeculativeConfig, policy: ExitPolicy, slots: int, most_rows: int) -> None:
        self.spec, self.policy, self.most_rows = spec, policy, most_rows
        self.plan = draft_plan(policy, net, spec)
        self.candidates = tree_candidates(net, spec, GREEDY)
        self.width = default_cache_slots(0, spec)  # one cycle's columns
        self.lookup = BatchLookup([[] for _ in range(slots)], spec.max_draft, spec.adaptive) if spec.looks_up else None
        self.tally = Tally()
        self.gate = GoodputGate(slots, spec.draft_layer / net.num_layers) if spec.goodput else None
        self._undrafted: tuple[list[RowPlan], list[list[list[int]]]] | None = None  # a cycle handed back: its plans
        # a sliding window masks by slot distance, which rejected drafts' holes would stretch: such models draft
        # alone (generate_speculative), and in a continuous batch run the full model's step
        self.windowed = getattr(net.adapter, "window", None) is not None
        self.twin = twin_of(net) if spec.twin else None

    def wants(self, live_rows: int) -> bool:
        return live_rows <= self.most_rows and not self.windowed

    def joined(self, slot: int, prompt: list[int]) -> None:
        if self.lookup is not None:
            self.lookup.reset(slot, prompt)
        if self.gate is not None:
            self.gate.reset(slot)

    def describe(self) -> str:
        gated = "; each row drafts only where it pays (goodput)" if self.gate is not None else ""
        return f"speculative ({drafts_description(self.spec, self.policy)}{gated})"

    def stats(self) -> SpeculativeStats:
        stats = self.tally.stats(self.spec.draft_layer, self.spec.max_draft)
        return stats if self.gate is None else replace(stats, drafting_off=self.gate.off)

    def cycle(
        self, net: Network, batch: SlotBatch, pending: torch.Tensor, outputs: list[list[int] | None], budgets: list[int]
    ) -> Cycle | None:
        """One cycle over the live slots (outputs[b] not None; budgets[b] >= 1 tokens left). -> each slot's
        committed tokens (its accepted drafts and the full model's next token; empty for free slots) and drafts.
        None: the goodput gate turned every live slot's drafting off; the caller runs the plain step (`plain`)."""
        live_rows = [o is not None for o in outputs]
        rows = [o if o is not None else [] for o in outputs]
        cpu = time.process_time()
        looked_up, guesses, plans = self._lookups(rows, budgets, live_rows)
        if self.gate is not None and not any(guesses) and not any(p.layer or p.twin for p in plans):
            self._undrafted = (plans, looked_up)
            return None
        live = torch.tensor(live_rows, device=pending.device)
        # free slots skip attention (T5's relative bias broadcasts over every row: it attends all of them)
        whole = all(live_rows) or net.adapter.is_encoder_decoder
        attending = None if whole else live.nonzero()[:, 0]
        start = time.perf_counter()
        twin = twin_lengths([p.twin for p in plans], guesses) if self.twin is not None else []
        if self.twin is not None and any(twin):
            guesses = with_twin_drafts(self.twin, batch.state, pending, guesses, twin, attending)
        d = self._draft(net, batch, pending, live, guesses, plans, budgets, attending)
        drafted, verify_cpu = time.perf_counter(), time.process_time()
        h, kept_slots = verify(net, batch.state, d, attending)
        acc = accept_greedy(net, d, h, kept_slots)
        keep = rollback(batch.state, d, acc, live)[:, 1:].tolist()
        tokens, following = d.tokens.tolist(), acc.following.tolist()
        new = [
            [t for t, on in zip(tokens[b], keep[b]) if on] + [following[b]] if live_rows[b] else []
            for b in range(len(rows))
        ]
        longest = [max(map(len, g), default=0) for g in guesses]
        kept = [max(len(n) - 1, 0) for n in new]
        if self.lookup is not None and d.layer == CONTEXT_DRAFT:
            self.lookup.verified(looked_up_lengths(twin, longest), kept)
        seconds = (drafted - start, time.perf_counter() - drafted)
        self.tally.add(d.counts, acc.count, live_rows, seconds, d.layer == 0 and not any(twin))
        if self.gate is not None:
            kind = TWIN if any(twin) else CONTEXT if d.layer == CONTEXT_DRAFT else LAYER
            end = time.process_time()
            self.gate.timed_step(kind, d.tokens.shape[1] + 1, end - cpu, end - verify_cpu)
            gate_verified(self.gate, plans, looked_up, longest, kept, [n[0] if n else None for n in new], kind)
        return Cycle(new, [n if on else 0 for n, on in zip(d.counts.tolist(), live_rows)])

    def plain(self, committed: list[int | None], cpu_s: float, wall_s: float) -> None:
        """The plain step that ran for a cycle handed back: each slot's committed token (None: free slot) and the
        step's CPU and wall seconds. It counts as a step without drafts, as in generate_speculative's stats."""
        if self.gate is None or self._undrafted is None:
            return
        plans, looked_up = self._undrafted
        self._undrafted = None
        self.gate.timed(PLAIN, 1, cpu_s)
        none = [0] * len(plans)
        gate_verified(self.gate, plans, looked_up, none, none, committed, PLAIN)
        zeros = torch.zeros(len(plans), dtype=torch.long)
        self.tally.add(zeros, zeros, [c is not None for c in committed], (0.0, wall_s), False)

    def _lookups(
        self, rows: list[list[int]], budgets: list[int], live_rows: list[bool]
    ) -> tuple[list[list[list[int]]], list[list[list[int]]], list[RowPlan]]:
        """What each live row's lookup found, what of it the row drafts, and its plan (the goodput gate's, or
        drafting everything found and else from layer E)."""
        looked_up: list[list[list[int]]] = []
        if self.lookup is not None:
            looked_up = lookup_guesses(self.spec, self.lookup, rows, live_rows, budgets, self.candidates)
        limits = twin_limits(self.spec.max_draft, live_rows, budgets) if self.twin is not None else []
        if self.gate is None:
            return looked_up, looked_up, [RowPlan(layer=True, twin=n) for n in limits or [0] * len(rows)]
        layer_source = not self.spec.from_context and self.twin is None
        guesses, plans = gate_step(self.gate, looked_up, live_rows, layer_source, limits)
        return looked_up, guesses, plans

    def _draft(
        self,
        net: Network,
        batch: SlotBatch,
        pending: torch.Tensor,
        live: torch.Tensor,
        guesses: list[list[list[int]]],
        plans: list[RowPlan],
        budget: list[int],
        attending: torch.Tensor | None,
    ) -> Draft:
        """The cycle's drafts: the looked-up (or the twin's) ones where any row drafts some (or always, E = 0), else
        from layer E under the draft controller, for the rows whose plan says so. Each row drafts at most its
        budget - 1."""
        if self.spec.from_context or any(guesses):
            return context_draft(net, batch.state, pending, live, guesses or [[] for _ in budget], False)
        budgets = torch.tensor([n if p.layer else 1 for n, p in zip(budget, plans)], device=pending.device)
        threshold = float(self.policy.threshold)
        return draft(net, self.spec, self.plan, batch.state, pending, live, budgets, threshold, GREEDY, None, attending)


def lossless_drafter(model: MeasuredModel, slots: int, twin: bool | None = None) -> LosslessDrafter | None:
    """The drafter of a continuous batch of `slots` rows that wants the full model's output: the setting
    resolve_mode picks for one row (twin: whether the 4-bit twin drafts; None: as stored), run while the stored
    measurement says drafting pays for the rows live (None: it pays for no row count, and the batch runs the full
    model)."""
    first = resolve_mode(model, LOSSLESS, batch_size=1, twin=twin)
    if first is None or first.spec is None:
        return None
    paying = [n for n in range(1, slots + 1) if _pays(model, n)]
    return LosslessDrafter(model.network, first.spec, first.policy, slots, max(paying, default=1))


def _pays(model: MeasuredModel, rows: int) -> bool:
    run = resolve_mode(model, LOSSLESS, batch_size=rows)
    return run is not None and run.spec is not None
