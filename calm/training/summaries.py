"""The model's own summaries of the training documents: one job per (document, sample), generated in
batches (greedy first, then sampled) and cached in the work dir, so that a rerun or a resumed run
generates none twice."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calm.checkpoints.checkpoint import write_atomic
from calm.errors import InputError
from calm.prompts.documents import Record
from calm.prompts.templates import summary_prompt, truncate_document
from calm.training.config import TrainConfig
from calm.training.order import mix

if TYPE_CHECKING:
    from calm.model import CalmModel
    from calm.training.progress import ProgressUi

SUMMARIES_FILE = "summaries.jsonl"


def document_prompt(tokenizer: Any, document: str, config: TrainConfig) -> str:
    return summary_prompt(truncate_document(tokenizer, document, config.max_doc_tokens))


@dataclass(frozen=True)
class SummaryJob:
    key: str
    source: str
    record_id: str
    sample: int
    prompt: str


def summary_jobs(
    calm: CalmModel, documents: Iterable[tuple[str, Record]], config: TrainConfig, samples: int
) -> list[SummaryJob]:
    jobs = []
    for source, record in documents:
        prompt = document_prompt(calm.tokenizer, record.document, config)
        for sample in range(samples):
            settings = (prompt, config.summary_tokens, sample, config.seed if sample else None)
            jobs.append(
                SummaryJob(
                    hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24], source, record.id, sample, prompt
                )
            )
    return jobs


def read_summary_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    cache = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                cache[row["key"]] = row
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"summary cache {path} is corrupt ({exc}); delete it to regenerate the summaries") from exc
    return cache


def write_summary_cache(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def generate_summaries(
    calm: CalmModel,
    jobs: Sequence[SummaryJob],
    config: TrainConfig,
    cache_path: Path,
    progress: ProgressUi | None = None,
) -> tuple[dict[str, dict], int]:
    """The model's own summaries for `jobs`, from the cache where it has them; the cache is
    rewritten (atomically) after every batch, so an interrupted run loses at most one batch."""
    from calm.exits.policy import ExitPolicy

    cache = read_summary_cache(cache_path)
    missing = [j for j in jobs if j.key not in cache]
    # Similar lengths together: less left padding per batch.
    missing.sort(key=lambda j: (j.sample, len(j.prompt)))
    task = progress.add_task("summaries", total=len(missing)) if progress is not None and missing else None
    generated = 0
    for start in range(0, len(missing), config.gen_batch_size):
        batch = missing[start : start + config.gen_batch_size]
        same = [j for j in batch if j.sample == batch[0].sample]  # greedy and sampled rows never share a batch
        rest = [j for j in batch if j.sample != batch[0].sample]
        for group in (same, rest):
            if not group:
                continue
            sampled = group[0].sample > 0
            out = calm.generate(
                [j.prompt for j in group],
                max_new_tokens=config.summary_tokens,
                policy=ExitPolicy.never(),
                do_sample=sampled,
                top_p=0.9 if sampled else 1.0,
                seed=mix(config.seed, "summaries", group[0].key) if sampled else None,
            )
            for job, ids, text in zip(group, out.token_ids, out.texts):
                cache[job.key] = {
                    "key": job.key,
                    "source": job.source,
                    "id": job.record_id,
                    "sample": job.sample,
                    "text": text,
                    "token_ids": list(ids),
                }
            generated += len(group)
        write_summary_cache(cache_path, cache.values())
        if progress is not None and task is not None:
            progress.advance(task, len(batch))
    if progress is not None and task is not None:
        progress.remove_task(task)
    return cache, generated
