"""Drafting that stops where it does not pay: a per-row goodput rule for speculative decoding.

A verification step that checks a row's pending token and d drafted tokens commits 1 + (drafts kept)
tokens and costs more than a plain step: a wider pass, and for drafts from layer E the layers 1..E that
drafted them. As in SmartSpec (Liu et al., 2024), each row drafts only what maximises its goodput, the
expected tokens committed per step over the step's cost:

    goodput(d) = (1 + α + α² + … + α^d) / cost(d + 1),   d = 0 (no draft) … what the lookup found,

(a draft must beat the plain step by GAIN_MARGIN, 2%: smaller expected gains are within timing noise)
with α the row's own recent acceptance of a drafted token (an exponential moving average over the
tokens it verified: each kept draft is a success, the first rejected one a failure). d = 0 is a plain
step, goodput 1 / cost(1): a row whose drafts are below break-even stops drafting.

Restart: a row that does not draft still looks its context up, and whether the lookup's first token
matches the token the full model then commits updates its α at no model cost ("shadow" acceptance). Once
lookups match again, its goodput rises above break-even and it drafts again.

Drafts from layer E (where the lookup found nothing) have no shadow: they start off, a row tries them after
PROBE_EVERY plain steps, keeps the tokens per step its layer-E steps committed (moving average) and drafts
from layer E while that beats a plain step at their measured cost.

Drafts from the model's 4-bit twin (calm.speculative.twin_drafts) are chosen like looked-up ones, by goodput
with the row's own acceptance of the twin's tokens (a separate moving average) and the measured cost of a twin
step of that width (its d twin decodes and the wider verification). A row whose twin drafts stop paying tries
them again after PROBE_EVERY plain steps. Where both sources offer drafts, the row takes the one of higher goodput.

Cost: a simple cost model measured in the run itself, not assumed. Every step's CPU time
(time.process_time: other processes sharing the CPU do not inflate it) is averaged per kind of step:
plain, context drafts of width w, layer-E drafts. Costs are in units of a plain step. A kind not yet
measured takes a prior: PRIOR_WIDTH_COST of a plain step per extra verified position (the stored
benchmark measured verification of 2–7 positions within 0.9–1.16× of one at batch 1 on this CPU,
benchmarks/results/speculative_smollm2.md), and E/L of a step per drafted token from layer E.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA_PRIOR = 0.4  # a row's acceptance before it has verified anything: drafting starts on
ALPHA_RATE = 0.25  # weight of each new verified token in the moving average
COST_RATE = 0.2  # weight of each new step time in the moving average of its kind
PRIOR_WIDTH_COST = 0.05  # an extra verified position, in plain steps, until measured
LAYER_GAIN_PRIOR = 1.0  # tokens a layer-E step commits before it is measured: off until a probe shows they pay
PROBE_EVERY = 24  # plain steps after which a row tries layer-E drafts again
GAIN_MARGIN = 0.02  # a draft must beat a plain step's goodput by this much: smaller gains are within timing noise
PLAIN_EVERY = 48  # steps after which a plain step is timed again, the unit every other cost is measured in
TWIN_ALPHA_PRIOR = 0.8  # a row's acceptance of twin drafts before it has verified any: the twin agrees on most tokens
TWIN_DRAFT_PRIOR = 0.5  # a token drafted by the 4-bit twin, in plain steps, until measured (about half a float step)
PLAIN, CONTEXT, LAYER, TWIN = "plain", "context", "layer", "twin"


@dataclass(frozen=True)
class RowPlan:
    """What one row does in a step: how many looked-up tokens it drafts, whether it may draft from layer E,
    and whether it checks its undrafted lookup against the committed token afterwards (shadow)."""

    context: int = 0
    layer: bool = False
    shadow: bool = False
    twin: int = 0  # tokens it drafts with the model's 4-bit twin


class GoodputGate:
    """Per-row acceptance, the run's measured step costs, and each row's goodput-maximising draft."""

    def __init__(self, rows: int, draft_fraction: float) -> None:
        self.alpha = [ALPHA_PRIOR] * rows
        self.layer_gain = [LAYER_GAIN_PRIOR] * rows
        self.plain_steps = [0] * rows  # plain steps since the row's last layer-E step
        self.twin_alpha = [TWIN_ALPHA_PRIOR] * rows
        self.twin_idle = [0] * rows  # steps since the row's last twin draft
        self.draft_fraction = draft_fraction  # E / L: a layer-E draft's share of a plain step
        self.seconds: dict[tuple[str, int], float] = {}  # (kind, width) -> moving average CPU seconds
        self.off = 0  # row-steps that drafted nothing although a draft source was there
        self.steps = 0  # steps planned (gate_step)
        self.last_plain = 0  # the step count when a plain step was last timed

    def reset(self, b: int) -> None:
        """A new request took row b (a continuous batch's slot): its acceptance starts again from the priors; the
        measured step costs stay."""
        self.alpha[b], self.layer_gain[b], self.plain_steps[b] = ALPHA_PRIOR, LAYER_GAIN_PRIOR, 0
        self.twin_alpha[b], self.twin_idle[b] = TWIN_ALPHA_PRIOR, 0

    # ---- costs ------------------------------------------------------------------------------
    def _prior(self, kind: str, width: int) -> float:
        if kind == LAYER:  # a layer-E step, whatever it drafted: about one draft's layers and a wider pass
            return 1.0 + self.draft_fraction + PRIOR_WIDTH_COST
        if kind == TWIN:
            return 1.0 + (width - 1) * (PRIOR_WIDTH_COST + TWIN_DRAFT_PRIOR)
        return 1.0 + (width - 1) * PRIOR_WIDTH_COST

    @staticmethod
    def _key(kind: str, width: int) -> tuple[str, int]:
        """Plain steps and context steps by width; layer-E steps all under one key (their width is decided
        while drafting)."""
        if kind == LAYER:
            return (LAYER, 0)
        return (PLAIN, 1) if width <= 1 else (kind if kind == TWIN else CONTEXT, width)

    def cost(self, kind: str, width: int = 1) -> float:
        """A step of this kind and width, in plain steps: measured where this run has timed one (against the
        plain step, measured or estimated from another kind through its prior), else the prior."""
        key = self._key(kind, width)
        if key == (PLAIN, 1):
            return 1.0
        measured = self.seconds.get(key)
        base = self._plain_seconds()
        if measured is None or base is None:
            return self._prior(kind, width)
        return measured / base

    def _plain_seconds(self) -> float | None:
        if (PLAIN, 1) in self.seconds:
            return self.seconds[(PLAIN, 1)]
        estimates = [s / self._prior(kind, width) for (kind, width), s in self.seconds.items()]
        return min(estimates) if estimates else None

    def timed(self, kind: str, width: int, seconds: float) -> None:
        """One step's CPU seconds, of a kind (plain, context, layer) and width (1 + the widest row's drafts)."""
        key = self._key(kind, width)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + COST_RATE * (seconds - old)
        if key == (PLAIN, 1):
            self.last_plain = self.steps

    def timed_step(self, kind: str, width: int, seconds: float, verify_seconds: float) -> None:
        """timed, for a whole step whose verification took verify_seconds of its seconds. A twin step's verification,
        over its slots' embeddings, is also a context step of that width: the plain-step estimate then rests on a
        measured verification, not on the twin's own prior."""
        if kind == TWIN:
            self.timed(CONTEXT, width, verify_seconds)
        self.timed(kind, width, seconds)

    def plain_due(self) -> bool:
        """Whether this step runs plain for every row, to time the unit of cost again: after PLAIN_EVERY steps
        without one. (Between them, the plain step is estimated from the other kinds' timings through their
        priors; a twin step's verification is timed as the context step of its width for that.)"""
        return self.steps - self.last_plain >= PLAIN_EVERY

    # ---- decisions ------------------------------------------------------------------------------
    def expected_tokens(self, b: int, drafted: int, kind: str = CONTEXT) -> float:
        """Tokens a step commits for row b with `drafted` tokens of a source (context, twin): 1 + α + … + α^d."""
        a = self.twin_alpha[b] if kind == TWIN else self.alpha[b]
        return 1.0 + sum(a**i for i in range(1, drafted + 1))

    def context_length(self, b: int, found: int) -> int:
        """How many of the `found` looked-up tokens row b drafts: the goodput-maximising count (0: none)."""
        return self.best_length(b, CONTEXT, found)[0]

    def best_length(self, b: int, kind: str, found: int) -> tuple[int, float]:
        """Row b's goodput-maximising draft from a source (context or twin) offering up to `found` tokens, and its
        goodput; (0, break-even) where no draft beats a plain step."""
        best, best_goodput = 0, 1.0 + GAIN_MARGIN  # a plain step: one token per plain step, and the margin
        for d in range(1, found + 1):
            goodput = self.expected_tokens(b, d, kind) / self.cost(kind, d + 1)
            if goodput > best_goodput:
                best, best_goodput = d, goodput
        return best, best_goodput

    def layer_pays(self, b: int) -> bool:
        """Whether row b drafts from layer E this step: its layer-E steps beat a plain step, or it is time to
        try them again."""
        if self.plain_steps[b] >= PROBE_EVERY:
            return True
        return self.layer_gain[b] / self.cost(LAYER) > 1.0 + GAIN_MARGIN

    def plan(self, b: int, found: list[int], layer_source: bool, twin_limit: int = 0) -> RowPlan:
        """Row b's step, from the lengths of its looked-up candidates (found), whether drafts from layer E are the
        fallback, and how many tokens the twin may draft (0: no twin)."""
        longest = max(found, default=0)
        context, context_goodput = self.best_length(b, CONTEXT, longest)
        twin, twin_goodput = self.best_length(b, TWIN, twin_limit)
        if twin and twin_goodput > context_goodput or not context and twin_limit and self.twin_idle[b] >= PROBE_EVERY:
            return RowPlan(twin=twin or twin_limit, shadow=longest > 0)
        if context:
            return RowPlan(context=context)
        layer = layer_source and self.layer_pays(b)
        if not layer and (longest or layer_source or twin_limit):
            self.off += 1
        return RowPlan(layer=layer, shadow=longest > 0)

    # ---- what verification found --------------------------------------------------------------
    def verified(self, b: int, drafted: int, kept: int) -> None:
        """Row b drafted `drafted` looked-up tokens and the full model kept `kept`: kept successes, then one
        failure where it rejected one."""
        for _ in range(kept):
            self._trial(b, 1.0)
        if kept < drafted:
            self._trial(b, 0.0)

    def twin_verified(self, b: int, drafted: int, kept: int) -> None:
        """Row b drafted `drafted` tokens with the twin and the full model kept `kept`."""
        for _ in range(kept):
            self.twin_alpha[b] += ALPHA_RATE * (1.0 - self.twin_alpha[b])
        if kept < drafted:
            self.twin_alpha[b] += ALPHA_RATE * (0.0 - self.twin_alpha[b])
        self.twin_idle[b] = 0

    def shadow(self, b: int, matched: bool) -> None:
        """Row b did not draft; its lookup's first token was (or was not) the token the full model committed."""
        self._trial(b, 1.0 if matched else 0.0)

    def layer_step(self, b: int, committed: int) -> None:
        """Row b drafted from layer E and the step committed `committed` tokens."""
        self.layer_gain[b] += ALPHA_RATE * (committed - self.layer_gain[b])
        self.plain_steps[b] = 0

    def plain_step(self, b: int) -> None:
        self.plain_steps[b] += 1
        self.twin_idle[b] += 1

    def _trial(self, b: int, outcome: float) -> None:
        self.alpha[b] += ALPHA_RATE * (outcome - self.alpha[b])


