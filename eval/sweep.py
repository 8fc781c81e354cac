"""The threshold sweep behind `calm eval`: every document summarised at full depth, at each threshold
λ (adaptive exits), at each static exit layer, losslessly, and by transformers' own `generate`, batch
by batch on the same batches, each point's per-example outputs cached as they finish (see
calm.eval.cache), then scored (calm.eval.report).

With several processes (`accelerate launch`), documents are sharded with accelerate's
split_between_processes; each process caches its own share, and process 0 writes the report.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from calm.bench import transformers_generate
from calm.calibration.knob import calibrated_decay_tau, default_measure, resolve_policy
from calm.engine.decode import ExitPlan
from calm.errors import InputError
from calm.eval.cache import ResultCache
from calm.eval.grids import DEFAULT_THRESHOLDS
from calm.eval.point import Point
from calm.eval.progress import ProgressCallback
from calm.eval.report import FULL, LOSSLESS, TRANSFORMERS, EvalReport, build_report
from calm.eval.report_files import write_report
from calm.eval.reporting import machine_info
from calm.eval.shard import Shard
from calm.eval.summarize import batched, document_prompts
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.prompts.documents import Record
from calm.prompts.templates import SUMMARY_TEMPLATE, Prompt, PromptFormat, decode_text, fit_prompt
from calm.speculative.drafting import ALWAYS_DRAFT, CONTEXT_DRAFT, MODES, SpeculativeConfig
from calm.speculative.lossless import ModeRun, resolve_mode
from calm.speculative.options import SpeculativeOptions


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    measure: str | None = None  # None: the model's default (calm.calibration.knob.default_measure)
    min_exit_layer: int | None = None  # None: the model's exit floor (calm.engine.decode.exit_floor)
    decay_tau: float | None = ExitPolicy.decay_tau  # τ of the threshold schedule; 0: fixed; None: calibrated
    static_layers: tuple[int, ...] = ()  # fixed-exit baselines: every token after the first exits there
    with_lossless: bool = False  # a lossless point: calm.speculative.lossless's choice at this batch size
    speed: float | None = None  # the calibrated knob: its λ replaces the thresholds (with tolerance, consistency)
    tolerance: float | None = None
    consistency: str | None = None
    lossless_run: ModeRun | None = None  # set by for_model where with_lossless
    max_new_tokens: int = 64
    batch_size: int = 8
    document_field: str = "document"
    summary_field: str = "summary"
    limit: int | None = None
    max_doc_tokens: int | None = None  # documents cut to their first N tokens before prompting
    with_transformers: bool = True  # time transformers generate as a baseline point
    mode: str = "calm"  # "speculative": each λ controls the drafts of a lossless point
    draft_layer: int | None = None  # speculative: E (None: the checkpoint's measured E, else L/2)
    max_draft: int | None = None  # speculative: k (None: the checkpoint's measured k, else 4)
    lookup: bool = False  # speculative: drafts looked up in the context first (also where the checkpoint's is)

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise InputError("give at least one threshold")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise InputError(f"thresholds must lie in [0, 1], got {', '.join(f'{t:g}' for t in self.thresholds)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise InputError("batch_size and max_new_tokens must be >= 1")
        if self.decay_tau is not None and not self.decay_tau >= 0:
            raise InputError(f"decay_tau must be >= 0, got {self.decay_tau}")
        if any(layer < 1 for layer in self.static_layers):
            raise InputError(f"static exit layers must be >= 1, got {', '.join(map(str, self.static_layers))}")
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "calm" and (self.draft_layer is not None or self.max_draft is not None or self.lookup):
            raise InputError("--draft-layer, --max-draft and --lookup need --mode speculative or --lossless")

    def for_model(self, model: CalmModel) -> EvalConfig:
        """Every default filled in for this model: the measure, the calibration's τ (else CALM's τ=4), the
        knob's λ, the lossless run and the speculative setting."""
        config = self._with_knob(model)
        config = config if config.measure else replace(config, measure=default_measure(model))
        if config.decay_tau is None:
            tau = ExitPolicy.decay_tau if model.calibration is None else calibrated_decay_tau(model.calibration)
            config = replace(config, decay_tau=tau)
        for layer in config.static_layers:
            ExitPlan.resolve(ExitPolicy.fixed(layer), model.network)  # a layer out of range: fail now
        if config.with_lossless and config.mode == "calm" and config.lossless_run is None:
            config = replace(config, lossless_run=resolve_mode(model, "lossless", batch_size=config.batch_size))
        if config.mode == "speculative" and (config.draft_layer is None or config.max_draft is None):
            run = resolve_mode(
                model,
                "speculative",
                False,
                config.draft_layer,
                config.max_draft,
                lookup=config.lookup,
                batch_size=self.batch_size,
            )
            if run is None or run.spec is None:
                raise AssertionError("resolve_mode always resolves mode='speculative' to a speculative run")
            spec = run.spec
            config = replace(config, draft_layer=spec.draft_layer, max_draft=spec.max_draft, lookup=spec.lookup)
        return config

    def _with_knob(self, model: CalmModel) -> EvalConfig:
        """Where a speed or tolerance is given: the knob's one λ, measure, τ and floor instead of the grid."""
        if self.speed is None and self.tolerance is None:
            if self.consistency is not None:
                raise InputError("--consistency picks the objective --speed or --tolerance follows; give one of them")
            return self
        tau = None if self.decay_tau == ExitPolicy.decay_tau else self.decay_tau  # the CLI default: not a choice
        resolved = resolve_policy(
            model, None, self.measure, None, self.speed, self.tolerance, tau, self.consistency
        ).policy
        if resolved.never_exits:
            raise InputError(
                "the knob asks for the full model (speed 0, or no certified threshold was measured faster than it): "
                "there is no threshold to evaluate"
            )
        return replace(
            self,
            thresholds=(resolved.threshold,),
            measure=resolved.measure,
            decay_tau=resolved.decay_tau,
            min_exit_layer=resolved.min_exit_layer,
        )

    @property
    def tau(self) -> float:
        return ExitPolicy.decay_tau if self.decay_tau is None else self.decay_tau

    def points(self) -> tuple[Point, ...]:
        measure = self.measure
        if measure is None:
            raise AssertionError("for_model fills in the measure before the points are built")
        suffix = f"-min{self.min_exit_layer}" if self.min_exit_layer is not None else ""
        if self.tau != ExitPolicy.decay_tau:
            suffix += f"-tau{self.tau:g}"
        early = tuple(
            Point(
                f"{measure}@{t:g}{suffix}",
                f"{measure} λ={t:g}",
                t,
                ExitPolicy(measure=measure, threshold=t, min_exit_layer=self.min_exit_layer, decay_tau=self.tau),
            )
            for t in dict.fromkeys(self.thresholds)
        )
        if self.mode == "speculative":
            if self.draft_layer is None or self.max_draft is None:
                raise AssertionError("for_model fills in the speculative setting before the points are built")
            spec = SpeculativeConfig(self.draft_layer, self.max_draft, self.lookup)
            if self.draft_layer == CONTEXT_DRAFT:  # no controller: one point
                early = (self._context_point(spec.max_draft),)
            else:
                early = tuple(self._speculative_point(spec, measure, t) for t in dict.fromkeys(self.thresholds))
        baseline = (
            (Point(TRANSFORMERS, "transformers generate", kind="transformers"),) if self.with_transformers else ()
        )
        full = Point(FULL, "full model", policy=ExitPolicy.never(), kind="full")
        return (full, *early, *self._static_points(), *self._lossless_point(), *baseline)

    def _static_points(self) -> tuple[Point, ...]:
        return tuple(
            Point(f"static@{k}", f"static exit at layer {k}", None, ExitPolicy.fixed(k), kind="static")
            for k in dict.fromkeys(self.static_layers)
        )

    def _lossless_point(self) -> tuple[Point, ...]:
        run = self.lossless_run
        if run is None:
            return ()
        if run.spec is None:  # the full model is what lossless runs here: its outputs and time, not a rerun
            return (Point(LOSSLESS, "lossless (the full model here)", policy=run.policy, kind="lossless", alias=FULL),)
        spec = run.spec
        return (
            Point(
                f"{LOSSLESS}-E{spec.draft_layer}-k{spec.max_draft}{'-lookup' if spec.lookup else ''}",
                f"lossless (speculative E={spec.draft_layer} k={spec.max_draft})",
                None,
                run.policy,
                spec,
                kind="lossless",
            ),
        )

    def _context_point(self, max_draft: int) -> Point:
        spec = SpeculativeConfig(CONTEXT_DRAFT, max_draft)
        return Point(
            f"spec-E0-k{spec.max_draft}",
            f"speculative, context drafts k={spec.max_draft}",
            None,
            ALWAYS_DRAFT,
            spec,
            kind="speculative",
        )

    def _speculative_point(self, spec: SpeculativeConfig, measure: str, threshold: float) -> Point:
        lookup = ("-lookup", " + lookup") if spec.lookup else ("", "")
        return Point(
            f"spec-E{spec.draft_layer}-k{spec.max_draft}-{measure}@{threshold:g}{lookup[0]}",
            f"speculative E={spec.draft_layer} k={spec.max_draft} {measure} λ={threshold:g}{lookup[1]}",
            threshold,
            ExitPolicy(measure=measure, threshold=threshold, decay_tau=0.0),
            spec,
            kind="speculative",
        )

    def cache_meta(self) -> dict:
        """What every cached output depends on (thresholds, limit and batch size do not change an output)."""
        model = str(Path(self.model).resolve()) if Path(self.model).exists() else self.model
        return {
            "model": model,
            "data": str(Path(self.data).resolve()),
            "document_field": self.document_field,
            "summary_field": self.summary_field,
            "max_new_tokens": self.max_new_tokens,
            "prompt": SUMMARY_TEMPLATE,
            "max_doc_tokens": self.max_doc_tokens,
        }

    def to_dict(self) -> dict:
        run = self.lossless_run
        return {
            **asdict(replace(self, lossless_run=None)),
            "thresholds": list(self.thresholds),
            "static_layers": list(self.static_layers),
            "lossless_run": None if run is None else run.description,
        }


