"""Training data: the files, and the token sequences that train (their order: calm.training.order).

A `TrainSequence` is a token sequence and the positions of it whose next token is a target. They
come from the model's own summaries of the documents (generated once and cached in the work dir),
from the reference summaries, and from chunks of plain text. Every random choice is seeded by
(seed, purpose, index), so the data and its order are a pure function of the config."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from calm.errors import InputError
from calm.prompts.documents import Record, read_jsonl, read_text
from calm.training.config import TrainConfig
from calm.training.order import generator
from calm.training.summaries import (
    SUMMARIES_FILE,
    document_prompt,
    generate_summaries,
    read_summary_cache,
    summary_jobs,
    write_summary_cache,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from calm.model import CalmModel
    from calm.training.progress import ProgressUi

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
MIN_CONTEXT = 8  # text-chunk positions start after this many tokens of context


# ---- files ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    documents: tuple[tuple[str, Record], ...]  # (file, record)
    texts: tuple[tuple[str, str], ...]  # (file, text)
    files: tuple[dict, ...]  # what each file is, for the checkpoint's record


def read_training_data(paths: Sequence[str], max_docs: int | None = None) -> TrainingData:
    """Read every data file up front, so bad data fails before any model is loaded."""
    documents: list[tuple[str, Record]] = []
    texts: list[tuple[str, str]] = []
    files: list[dict] = []
    for path in paths:
        p = Path(path)
        suffix = p.suffix.lower()
        if p.is_dir():
            raise InputError(f"{p} is a directory; give the .jsonl or .txt files in it")
        if suffix in JSONL_SUFFIXES:
            records, skipped = read_training_jsonl(p)
            documents.extend((str(path), r) for r in records)
            entry: dict[str, Any] = {
                "path": str(path),
                "kind": "jsonl",
                "records": len(records),
                "sha256": file_hash(p),
            }
            if skipped:
                entry["skipped_empty_documents_at_lines"] = skipped
            files.append(entry)
        elif suffix in TEXT_SUFFIXES:
            texts.append((str(path), read_text(p)))
            files.append({"path": str(path), "kind": "text", "sha256": file_hash(p)})
        else:
            if not p.is_file():
                raise InputError(f"file not found: {p}")
            raise InputError(
                f"{p}: unsupported training data file; give .jsonl records (a 'document' field and "
                f"optional 'summary') or plain UTF-8 text ({', '.join(TEXT_SUFFIXES)})"
            )
    if max_docs is not None:
        documents = documents[:max_docs]
    if not documents and not texts:
        raise InputError("no training documents or text left (max_docs=0 and no text files)")
    return TrainingData(tuple(documents), tuple(texts), tuple(files))


def read_training_jsonl(path: Path) -> tuple[list[Record], list[int]]:
    """Records of a JSONL training file, and the line numbers of records skipped because their
    document is empty (XSum has a few: photo galleries). Everything else that is wrong with the
    file is an InputError, as in calm.prompts.documents.read_jsonl."""
    skipped: list[int] = []
    return read_jsonl(path, skipped=skipped), skipped


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- sequences ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSequence:
    """One token sequence and the positions of it that train: position p predicts targets[i]."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    targets: tuple[int, ...]
    kind: str  # "summary" | "reference" | "text"
    source: str


def encode_prompt(calm: CalmModel, prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt's token ids as calm.generate reads them (in the chat template where the model has one)."""
    return calm.encode_prompts([prompt], max_new_tokens).ids[0].tolist()


def summary_sequence(prompt_ids: Sequence[int], summary_ids: Sequence[int], kind: str, source: str) -> TrainSequence:
    """prompt + summary; the positions are the n predictions that wrote the n summary tokens."""
    n, p = len(summary_ids), len(prompt_ids)
    ids = tuple(prompt_ids) + tuple(summary_ids)
    return TrainSequence(
        ids=ids, positions=tuple(range(p - 1, p + n - 1)), targets=tuple(summary_ids), kind=kind, source=source
    )


def has_summary(record: Record) -> bool:
    return isinstance(record.summary, str) and bool(record.summary.strip())


def reference_sequence(calm: CalmModel, record: Record, source: str, config: TrainConfig) -> TrainSequence:
    """Summary prompt + the record's reference summary and an end of sequence (a record with a summary)."""
    if calm.tokenizer is None or record.summary is None:
        raise InputError(f"{source}: a reference sequence needs the model's tokenizer and the record's summary")
    prompt = encode_prompt(calm, document_prompt(calm.tokenizer, record.document, config), config.summary_tokens)
    eos = list(calm.eos_token_ids[:1])
    target = calm.tokenizer(record.summary.strip(), add_special_tokens=False)["input_ids"] + eos
    return summary_sequence(prompt, target, "reference", source)


def lora_sequences(calm: CalmModel, data: TrainingData, config: TrainConfig) -> list[TrainSequence]:
    """Prompt + reference summary of every document with a summary (loss on the summary and on
    doc_positions random document positions), and the text chunks."""
    out = []
    for number, (source, record) in enumerate(data.documents):
        if not has_summary(record):
            continue
        seq = reference_sequence(calm, record, source, config)
        prompt_length = len(seq.ids) - len(seq.targets)
        doc = torch.randperm(prompt_length - 1, generator=generator(config.seed, "doc", number))
        positions = tuple(sorted(doc[: config.doc_positions].tolist())) + seq.positions
        out.append(
            TrainSequence(
                ids=seq.ids,
                positions=positions,
                targets=tuple(seq.ids[p + 1] for p in positions),
                kind="reference",
                source=source,
            )
        )
    return out + text_chunks(calm.tokenizer, data.texts, config)


def text_chunks(
    tokenizer: Any, texts: Sequence[tuple[str, str]], config: TrainConfig, all_positions: bool = False
) -> list[TrainSequence]:
    """Chunks of chunk_tokens tokens of the text files, max_chunks of them picked at random
    (seeded) across all files, each with positions_per_chunk random positions."""
    chunks: list[tuple[str, list[int]]] = []
    for source, text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), config.chunk_tokens):
            piece = ids[start : start + config.chunk_tokens]
            if len(piece) >= 2:
                chunks.append((source, piece))
    if texts and not chunks:
        raise InputError(f"the text files ({', '.join(s for s, _ in texts)}) hold fewer than 2 tokens")
    if config.max_chunks is not None and len(chunks) > config.max_chunks:
        pick = torch.randperm(len(chunks), generator=generator(config.seed, "chunks"))[: config.max_chunks]
        chunks = [chunks[i] for i in sorted(pick.tolist())]
    out = []
    for number, (source, piece) in enumerate(chunks):
        first = min(MIN_CONTEXT, len(piece) - 2)
        candidates = torch.arange(first, len(piece) - 1)  # every position has a next token
        if not all_positions and candidates.numel() > config.positions_per_chunk:
            order = torch.randperm(candidates.numel(), generator=generator(config.seed, "positions", number))
            candidates = candidates[order[: config.positions_per_chunk]].sort().values
        positions = tuple(candidates.tolist())
        out.append(
            TrainSequence(
                ids=tuple(piece),
                positions=positions,
                targets=tuple(piece[p + 1] for p in positions),
                kind="text",
                source=source,
            )
        )
    return out


