"""Summaries of documents, batch by batch, with the exit layer of every generated token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

from calm.data import Record, summary_prompt
from calm.generation import Timings, engine_settings
from calm.model import CalmModel
from calm.policy import ExitPolicy

T = TypeVar("T")


@dataclass(frozen=True)
class DocumentSummary:
    id: str
    summary: str
    token_ids: tuple[int, ...]
    exit_layers: tuple[int, ...]     # per generated token, 1..num_layers
    num_layers: int
    batch_size: int                  # the timings are for the whole batch this document was in
    batch_timings: Timings

    @property
    def avg_layers(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float("nan")

    def to_dict(self) -> dict:
        t = self.batch_timings
        return {"id": self.id, "summary": self.summary, "avg_layers": self.avg_layers,
                "exit_layers": list(self.exit_layers), "num_layers": self.num_layers,
                "timings": {"batch_size": self.batch_size, "batch_prefill_s": t.prefill_s,
                            "batch_decode_s": t.decode_s, "batch_new_tokens": t.new_tokens,
                            "batch_tokens_per_s": t.tokens_per_s}}


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def summarize_documents(model: CalmModel, records: Sequence[Record], policy: ExitPolicy, max_new_tokens: int = 64,
                        batch_size: int = 8, engine: str = "auto") -> Iterator[list[DocumentSummary]]:
    """Summarise records in batches of `batch_size`; yields each batch's summaries as soon as it is done.
    Documents too long for the model's context are truncated. engine: an engine spec (calm.generation)."""
    for batch in batched(records, batch_size):
        result = model.generate([summary_prompt(r.document) for r in batch], max_new_tokens=max_new_tokens,
                                policy=policy, truncate=True, **engine_settings(engine))
        yield [DocumentSummary(id=r.id, summary=result.texts[i] if result.texts else "",
                               token_ids=result.token_ids[i], exit_layers=result.exit_layers[i],
                               num_layers=result.num_layers, batch_size=len(batch), batch_timings=result.timings)
               for i, r in enumerate(batch)]