def run_eval(
    model: CalmModel,
    records: Sequence[Record],
    config: EvalConfig,
    out_dir: str | Path,
    resume: bool = True,
    command: str | None = None,
    progress: ProgressCallback | None = None,
) -> EvalReport | None:
    """Run (or resume) the sweep and write eval.json, eval.md and the plots into out_dir. Returns the
    report (None on processes other than the main one)."""
    records = list(records)
    config = config.for_model(model)
    rows = run_sweep(model, records, config, out_dir, resume, progress)
    if rows is None:
        return None
    report = build_report(
        records, rows, config.points(), config.to_dict(), model.num_layers, machine_info(model.device, command)
    )
    write_report(report, out_dir)
    return report


# Rows timed by this process carry this id; speedups only compare rows of the same run.
RUN_ID = uuid.uuid4().hex[:16]


def run_sweep(
    model: CalmModel,
    records: Sequence[Record],
    config: EvalConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: ProgressCallback | None = None,
) -> dict[str, dict[str, dict]] | None:
    """Compute (or resume) every point's per-example outputs under out_dir/cache. Returns them by point
    name and example id on the main process (None on the others)."""
    records = list(records)
    _check_ids(records)
    config = config.for_model(model)
    points = config.points()
    for point in points:
        if point.policy is not None:
            ExitPlan.resolve(point.policy, model.network)  # bad layers / missing classifier: fail now
        if point.speculative is not None:
            point.speculative.check(model.num_layers)
    computed = [p for p in points if p.alias is None]
    shard = Shard.current()
    cache = ResultCache.open(
        Path(out_dir) / "cache",
        config.cache_meta(),
        resume,
        rank=shard.rank if shard.world > 1 else None,
        is_main=shard.is_main,
    )
    shard.barrier()
    _compute(model, shard.split(records), computed, config, cache, progress)
    shard.barrier()
    if not shard.is_main:
        return None
    return {p.name: cache.done(p.alias or p.name) for p in points}