# ---- the model's own summaries (calm.training.summaries) ------------------------------------------


def own_summary_sequences(
    calm: CalmModel, data: TrainingData, config: TrainConfig, accelerator: Accelerator, progress: ProgressUi | None
) -> tuple[list[TrainSequence], int, float]:
    """Prompt + the model's own summary of the documents (mode heads: all of them, summaries_per_doc
    each; finetune: those without a reference summary), the summaries generated by this run, and
    the seconds spent on them. Several processes share the jobs and merge their caches."""
    need = [(s, r) for s, r in data.documents if config.mode != "finetune" or not has_summary(r)]
    jobs = summary_jobs(calm, need, config, config.summaries_per_doc if config.mode == "heads" else 1)
    if not jobs:
        return [], 0, 0.0
    t0 = time.perf_counter()
    rank, world, work = accelerator.process_index, accelerator.num_processes, config.work_path
    cache_path = work / SUMMARIES_FILE
    mine = jobs[rank::world]
    if world > 1 and cache_path.is_file():
        shared = read_summary_cache(cache_path)
        mine = [j for j in mine if j.key not in shared]
    shard_path = cache_path if world == 1 else work / f"summaries.rank{rank}.jsonl"
    _, generated = generate_summaries(calm, mine, config, shard_path, progress)
    if world > 1:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            merged = read_summary_cache(cache_path)
            for r in range(world):
                merged.update(read_summary_cache(work / f"summaries.rank{r}.jsonl"))
            write_summary_cache(cache_path, merged.values())
        accelerator.wait_for_everyone()
    cache = read_summary_cache(cache_path)
    seconds = time.perf_counter() - t0
    sequences = [
        summary_sequence(
            encode_prompt(calm, job.prompt, config.summary_tokens), cache[job.key]["token_ids"], "summary", job.source
        )
        for job in jobs
        if cache[job.key]["token_ids"]
    ]
    return sequences, generated, seconds


@dataclass(frozen=True)
class Sequences:
    """The sequences of a run, this process's share of them, and how the summaries among them came about."""

    all: tuple[TrainSequence, ...]
    local: tuple[TrainSequence, ...]  # every num_processes-th, from process_index
    summaries_generated: int  # by this run (the rest came from the cache)
    summaries_seconds: float

    @property
    def num_positions(self) -> int:
        return sum(len(s.positions) for s in self.all)


def training_sequences(
    calm: CalmModel, data: TrainingData, config: TrainConfig, accelerator: Accelerator, progress: ProgressUi | None
) -> Sequences:
    """What the run trains on. heads: own summaries and text chunks; finetune: reference summaries
    where the data has them (own summaries otherwise) and text chunks; lora: `lora_sequences`."""
    if config.mode == "lora":
        sequences, generated, seconds = lora_sequences(calm, data, config), 0, 0.0
    else:
        sequences, generated, seconds = own_summary_sequences(calm, data, config, accelerator, progress)
        if config.mode == "finetune":
            sequences += [reference_sequence(calm, r, s, config) for s, r in data.documents if has_summary(r)]
        sequences += text_chunks(calm.tokenizer, data.texts, config)
    sequences = [s for s in sequences if s.positions]
    if not sequences:
        raise InputError("the training data produced no usable positions (no summaries, too little text)")
    rank, world = accelerator.process_index, accelerator.num_processes
    return Sequences(tuple(sequences), tuple(sequences[rank::world]), generated, seconds)
