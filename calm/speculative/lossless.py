"""Which lossless run the user's switches ask for: speculative decoding at a draft layer and length, or
the full model, decided from the measurement stored with the checkpoint.

`--mode speculative` always runs speculative decoding (draft layer, length and controller from the
flags, else from the stored measurement, else L/2, 4 and the default controller).

`--lossless` (mode "lossless", the default where no exit knob is given: pick_mode) asks for the full
model's output as fast as this checkpoint can give it. The rule:
speculative decoding with the stored setting when the checkpoint's stored measurement
(benchmarks/bench_speculative.py --store, at batch 1, and at batch 8 for runs of LARGE_BATCH_FROM rows
or more) found it at least MIN_GAIN (5%, above the run-to-run noise of those benchmarks) faster than
full depth; otherwise the full model, with a note saying why. The full model is lossless by
definition, so the fallback never changes the output, only the speed. Explicit --draft-layer,
--max-draft or --lookup make it speculative anyway.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Protocol

from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import (
    ALWAYS_DRAFT,
    DEFAULT_DRAFT_THRESHOLD,
    DEFAULT_MAX_DRAFT,
    NO_CONTROLLER,
    SpeculativeConfig,
    default_draft_layer,
    default_draft_policy,
)
from calm.speculative.options import SpeculativeOptions

if TYPE_CHECKING:
    from calm.engine.decode import Network
    from calm.engine.speculative_stats import SpeculativeStats


class MeasuredModel(Protocol):
    """What picking a lossless run reads off a model: the checkpoint metadata holding the stored
    measurement (extra), its depth and its network. CalmModel is one."""

    @property
    def extra(self) -> dict: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def network(self) -> Network: ...


STORE_KEY = "speculative"  # where a checkpoint's calm_config.json "extra" keeps the measurement
MIN_GAIN = 1.05  # a measured speedup below this is within benchmark noise: no gain
LARGE_BATCH_KEY = "batch8"  # the measurement at batch 8, kept inside the batch-1 one
LARGE_BATCH_FROM = 5  # batches of this many rows or more follow the batch-8 measurement (the nearer one)
LOSSLESS = "lossless"
GENERATE_MODES = ("calm", "speculative", LOSSLESS)


def pick_mode(mode: str | None, exits_asked: bool) -> str:
    """The mode a run takes: the one named, else calm's early exit where the caller asked for exits (a
    policy, knob or threshold), else the full model's exact output as fast as the checkpoint gives it."""
    if mode is None:
        return "calm" if exits_asked else LOSSLESS
    if mode not in GENERATE_MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(GENERATE_MODES)}")
    return mode


@dataclass(frozen=True)
class MeasuredSetting:
    """The fastest speculative setting a benchmark found for a checkpoint, and its speed."""

    draft_layer: int
    max_draft: int
    measure: str  # draft controller
    threshold: float
    speedup_vs_full: float  # tokens/s over never-exit calm at the measured batch size, same run
    acceptance_rate: float
    report: str  # the report it comes from
    lookup: bool = False  # drafts looked up in the context first (older stored measurements lack it)
    full_decode_tokens_per_s: float = 0.0  # never-exit calm's decode rate in that run, per CPU second (0: unknown)
    machine: str = ""  # the CPU it was measured on
    adaptive: bool = False  # context drafts whose length adapts per row (calm.speculative.lookup.BatchLookup)
    candidates: int = 1  # candidate context drafts per row, verified as a tree (calm.speculative.tree)
    twin: bool = False  # the model's 4-bit twin drafts where the context does not (calm.speculative.twin_drafts)

    @property
    def beats_full_depth(self) -> bool:
        return math.isfinite(self.speedup_vs_full) and self.speedup_vs_full >= MIN_GAIN

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_extra(cls, extra: dict | None, batch_size: int = 1) -> MeasuredSetting | None:
        """The stored measurement nearest to batch_size rows: batch 1, or batch 8 from LARGE_BATCH_FROM."""
        data = dict((extra or {}).get(STORE_KEY) or {})
        large = data.pop(LARGE_BATCH_KEY, None)
        if measured_batch(extra, batch_size) == 8:
            data = large
        if not data:
            return None
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(
                f"the speculative measurement stored with this checkpoint is unreadable ({exc}); "
                "run benchmarks/bench_speculative.py --store again"
            ) from exc