def _compute(
    model: CalmModel,
    records: list[Record],
    points: Sequence[Point],
    config: EvalConfig,
    cache: ResultCache,
    progress: ProgressCallback | None,
) -> None:
    # An example counts as done once every point has it; one that an interruption left part-way is redone at
    # every point, so that its timings were all taken in one run and pair up (report.timed_speedup): a resumed
    # eval reports what an uninterrupted one does. ResultCache.done keeps the latest row of an example.
    finished = set.intersection(*(set(cache.done(p.name)) for p in points)) if points else set()
    todo_records = [r for r in records if r.id not in finished]
    total = len(records) * len(points)
    completed = total - len(todo_records) * len(points)
    if progress:
        progress(completed, total)
    if not todo_records:
        return
    _warm_up(model, todo_records[0])
    for batch in batched(todo_records, config.batch_size):
        prompts = document_prompts(model, batch, config.max_new_tokens, max_doc_tokens=config.max_doc_tokens)
        for point in points:
            cache.append(point.name, _run_point(model, point, batch, prompts, config.max_new_tokens))
            completed += len(batch)
            if progress:
                done = len(records) - len(todo_records) + todo_records.index(batch[-1]) + 1
                progress(completed, total, f"{point.label}: {done} of {len(records)} documents done")


def _run_point(
    model: CalmModel, point: Point, records: list[Record], prompts: list[Prompt], max_new_tokens: int
) -> list[dict]:
    """Generate for one batch at one point; per-example rows with the batch's wall time shared out."""
    texts_in = [p.text for p in prompts]
    t0 = time.perf_counter()
    split: dict[str, float] = {}  # prefill and decode seconds per example (calm's engines time them apart)
    token_ids: Sequence[tuple[int, ...]]
    texts: Sequence[str]
    exit_layers: Sequence[Sequence[int]]
    if point.policy is None:
        token_ids = transformers_generate(model, model.encode_prompts(texts_in, max_new_tokens), max_new_tokens)
        texts = [decode_text(model.tokenizer, ids).strip() for ids in token_ids]
        exit_layers = [[model.num_layers] * len(ids) for ids in token_ids]
    else:
        speculative = SpeculativeOptions.running(point.speculative)
        result = model.generate(texts_in, max_new_tokens=max_new_tokens, policy=point.policy, speculative=speculative)
        token_ids, texts, exit_layers = result.token_ids, result.texts, result.exit_layers
        t = result.timings
        split = {"prefill_seconds": t.prefill_s / len(records), "decode_seconds": t.decode_s / len(records)}
    seconds = time.perf_counter() - t0
    return [
        {
            "id": r.id,
            "summary": texts[i],
            "token_ids": list(token_ids[i]),
            "exit_layers": list(exit_layers[i]),
            "truncated": prompts[i].truncated,
            "seconds": seconds / len(records),
            "batch_seconds": seconds,
            "batch_size": len(records),
            "run": RUN_ID,
            **split,
        }
        for i, r in enumerate(records)
    ]


def _warm_up(model: CalmModel, record: Record) -> None:
    """One short untimed run of each engine, so the first timed batch pays no start-up costs."""
    prompt = fit_prompt(PromptFormat.for_model(model, 2), record.document).text
    model.generate(prompt, max_new_tokens=2)
    transformers_generate(model, model.encode_prompts([prompt], 2), 2)


def _check_ids(records: list[Record]) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise InputError(f"document id {r.id!r} appears twice in the data; ids must be unique")
        seen.add(r.id)
