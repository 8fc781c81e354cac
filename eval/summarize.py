"""Summaries of documents (or outputs of plain prompts), batch by batch, with the exit layer of every
generated token and how much of each document the prompt held."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from calm.continuous import continuous_scheduler, runs_continuous
from calm.engine.bulk import in_order, timings_since
from calm.engine.generation import GenerationConfig, Timings
from calm.engine.options import EngineOptions
from calm.engine.sampling import SamplingConfig
from calm.engine.scheduler import Request
from calm.engine.speculative_stats import SpeculativeStats
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.prompts.documents import Record
from calm.prompts.templates import DEFAULT_TEMPLATE, Prompt, PromptFormat, PromptTemplate, fit_prompts
from calm.speculative.lossless import LOSSLESS
from calm.speculative.options import SpeculativeOptions

T = TypeVar("T")
GREEDY = SamplingConfig()
AUTO_ENGINE = EngineOptions()


@dataclass(frozen=True)
class DocumentSummary:
    id: str
    summary: str
    token_ids: tuple[int, ...]
    exit_layers: tuple[int, ...]  # per generated token, 1..num_layers
    num_layers: int
    batch_size: int  # the timings are for the whole batch this document was in
    batch_timings: Timings
    document_tokens: int = 0  # the document's length in tokens, and how many the prompt held
    kept_tokens: int = 0
    finish_reason: str = "stop"  # "stop": the model ended it (EOS); "length": it hit max_new_tokens
    text_field: str = "summary"  # the output's JSON name: "summary" for documents, "text" for plain prompts
    speculative: SpeculativeStats | None = None  # what the batch's speculative decoding did (lossless), else None

    @property
    def avg_layers(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float("nan")

    @property
    def truncated(self) -> bool:
        return self.kept_tokens < self.document_tokens

    def to_dict(self) -> dict:
        t = self.batch_timings
        return {
            "id": self.id,
            self.text_field: self.summary,
            "finish_reason": self.finish_reason,
            "avg_layers": self.avg_layers,
            "exit_layers": list(self.exit_layers),
            "num_layers": self.num_layers,
            "truncated": self.truncated,
            "document_tokens": self.document_tokens,
            "kept_tokens": self.kept_tokens,
            "timings": {
                "batch_size": self.batch_size,
                "batch_prefill_s": t.prefill_s,
                "batch_decode_s": t.decode_s,
                "batch_compile_s": t.compile_s,
                "batch_new_tokens": t.new_tokens,
                "batch_decode_tokens": t.decode_tokens,
                "batch_tokens_per_s": t.tokens_per_s,
                "batch_decode_tokens_per_s": t.decode_tokens_per_s,
            },
        }


def _continuous(
    model: CalmModel,
    records: Sequence[Record],
    prompts: Sequence[Prompt],
    policy: ExitPolicy,
    config: GenerationConfig,
    lossless: bool,
    batch_size: int,
    chat: bool | None,
    text_field: str,
    twin: bool | None,
) -> Iterator[list[DocumentSummary]]:
    ids = [model.encode_prompts([p.text], config.max_new_tokens, chat=chat).ids[0].tolist() for p in prompts]
    slots = min(batch_size, len(ids))
    scheduler, _ = continuous_scheduler(model, lossless, slots, model.eos_token_ids, config.kernels, twin)
    row_policy = ExitPolicy.never() if lossless else policy
    requests = [Request(tuple(i), config.max_new_tokens, row_policy, config.sampling) for i in ids]
    before, at = replace(scheduler.stats), 0
    for ready in in_order(scheduler, requests):
        timings, before = timings_since(scheduler.stats, before, ready), replace(scheduler.stats)
        texts = _texts(model, [r.token_ids for r in ready])
        yield [
            DocumentSummary(
                id=records[at + i].id,
                summary=texts[i],
                token_ids=r.token_ids,
                exit_layers=r.exit_layers,
                num_layers=model.num_layers,
                batch_size=len(ready),
                batch_timings=timings,
                document_tokens=prompts[at + i].document_tokens,
                kept_tokens=prompts[at + i].kept_tokens,
                finish_reason=r.finish_reason,
                text_field=text_field,
            )
            for i, r in enumerate(ready)
        ]
        at += len(ready)


def _texts(model: CalmModel, token_ids: list[tuple[int, ...]]) -> list[str]:
    if model.tokenizer is None:
        return [""] * len(token_ids)
    decoded = model.tokenizer.batch_decode([list(t) for t in token_ids], skip_special_tokens=True)
    return [text.strip() for text in decoded]


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def document_prompts(
    model: CalmModel,
    records: Sequence[Record],
    max_new_tokens: int = 64,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    max_doc_tokens: int | None = None,
    truncate: bool = True,
    chat: bool | None = None,
) -> list[Prompt]:
    """Each record's prompt, its document cut to fit (truncate) or refused with an InputError."""
    fmt = PromptFormat.for_model(model, max_new_tokens, chat)
    return fit_prompts(fmt, [(f"document {r.id}", r.document) for r in records], template, max_doc_tokens, truncate)


