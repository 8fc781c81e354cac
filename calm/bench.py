"""Throughput: tokens/s and ms/token per batch size at full depth, under exits, and for transformers' `generate`.

Every row generates exactly `new_tokens` tokens (EOS is ignored, by both engines), so the runs compare like with
like. Each configuration gets one untimed warm-up run, then `repeats` timed runs taken round robin across the
configurations; the median is reported. Times are wall clock for the whole call, prefill included.
calm.eval.bench_report writes the report.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch

from calm.engine.decode import ExitPlan
from calm.engine.generation import GenerationConfig, PromptBatch, engine_settings, generate_tokens
from calm.engine.speculative_stats import SpeculativeStats
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.prompts.templates import PromptFormat, fit_prompts
from calm.speculative.drafting import ALWAYS_DRAFT, NO_CONTROLLER, SpeculativeConfig
from calm.speculative.loop import generate_speculative
from calm.speculative.lossless import resolve_mode

TRANSFORMERS, FULL = "transformers", "full"
MEASURE_SPECS = ("softmax", "state", "classifier")
DEFAULT_DOCUMENT = (
    "The city council has approved a plan to build three new primary schools over the next five years. "
    "Councillors said the growing number of families moving into the area had left existing schools "
    "over capacity, with some classes taught in temporary buildings. The first school is due to open in "
    "2027 on the site of a former bus depot. Opposition members welcomed the plan but warned that the "
    "cost of the project, estimated at 60 million pounds, could mean cuts to other services."
)
LOOKUP, ADAPTIVE, GOODPUT, TWIN = "lookup", "adaptive", "goodput", "twin"  # spec suffixes, as POLICY_HELP says
POLICY_HELP = (
    "full, fixed:LAYER, MEASURE:THRESHOLD with MEASURE one of softmax, state, classifier (e.g. softmax:0.9), or "
    "spec:E:K[:MEASURE:THRESHOLD][:lookup][:adaptive][:cN][:goodput][:twin] (lossless speculative decoding, drafts "
    "from layer E, up to K per step, while the measure is confident; without one, always K; lookup: drafts looked up "
    "in the context first; E = 0: only those; adaptive: each row's context-draft length follows its last verification; "
    "cN: N candidate context drafts per row, verified as a tree; goodput: each row drafts only where its goodput "
    "beats a plain step; twin: the model's 4-bit twin drafts where the context does not)"
)
SPEC = "spec"


# ---- the transformers baseline ------------------------------------------------------------------


@torch.inference_mode()
def transformers_generate(
    model: CalmModel, batch: PromptBatch, max_new_tokens: int, fixed_length: bool = False
) -> list[tuple[int, ...]]:
    """Greedy transformers `generate` on the same left-padded ids calm decodes: new tokens per row, cut
    after the first EOS as calm does (fixed_length: exactly max_new_tokens each, EOS suppressed)."""
    eos = list(model.eos_token_ids)
    out = model.model.generate(
        input_ids=batch.ids,
        attention_mask=batch.mask.long(),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if fixed_length else None,
        do_sample=False,
        pad_token_id=model.pad_token_id,
        eos_token_id=eos or None,
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = 1 if model.adapter.is_encoder_decoder else batch.ids.shape[1]  # decoder start token / prompt
    rows = []
    for row in out[:, start:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) if not fixed_length else len(row)
        rows.append(tuple(row[:end]))
    return rows


# ---- policies ---------------------------------------------------------------------------------


def parse_policy_spec(spec: str, decay_tau: float = ExitPolicy.decay_tau) -> ExitPolicy:
    """'full', 'fixed:15', 'softmax:0.9', 'state:0.95' or 'classifier:0.8' -> ExitPolicy (a threshold on the
    schedule of decay_tau)."""
    name, _, value = spec.strip().partition(":")
    try:
        if name in (FULL, "never") and not value:
            return ExitPolicy.never()
        if name == "fixed":
            return ExitPolicy.fixed(int(value))
        if name in MEASURE_SPECS:
            return ExitPolicy(measure=name, threshold=float(value), decay_tau=decay_tau)
    except ValueError as exc:
        raise InputError(f"bad policy {spec!r}: {exc}; expected {POLICY_HELP}") from exc
    raise InputError(f"bad policy {spec!r}: expected {POLICY_HELP}")


def parse_run_spec(spec: str, decay_tau: float = ExitPolicy.decay_tau) -> tuple[ExitPolicy, SpeculativeConfig | None]:
    """A policy spec (parse_policy_spec), or 'spec:E:K[:MEASURE:THRESHOLD]' -> (draft controller, E and K)."""
    name, _, rest = spec.strip().partition(":")
    if name != SPEC:
        return parse_policy_spec(spec, decay_tau), None
    parts = rest.split(":")
    flags = []
    while parts and (parts[-1] in (LOOKUP, ADAPTIVE, GOODPUT, TWIN) or re.fullmatch(r"c[0-9]+", parts[-1])):
        flags.append(parts.pop())
    candidates = next((int(f[1:]) for f in flags if f.startswith("c")), 1)
    try:
        e, k = int(parts[0]), int(parts[1])
        config = SpeculativeConfig(
            e, k, LOOKUP in flags, ADAPTIVE in flags, candidates, GOODPUT in flags, TWIN in flags
        )
    except (ValueError, IndexError) as exc:
        raise InputError(f"bad policy {spec!r}: expected {POLICY_HELP}") from exc
    controller = ":".join(parts[2:])
    if not controller:
        return ALWAYS_DRAFT, config
    if config.from_context:
        raise InputError(f"bad policy {spec!r}: {NO_CONTROLLER}")
    policy = parse_policy_spec(controller)
    if policy.measure == "fixed":
        raise InputError(f"bad policy {spec!r}: a draft controller is MEASURE:THRESHOLD")
    return replace(policy, decay_tau=0.0), config


def speculative_specs(
    model: CalmModel,
    policies: Sequence[str],
    mode: str = "calm",
    lossless: bool = False,
    draft_layer: int | None = None,
    max_draft: int | None = None,
    lookup: bool = False,
) -> tuple[str, ...]:
    """The policies as given in calm mode. `--mode speculative` (or --lossless, here the same): each one as
    the draft controller at E and K (the checkpoint's measured setting, else L/2 and 4, unless given);
    without any, the model's default controller."""
    run = resolve_mode(model, "speculative" if lossless else mode, False, draft_layer, max_draft, lookup=lookup)
    if run is None or run.spec is None:
        return tuple(policies)
    e, k = run.spec.draft_layer, run.spec.max_draft
    suffix = (f":{LOOKUP}" if run.spec.lookup else "") + (f":{TWIN}" if run.spec.twin else "")
    if not policies:
        p = run.policy
        controller = "" if p.measure == "fixed" else f":{p.measure}:{p.threshold:g}"
        return (f"{SPEC}:{e}:{k}{controller}{suffix}",)
    return tuple(f"{SPEC}:{e}:{k}:{p}{suffix}" for p in policies)


def knob_specs(
    model: CalmModel,
    policies: Sequence[str],
    decay_tau: float | None = None,
    speed: float | None = None,
    tolerance: float | None = None,
    consistency: str | None = None,
) -> tuple[tuple[str, ...], float]:
    """The policy specs with the calibrated knob's own appended (where speed or tolerance is given), and the
    schedule τ they run under: the one given, else the calibration's (so `classifier:λ` here is the knob's
    policy at λ), else ExitPolicy's default."""
    from calm.calibration.knob import calibrated_decay_tau, check_consistency_knob, resolve_policy

    if speed is None and tolerance is None:
        check_consistency_knob(consistency)
        if consistency is not None:
            raise InputError("--consistency picks the objective --speed or --tolerance follows; give one of them")
        if decay_tau is None:
            decay_tau = ExitPolicy.decay_tau if model.calibration is None else calibrated_decay_tau(model.calibration)
        return tuple(policies), decay_tau
    knob = resolve_policy(model, speed=speed, tolerance=tolerance, decay_tau=decay_tau, consistency=consistency).policy
    if knob.never_exits:
        return tuple(policies), knob.decay_tau if decay_tau is None else decay_tau
    return (*policies, f"{knob.measure}:{knob.threshold!r}"), knob.decay_tau


# ---- the benchmark ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    model: str
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    new_tokens: int = 32
    repeats: int = 3
    policies: tuple[str, ...] = ()  # specs for parse_policy_spec; full depth is always run
    transformers: bool = True
    data: str | None = None
    max_doc_tokens: int | None = None  # documents cut to their first N tokens
    decay_tau: float = ExitPolicy.decay_tau  # schedule of the thresholds in `policies`; 0: λ stays fixed
    engine: str = "auto"  # calm's engine: auto, dynamic, static or static+compile

    def __post_init__(self) -> None:
        engine_settings(self.engine)  # a clear error for a bad spec
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InputError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.new_tokens < 1 or self.repeats < 1:
            raise InputError("new_tokens and repeats must be >= 1")


@dataclass(frozen=True)
class BenchRow:
    name: str  # "full", a policy spec, or "transformers"
    batch_size: int
    new_tokens: int
    times_s: tuple[float, ...]
    avg_layers: float
    decode_times_s: tuple[float, ...] = ()  # calm only: the decode steps without the prefill
    speedup_vs_full: float = float("nan")
    speedup_vs_transformers: float = float("nan")
    acceptance_rate: float = float("nan")  # speculative only: drafted tokens the full model kept
    mean_accepted_length: float = float("nan")  # speculative only: drafts kept per row per verification

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def decode_ms_per_token(self) -> float:
        """Median wall time of one decode step (prefill excluded); NaN where not measured."""
        if not self.decode_times_s:
            return float("nan")
        return 1000.0 * statistics.median(self.decode_times_s) / max(1, self.new_tokens - 1)

    @property
    def prefill_share(self) -> float:
        """The prompt's share of the run's wall time (median run minus median decode); NaN where not measured."""
        if not self.decode_times_s:
            return float("nan")
        return max(0.0, self.median_s - statistics.median(self.decode_times_s)) / self.median_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / self.median_s

    @property
    def ms_per_token(self) -> float:
        """Wall time per decoding step: what each sequence in the batch waits per token."""
        return 1000.0 * self.median_s / self.new_tokens

    def to_dict(self) -> dict[str, Any]:
        """The fields and the derived rates; NaN where not measured (calm.eval.reporting.json_safe makes it null)."""
        return {
            **asdict(self),
            "times_s": list(self.times_s),
            "median_s": self.median_s,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_token": self.ms_per_token,
            "decode_ms_per_token": self.decode_ms_per_token,
            "prefill_share": self.prefill_share,
            "decode_times_s": list(self.decode_times_s),
        }


@dataclass(frozen=True)
class BenchReport:
    """One calm bench run; calm.eval.bench_report writes it as bench.json and bench.md."""

    config: BenchConfig
    num_layers: int
    machine: dict[str, Any]  # where it ran (calm.eval.reporting.machine_info)
    rows: tuple[BenchRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": {
                **asdict(self.config),
                "batch_sizes": list(self.config.batch_sizes),
                "policies": list(self.config.policies),
            },
            "num_layers": self.num_layers,
            "machine": self.machine,
            "results": [r.to_dict() for r in self.rows],
        }