def measured_batch(extra: dict | None, batch_size: int) -> int:
    """The batch size of the stored measurement a run of batch_size rows follows: 8 from LARGE_BATCH_FROM
    rows where a batch-8 measurement is stored, else 1."""
    stored = (extra or {}).get(STORE_KEY) or {}
    return 8 if batch_size >= LARGE_BATCH_FROM and stored.get(LARGE_BATCH_KEY) else 1


@dataclass(frozen=True)
class ModeRun:
    spec: SpeculativeConfig | None  # None: calm's own decoding under policy (the full model: never exits)
    policy: ExitPolicy  # speculative: the draft controller
    description: str

    def generate_kwargs(self) -> dict:
        """What CalmModel.generate takes for this run besides the policy: its speculative= options."""
        options = SpeculativeOptions.running(self.spec)
        return {} if options is None else {"speculative": options}


def resolve_mode(  # long: one switch per command-line option, each documented here
    model: MeasuredModel,
    mode: str = "calm",
    lossless: bool = False,
    draft_layer: int | None = None,
    max_draft: int | None = None,
    measure: str | None = None,
    threshold: float | None = None,
    lookup: bool = False,
    batch_size: int = 1,
    candidates: int | None = None,
    goodput: bool | None = None,
    twin: bool | None = None,
) -> ModeRun | None:
    """The lossless run the switches ask for; None for plain calm (mode "calm" without --lossless).
    measure and threshold set the draft controller; lookup: drafts looked up in the context first;
    batch_size picks the stored measurement (MeasuredSetting.from_extra); candidates: context drafts per
    row verified at once (None: the stored setting's where E and k are its, else 1); goodput: each row drafts only
    where its goodput beats a plain step (calm.speculative.goodput; None: in lossless mode, not in mode
    "speculative", which always drafts); twin: the 4-bit twin drafts where the context does not (None: as stored).
    The one rule for the command line and CalmModel.generate."""
    lossless = lossless or pick_mode(mode, False) == LOSSLESS
    mode = "calm" if mode == LOSSLESS else mode
    if mode == "calm" and not lossless:
        if draft_layer is not None or max_draft is not None or lookup:
            raise InputError(
                "--draft-layer, --max-draft and --lookup (draft_layer=, max_draft=, lookup=) need --mode speculative "
                "or lossless; calm's early exit (an exit knob or mode='calm') takes none of them"
            )
        return None
    stored = MeasuredSetting.from_extra(model.extra, batch_size)
    named = draft_layer is not None or max_draft is not None or lookup or twin is True  # twin=True: drafts asked for
    explicit = mode == "speculative" or named
    if not explicit:
        if stored is None:
            return ModeRun(
                None,
                ExitPolicy.never(),
                "full model (lossless; no speculative measurement is stored "
                "with this checkpoint: benchmarks/bench_speculative.py --store)",
            )
        if not stored.beats_full_depth:
            return ModeRun(
                None,
                ExitPolicy.never(),
                f"full model (lossless; speculative decoding measured no gain on this checkpoint at batch "
                f"{measured_batch(model.extra, batch_size)}: best E={stored.draft_layer}, "
                f"k={stored.max_draft} at {stored.speedup_vs_full:.2f}× full depth, {stored.report})",
            )
    spec = _spec(model, stored, draft_layer, max_draft, lookup)
    spec = spec if candidates is None else replace(spec, candidates=candidates)
    spec = replace(spec, goodput=lossless if goodput is None else goodput, twin=_twin(model, stored, twin, draft_layer))
    spec.check(model.num_layers)
    if spec.from_context and (measure is not None or threshold is not None):
        raise InputError(NO_CONTROLLER)
    policy = ALWAYS_DRAFT if spec.from_context else _controller(model, stored, measure, threshold)
    measured = ""
    if stored is not None and (draft_layer, max_draft, lookup) == (None, None, False):
        where = f"batch {measured_batch(model.extra, batch_size)}"
        measured = f"; measured {stored.speedup_vs_full:.2f}× full depth at {where} ({stored.report})"
    gated = "; drafting stops per row where it does not pay (goodput)" if spec.goodput else ""
    return ModeRun(spec, policy, f"speculative (lossless): {drafts_description(spec, policy)}{gated}{measured}")


