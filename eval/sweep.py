"""The threshold sweep behind `calm eval`: every document summarised at full depth, at each threshold
λ, and by transformers' own `generate`, batch by batch on the same batches, each point's
per-example outputs cached as they finish (see calm.eval.cache), then scored (calm.eval.report).

With several processes (`accelerate launch`), documents are sharded with accelerate's
split_between_processes; each process caches its own share, and process 0 writes the report.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from calm.bench import transformers_generate
from calm.data import Record
from calm.decode import ExitPlan
from calm.errors import InputError
from calm.eval.cache import ResultCache
from calm.eval.grids import DEFAULT_THRESHOLDS
from calm.eval.progress import ProgressCallback
from calm.eval.report import FULL, TRANSFORMERS, EvalReport, build_report, write_report
from calm.eval.reporting import machine_info
from calm.eval.summarize import batched, document_prompts
from calm.knob import default_measure
from calm.lossless import resolve_mode
from calm.model import CalmModel
from calm.policy import ExitPolicy
from calm.prompts import SUMMARY_TEMPLATE, Prompt, PromptFormat, fit_prompt
from calm.speculative import ALWAYS_DRAFT, CONTEXT_DRAFT, MODES, SpeculativeConfig


@dataclass(frozen=True)
class Point:
    """One column of the sweep: a name (also its cache file), a label, and how it generates."""

    name: str
    label: str
    threshold: float | None = None
    policy: ExitPolicy | None = None  # None: transformers generate
    speculative: SpeculativeConfig | None = None  # the policy is then the draft controller (lossless)

    def generate_kwargs(self) -> dict:
        spec = self.speculative
        return (
            {}
            if spec is None
            else {
                "mode": "speculative",
                "draft_layer": spec.draft_layer,
                "max_draft": spec.max_draft,
                "lookup": spec.lookup,
            }
        )


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    measure: str | None = None  # None: the model's default (calm.knob.default_measure)
    min_exit_layer: int = 1
    decay_tau: float = ExitPolicy.decay_tau  # τ of CALM's decaying threshold; 0: λ stays fixed
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
        if not self.decay_tau >= 0:
            raise InputError(f"decay_tau must be >= 0, got {self.decay_tau}")
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "calm" and (self.draft_layer is not None or self.max_draft is not None or self.lookup):
            raise InputError("--draft-layer, --max-draft and --lookup need --mode speculative or --lossless")

    def for_model(self, model: CalmModel) -> EvalConfig:
        config = self if self.measure else replace(self, measure=default_measure(model))
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

    def points(self) -> tuple[Point, ...]:
        suffix = f"-min{self.min_exit_layer}" if self.min_exit_layer > 1 else ""
        if self.decay_tau != ExitPolicy.decay_tau:
            suffix += f"-tau{self.decay_tau:g}"
        early = tuple(
            Point(
                f"{self.measure}@{t:g}{suffix}",
                f"{self.measure} λ={t:g}",
                t,
                ExitPolicy(
                    measure=self.measure, threshold=t, min_exit_layer=self.min_exit_layer, decay_tau=self.decay_tau
                ),
            )
            for t in dict.fromkeys(self.thresholds)
        )
        if self.mode == "speculative":
            if self.draft_layer == CONTEXT_DRAFT:  # no controller: one point
                early = (self._context_point(),)
            else:
                early = tuple(self._speculative_point(t) for t in dict.fromkeys(self.thresholds))
        baseline = (Point(TRANSFORMERS, "transformers generate"),) if self.with_transformers else ()
        return (Point(FULL, "full model", policy=ExitPolicy.never()), *early, *baseline)

    def _context_point(self) -> Point:
        spec = SpeculativeConfig(CONTEXT_DRAFT, self.max_draft)
        return Point(
            f"spec-E0-k{spec.max_draft}", f"speculative, context drafts k={spec.max_draft}", None, ALWAYS_DRAFT, spec
        )

    def _speculative_point(self, threshold: float) -> Point:
        spec = SpeculativeConfig(self.draft_layer, self.max_draft, self.lookup)
        lookup = ("-lookup", " + lookup") if spec.lookup else ("", "")
        return Point(
            f"spec-E{spec.draft_layer}-k{spec.max_draft}-{self.measure}@{threshold:g}{lookup[0]}",
            f"speculative E={spec.draft_layer} k={spec.max_draft} {self.measure} λ={threshold:g}{lookup[1]}",
            threshold,
            ExitPolicy(measure=self.measure, threshold=threshold, decay_tau=0.0),
            spec,
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
        return {**asdict(self), "thresholds": list(self.thresholds)}


@dataclass(frozen=True)
class Shard:
    """This process's place among `accelerate launch` processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    state: object = None  # accelerate.PartialState when world > 1

    @classmethod
    def current(cls) -> Shard:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU ranks would not sync
        return cls(state.process_index, state.num_processes, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """The device to load the model on: this process's own under accelerate, unless one is named."""
        if self.state is not None and requested in (None, "auto"):
            return str(self.state.device)
        return requested

    def split(self, records: list[Record]) -> list[Record]:
        if self.state is None:
            return records
        with self.state.split_between_processes(records) as mine:
            return list(mine)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def eval_device(requested: str | None) -> str | None:
    """The device `calm eval` loads the model on: under accelerate, each process's own (unless named)."""
    return Shard.current().device(requested)


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
    shard = Shard.current()
    cache = ResultCache.open(
        Path(out_dir) / "cache",
        config.cache_meta(),
        resume,
        rank=shard.rank if shard.world > 1 else None,
        is_main=shard.is_main,
    )
    shard.barrier()
    _compute(model, shard.split(records), points, config, cache, progress)
    shard.barrier()
    if not shard.is_main:
        return None
    return {p.name: cache.done(p.name) for p in points}


def _compute(
    model: CalmModel,
    records: list[Record],
    points: Sequence[Point],
    config: EvalConfig,
    cache: ResultCache,
    progress: ProgressCallback | None,
) -> None:
    ids = {r.id for r in records}
    pending = {p.name: ids - cache.done(p.name).keys() for p in points}
    total = len(records) * len(points)
    completed = total - sum(len(v) for v in pending.values())
    if progress:
        progress(completed, total)
    if completed == total:
        return
    _warm_up(model, records[0])
    for batch in batched(records, config.batch_size):
        unfinished = [r for r in batch if any(r.id in left for left in pending.values())]
        prompts = dict(
            zip(
                (r.id for r in unfinished),
                document_prompts(model, unfinished, config.max_new_tokens, max_doc_tokens=config.max_doc_tokens),
            )
        )
        for point in points:
            todo = [r for r in batch if r.id in pending[point.name]]
            if todo:
                cache.append(
                    point.name, _run_point(model, point, todo, [prompts[r.id] for r in todo], config.max_new_tokens)
                )
                completed += len(todo)
                if progress:
                    progress(completed, total)


def _run_point(
    model: CalmModel, point: Point, records: list[Record], prompts: list[Prompt], max_new_tokens: int
) -> list[dict]:
    """Generate for one batch at one point; per-example rows with the batch's wall time shared out."""
    texts_in = [p.text for p in prompts]
    t0 = time.perf_counter()
    split: dict[str, float] = {}  # prefill and decode seconds per example (calm's engines time them apart)
    if point.policy is None:
        token_ids = transformers_generate(model, model.encode_prompts(texts_in, max_new_tokens), max_new_tokens)
        texts = [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
        exit_layers = [[model.num_layers] * len(ids) for ids in token_ids]
    else:
        result = model.generate(texts_in, max_new_tokens=max_new_tokens, policy=point.policy, **point.generate_kwargs())
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