def summarize_documents(
    model: CalmModel,
    records: Sequence[Record],
    policy: ExitPolicy,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    prompts: Sequence[Prompt] | None = None,
    sampling: SamplingConfig = GREEDY,
    chat: bool | None = None,
    engine: EngineOptions = AUTO_ENGINE,
    speculative: SpeculativeOptions | None = None,
    text_field: str = "summary",
    lossless: bool = False,
) -> Iterator[list[DocumentSummary]]:
    """Summarise records; yields summaries in input order as soon as they and all before them are done.
    Where calm.continuous.runs_continuous says so (several records, a decoder-only model, the dynamic engine),
    one continuous batch of `batch_size` slots runs them all (calm.engine.scheduler); otherwise batches of
    `batch_size` run one after another. `prompts` (one per record, from document_prompts) default to the summary
    prompt, documents cut to fit. engine and speculative: generate()'s options objects (calm.engine.options,
    calm.speculative.options). lossless: the rows want the full model's output, and `speculative` is the
    checkpoint's stored setting: a continuous batch then drafts per step, while the stored measurement says it
    pays for the rows live. text_field: the outputs' JSON name ("text" for plain prompts)."""
    if prompts is None:
        prompts = document_prompts(model, records, max_new_tokens, chat=chat)
    config = GenerationConfig(max_new_tokens, model.eos_token_ids, model.pad_token_id, sampling, *engine.settings)
    mode = LOSSLESS if lossless else "calm"
    if runs_continuous(model.network, min(batch_size, len(records)), config, mode, None if lossless else speculative):
        twin = speculative.twin if speculative is not None else None
        yield from _continuous(model, records, prompts, policy, config, lossless, batch_size, chat, text_field, twin)
        return
    for start in range(0, len(records), batch_size):
        batch, batch_prompts = records[start : start + batch_size], prompts[start : start + batch_size]
        result = model.generate(
            [p.text for p in batch_prompts],
            max_new_tokens=max_new_tokens,
            policy=policy,
            chat=chat,
            sampling=sampling,
            engine=engine,
            speculative=speculative,
        )
        yield [
            DocumentSummary(
                id=r.id,
                summary=result.texts[i] if result.texts else "",
                token_ids=result.token_ids[i],
                exit_layers=result.exit_layers[i],
                num_layers=result.num_layers,
                batch_size=len(batch),
                batch_timings=result.timings,
                document_tokens=p.document_tokens,
                kept_tokens=p.kept_tokens,
                finish_reason=result.finish_reasons[i] if result.finish_reasons else "stop",
                text_field=text_field,
                speculative=result.speculative,
            )
            for i, (r, p) in enumerate(zip(batch, batch_prompts))
        ]