def run_description(run: ModeRun | None, stats: SpeculativeStats | None, fallback: str) -> str:
    """What a run decoded with, and for a speculative one what this run's drafts did: tokens committed per
    step, acceptance of drafted tokens, and the steps whose drafting the goodput rule turned off."""
    if run is None:
        return fallback
    if stats is None or not stats.row_cycles:
        return run.description
    acceptance = f"acceptance {stats.acceptance_rate:.2f}" if stats.drafted else "nothing drafted"
    off = f", drafting off in {stats.drafting_off} of {stats.row_cycles} steps" if run.spec and run.spec.goodput else ""
    return f"{run.description}; this run: {stats.tokens_per_step:.2f} tokens per step, {acceptance}{off}"


def _spec(
    model: MeasuredModel, stored: MeasuredSetting | None, draft_layer: int | None, max_draft: int | None, lookup: bool
) -> SpeculativeConfig:
    """E, k, lookup, adaptive and candidates: as given, else the stored measurement's, else L/2 and
    DEFAULT_MAX_DRAFT."""
    default_layer = stored.draft_layer if stored else default_draft_layer(model.num_layers)
    spec = SpeculativeConfig(
        draft_layer if draft_layer is not None else default_layer,
        max_draft if max_draft is not None else stored.max_draft if stored else DEFAULT_MAX_DRAFT,
        lookup or (stored is not None and stored.lookup and draft_layer is None),
    )
    if stored is not None and (spec.draft_layer, spec.max_draft) == (stored.draft_layer, stored.max_draft):
        spec = replace(spec, adaptive=stored.adaptive, candidates=stored.candidates)  # the stored setting, named or not
    return spec


def _twin(model: MeasuredModel, stored: MeasuredSetting | None, twin: bool | None, draft_layer: int | None) -> bool:
    """Whether the twin drafts: as asked, else as the stored setting unless a draft layer is named (its drafts);
    never where this model has no twin (calm.engine.twin.twin_available: its adapter, torch's int4 kernel)."""
    from calm.engine.twin import twin_available  # torch-heavy: imported where a run is resolved

    wanted = twin if twin is not None else stored is not None and stored.twin and draft_layer is None
    return wanted and twin_available(model.network)


def stored_full_rate(extra: dict | None, rows: int) -> tuple[float, str] | None:
    """The full model's decode tokens/s stored with the checkpoint's batch-1 speculative measurement, and where
    it was measured (None: not stored, or a run of several rows: no like-for-like reference)."""
    stored = MeasuredSetting.from_extra(extra, rows) if rows == 1 else None
    if stored is None or stored.full_decode_tokens_per_s <= 0:
        return None
    return stored.full_decode_tokens_per_s, stored.machine or "the benchmark machine"


def stored_setting_text(extra: dict | None) -> str:
    """What lossless runs at batch 1 by the stored measurement, in words, with its measured speed ("": none)."""
    stored = MeasuredSetting.from_extra(extra)
    if stored is None:
        return ""
    measured = f"measured {stored.speedup_vs_full:.2f}× the full model at batch 1 ({stored.report})"
    if not stored.beats_full_depth:
        return f"the full model (speculative decoding {measured}: no gain)"
    spec = SpeculativeConfig(stored.draft_layer, stored.max_draft, stored.lookup, twin=stored.twin)
    policy = ExitPolicy(measure=stored.measure, threshold=stored.threshold)
    return f"speculative: {drafts_description(spec, policy)}; {measured}"


def drafts_description(spec: SpeculativeConfig, policy: ExitPolicy) -> str:
    if spec.from_context:
        several = f", {spec.candidates} candidates verified as a tree" if spec.candidates > 1 else ""
        twin = ", else drafts from the model's 4-bit twin" if spec.twin else ""
        return f"drafts looked up in the context{twin}, up to {spec.max_draft} per step{several}"
    name = "fixed length" if policy.measure == "fixed" else f"{policy.measure} λ={policy.threshold:g}"
    first = "drafts looked up in the context where found, else " if spec.lookup else ""
    if spec.twin:
        return f"{first}drafts from the model's 4-bit twin, up to {spec.max_draft} per step"
    return f"{first}drafts from layer {spec.draft_layer}, up to {spec.max_draft} per step, controller {name}"


def _controller(
    model: MeasuredModel, stored: MeasuredSetting | None, measure: str | None, threshold: float | None
) -> ExitPolicy:
    if measure is None and threshold is None:
        if stored is not None:
            return ExitPolicy(measure=stored.measure, threshold=stored.threshold, decay_tau=0.0)
        return default_draft_policy(model.network)
    return ExitPolicy(
        measure=measure or default_draft_policy(model.network).measure,
        threshold=threshold if threshold is not None else DEFAULT_DRAFT_THRESHOLD,
        decay_tau=0.0,
    )
