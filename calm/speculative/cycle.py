"""Lossless speculative cycles inside a continuous batch (calm.engine.scheduler's Drafter).

The scheduler asks, at every step, whether drafting pays for the rows now live: `wants(n)` follows the
measurement stored with the checkpoint for n rows (MeasuredSetting: batch 1, and batch 8 from
LARGE_BATCH_FROM rows), as vLLM turns speculation off under load. A cycle is the one of
calm.speculative.drafting (draft from the context or layer E, verify with the full model, accept, roll back) run
over the batch's slots: each row's drafts are looked up in its own prompt and output, and a row that
joins gets a fresh index.
"""

from __future__ import annotations

import time

import torch

from calm.engine.decode import Network
from calm.engine.sampling import SamplingConfig
from calm.engine.scheduler import Cycle
from calm.engine.slots import SlotBatch
from calm.engine.speculative_stats import SpeculativeStats, Tally
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
from calm.speculative.lookup import BatchLookup
from calm.speculative.lossless import LOSSLESS, MeasuredModel, drafts_description, resolve_mode
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
        # a sliding window masks by slot distance, which rejected drafts' holes would stretch: such models draft
        # alone (generate_speculative), and in a continuous batch run the full model's step
        self.windowed = getattr(net.adapter, "window", None) is not None

    def wants(self, live_rows: int) -> bool:
        return live_rows <= self.most_rows and not self.windowed

    def joined(self, slot: int, prompt: list[int]) -> None:
        if self.lookup is not None:
            self.lookup.reset(slot, prompt)

    def describe(self) -> str:
        return f"speculative ({drafts_description(self.spec, self.policy)})"

    def stats(self) -> SpeculativeStats:
        return self.tally.stats(self.spec.draft_layer, self.spec.max_draft)

    def cycle(
        self, net: Network, batch: SlotBatch, pending: torch.Tensor, outputs: list[list[int] | None], budgets: list[int]
    ) -> Cycle:
        """One cycle over the live slots (outputs[b] not None; budgets[b] >= 1 tokens left). -> each slot's
        committed tokens (its accepted drafts and the full model's next token; empty for free slots) and drafts."""
        live_rows = [o is not None for o in outputs]
        rows = [o if o is not None else [] for o in outputs]
        live = torch.tensor(live_rows, device=pending.device)
        # free slots skip attention (T5's relative bias broadcasts over every row: it attends all of them)
        whole = all(live_rows) or net.adapter.is_encoder_decoder
        attending = None if whole else live.nonzero()[:, 0]
        start = time.perf_counter()
        d, guesses = self._draft(net, batch, pending, live, rows, budgets, attending)
        drafted = time.perf_counter()
        h, kept_slots = verify(net, batch.state, d, attending)
        acc = accept_greedy(net, d, h, kept_slots)
        keep = rollback(batch.state, d, acc, live)[:, 1:].tolist()
        tokens, following = d.tokens.tolist(), acc.following.tolist()
        new = [
            [t for t, on in zip(tokens[b], keep[b]) if on] + [following[b]] if live_rows[b] else []
            for b in range(len(rows))
        ]
        if self.lookup is not None and d.layer == CONTEXT_DRAFT:
            self.lookup.verified([max(map(len, g), default=0) for g in guesses], [max(len(n) - 1, 0) for n in new])
        self.tally.add(d.counts, acc.count, live_rows, (drafted - start, time.perf_counter() - drafted), d.layer == 0)
        return Cycle(new, [n if on else 0 for n, on in zip(d.counts.tolist(), live_rows)])

    def _draft(
        self,
        net: Network,
        batch: SlotBatch,
        pending: torch.Tensor,
        live: torch.Tensor,
        rows: list[list[int]],
        budget: list[int],
        attending: torch.Tensor | None,
    ) -> tuple[Draft, list[list[list[int]]]]:
        """The cycle's drafts: looked up in each row's context where any row finds some (or always, E = 0), else
        from layer E under the draft controller. Each row drafts at most its budget - 1."""
        guesses: list[list[list[int]]] = []
        if self.lookup is not None:
            live_rows = [b > 0 for b in budget]
            guesses = lookup_guesses(self.spec, self.lookup, rows, live_rows, budget, self.candidates)
        if self.spec.from_context or any(guesses):
            return context_draft(net, batch.state, pending, live, guesses, False), guesses
        budgets = torch.tensor(budget, device=pending.device)
        threshold = float(self.policy.threshold)
        d = draft(net, self.spec, self.plan, batch.state, pending, live, budgets, threshold, GREEDY, None, attending)
        return d, guesses


def lossless_drafter(model: MeasuredModel, slots: int) -> LosslessDrafter | None:
    """The drafter of a continuous batch of `slots` rows that wants the full model's output: the setting
    resolve_mode picks for one row, run while the stored measurement says drafting pays for the rows live
    (None: it pays for no row count, and the batch runs the full model)."""
    first = resolve_mode(model, LOSSLESS, batch_size=1)
    if first is None or first.spec is None:
        return None
    paying = [n for n in range(1, slots + 1) if _pays(model, n)]
    return LosslessDrafter(model.network, first.spec, first.policy, slots, max(paying, default=1))


def _pays(model: MeasuredModel, rows: int) -> bool:
    run = resolve_mode(model, LOSSLESS, batch_size=rows)
    return run is not None and run.spec is not None