def gate_step(
    gate: GoodputGate,
    guesses: list[list[list[int]]],
    live: list[bool],
    layer_source: bool,
    twin_limits: list[int] | None = None,
) -> tuple[list[list[list[int]]], list[RowPlan]]:
    """Each live row's plan for this step, and its looked-up candidates cut to what it drafts (none where its
    goodput says a plain step, a twin draft or a layer-E draft pays more). twin_limits: how many tokens each row's
    twin may draft (empty: no twin)."""
    rows = len(live)
    guesses = guesses or [[] for _ in range(rows)]
    gate.steps += 1
    if gate.plain_due():
        return [[] for _ in range(rows)], [RowPlan(shadow=bool(g)) if on else RowPlan() for g, on in zip(guesses, live)]
    limits = twin_limits or [0] * rows
    plans = [
        gate.plan(b, [len(c) for c in guesses[b]], layer_source, limits[b]) if live[b] else RowPlan()
        for b in range(rows)
    ]
    cut = [[c[: p.context] for c in row] if p.context else [] for row, p in zip(guesses, plans)]
    return cut, plans


def gate_verified(
    gate: GoodputGate,
    plans: list[RowPlan],
    looked_up: list[list[list[int]]],
    drafted: list[int],
    kept: list[int],
    first_committed: list[int | None],
    kind: str,
) -> None:
    """What a step showed each row: its kept drafts (context), its committed tokens (layer E), or whether
    its undrafted lookup named the committed token (shadow)."""
    for b, plan in enumerate(plans):
        if first_committed[b] is None:
            continue
        if plan.context:
            gate.verified(b, drafted[b], kept[b])
        elif plan.twin:
            gate.twin_verified(b, drafted[b], kept[b])
        elif plan.layer and kind == LAYER:
            gate.layer_step(b, kept[b] + 1)
        else:
            gate.plain_step(b)
        if plan.shadow and looked_up[b] and looked_up[b][0]:
            gate.shadow(b, any(c and c[0] == first_committed[b] for c in looked_up[b]))