def bench_prompts(
    model: CalmModel, documents: Sequence[str] | None = None, max_doc_tokens: int | None = None, new_tokens: int = 32
) -> list[str]:
    """Summarisation prompts for the benchmark: the documents given (or one built-in paragraph), each cut
    to max_doc_tokens and to what the context leaves next to new_tokens."""
    fmt = PromptFormat.for_model(model, new_tokens)
    named = [(f"document {i + 1}", d) for i, d in enumerate(documents or [DEFAULT_DOCUMENT])]
    return [p.text for p in fit_prompts(fmt, named, max_doc_tokens=max_doc_tokens)]


def run_bench(
    model: CalmModel,
    prompts: Sequence[str],
    config: BenchConfig,
    machine: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Time full depth, each policy and (optionally) transformers generate at every batch size.

    Per batch size every configuration gets one untimed warm-up, then the timed runs go round
    robin (full, policy, ..., transformers, full, ...), so a slow spell of the machine hits all of
    them alike instead of one."""
    policies = [(FULL, (ExitPolicy.never(), None))] + [
        (spec, parse_run_spec(spec, config.decay_tau)) for spec in config.policies
    ]
    for _, (policy, speculative) in policies:
        ExitPlan.resolve(policy, model.network)  # fail before any timing, not halfway
        if speculative is not None:
            speculative.check(model.num_layers)
    total = len(config.batch_sizes) * (len(policies) + int(config.transformers))
    rows: list[BenchRow] = []
    for batch_size in config.batch_sizes:
        batch = model.encode_prompts([prompts[i % len(prompts)] for i in range(batch_size)], config.new_tokens)
        runners = [_calm_runner(model, batch, policy, config, speculative) for _, (policy, speculative) in policies]
        names = [name for name, _ in policies]
        if config.transformers:
            runners.append(
                partial(_timed, partial(transformers_generate, model, batch, config.new_tokens, fixed_length=True))
            )
            names.append(TRANSFORMERS)
        runs = _round_robin(runners, config.repeats)
        rows += _with_speedups(
            [
                _bench_row(name, batch_size, config.new_tokens, timed, model.num_layers)
                for name, timed in zip(names, runs)
            ]
        )
        if progress:
            progress(len(rows), total)
    return BenchReport(config=config, num_layers=model.num_layers, machine=machine, rows=tuple(rows))


@dataclass(frozen=True)
class _Run:
    wall_s: float
    decode_s: float = float("nan")  # calm only
    avg_layers: float = float("nan")  # calm only
    stats: SpeculativeStats | None = None


def _timed(call: Callable[[], object]) -> _Run:
    t0 = time.perf_counter()
    call()
    return _Run(time.perf_counter() - t0)


def _calm_runner(
    model: CalmModel,
    batch: PromptBatch,
    policy: ExitPolicy,
    config: BenchConfig,
    speculative: SpeculativeConfig | None = None,
) -> Callable[[], _Run]:
    gen = GenerationConfig(
        max_new_tokens=config.new_tokens,
        eos_token_ids=(),
        pad_token_id=model.pad_token_id,
        **engine_settings(config.engine),
    )
    network = model.network

    def run() -> _Run:
        t0 = time.perf_counter()
        if speculative is None:
            result = generate_tokens(network, batch, policy, gen)
        else:
            result = generate_speculative(network, batch, policy, gen, speculative)
        return _Run(time.perf_counter() - t0, result.timings.decode_s, result.avg_layers, result.speculative)

    return run


def _round_robin(runners: list[Callable[[], _Run]], repeats: int) -> list[list[_Run]]:
    """One untimed warm-up each, then `repeats` timed rounds over all runners in turn."""
    for run in runners:
        run()
    runs: list[list[_Run]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            runs[i].append(run())
    return runs


def _bench_row(name: str, batch_size: int, new_tokens: int, runs: list[_Run], num_layers: int) -> BenchRow:
    calm = name != TRANSFORMERS
    stats = runs[-1].stats  # the same tokens in every run (greedy), so the same counts
    return BenchRow(
        name,
        batch_size,
        new_tokens,
        tuple(r.wall_s for r in runs),
        statistics.fmean(r.avg_layers for r in runs) if calm else float(num_layers),
        decode_times_s=tuple(r.decode_s for r in runs) if calm else (),
        acceptance_rate=stats.acceptance_rate if stats else float("nan"),
        mean_accepted_length=stats.mean_accepted_length if stats else float("nan"),
    )


def _with_speedups(group: list[BenchRow]) -> list[BenchRow]:
    full = next(r for r in group if r.name == FULL).median_s
    hf = next((r.median_s for r in group if r.name == TRANSFORMERS), float("nan"))
    return [replace(r, speedup_vs_full=full / r.median_s, speedup_vs_transformers=hf / r.median_s) for r in group]
