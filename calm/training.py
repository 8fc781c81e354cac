"""Training exit heads by self-distillation (CALM §5), and optional CALM fine-tuning of the backbone.

Mode ``heads`` (default): the backbone stays frozen. Training positions are the predictions the
model itself made while writing greedy summaries of training documents (prompt: the summary prompt
of calm.data), plus random positions of plain-text chunks. The backbone runs once per sequence
under no_grad with output_hidden_states=True and the hidden states of every layer at those
positions are kept. Each step then samples a minibatch of positions and a few exit layers per
position (the full-vocabulary LM head is the expensive part on CPU) and trains

- the low-rank maps: KL(final layer's next-token distribution || layer k's, through
  Network.token_logits = lm_head(final_norm(h + (h A_k) B_k))), and
- the exit classifier: class-balanced BCE on the detached hidden state, against the oracle label
  "layer k's (transformed) argmax equals the final layer's argmax". The positive rate of each
  layer is tracked with decayed counts and sets that layer's pos_weight = negatives / positives.

Mode ``finetune``: CALM's fine-tuning of the backbone itself, the average of every layer's LM loss
through the shared final norm and LM head with weights proportional to the layer index
(w_k = k / sum_j j). Targets are the reference summaries where the data has them (the model's own
greedy summaries otherwise) and the next tokens of text chunks.

Runs on CPU or GPU through accelerate (``accelerate launch -m calm.training ...`` for several GPUs;
bf16 autocast on GPU). Data order is a pure function of (seed, step), and periodic checkpoints
hold the trained weights, the optimizer moments, the step and the RNG state in safetensors (nothing
is pickled), so ``resume`` continues to the same result as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from calm.adapters import adapter_for
from calm.adapters.base import Adapter
from calm.checkpoint import CheckpointConfig, is_checkpoint, read_config, save_checkpoint, write_atomic, write_safetensors
from calm.checkpoint import save_backbone as _save_backbone
from calm.data import Record, read_jsonl, read_text, summary_prompt, truncate_document
from calm.errors import CheckpointError, InputError, UnsupportedModelError
from calm.heads import ExitHeads, HeadsConfig

MODES = ("heads", "finetune", "lora")
SUMMARIES_FILE = "summaries.jsonl"
STATE_FILE = "state.safetensors"
BACKBONE_DIR = "backbone"
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
COUNT_DECAY = 0.99          # decay of the per-layer label counts behind the classifier's pos_weight
MIN_CONTEXT = 8             # text-chunk positions start after this many tokens of context
# Fields that may change between a run and its resume without changing the result.
RESUME_FREE = ("resume", "checkpoint_every", "log_every", "device", "out", "work_dir")


# --------------------------------------------------------------------------------------------
# configuration and result
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """What `train` does. Paths are strings so the config is JSON as it stands."""

    data: tuple[str, ...]                   # .jsonl (`document`, optional `summary`) and .txt files
    out: str                                # the calm checkpoint directory written
    model: str = "smollm2"                  # alias, local dir, .gguf, hub id, or a calm checkpoint
    mode: str = "heads"                     # "heads" (frozen backbone), "finetune" or "lora" (calm.lora_training)
    steps: int = 600
    batch_size: int = 64                    # heads: positions per step; finetune, lora: sequences per step
    layers_per_step: int = 4                # heads: exit layers sampled per position
    min_exit_layer: int = 1                 # heads: train exit layers min_exit_layer..L-1 only
    lr: float | None = None                 # None: 3e-3 (heads), 2e-5 (finetune), 3e-4 (lora)
    warmup: float = 0.05                    # fraction of steps of linear warm-up; cosine decay to 10 % after
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 32                          # of the exit heads' low-rank maps
    lora_rank: int = 16                     # lora: rank of the backbone's adapters
    lora_layers: str | None = None          # lora: decoder layers adapted, "first-last" (0-based); None: all
    anchor: float = 1.0                     # lora: weight of the final layer's KL to the original model
    doc_positions: int = 16                 # lora: random document positions per sequence besides the summary
    classifier: bool = True
    transform: bool = True
    seed: int = 0
    resume: bool = False
    max_docs: int | None = None             # documents used from the JSONL files (all of them: None)
    summaries_per_doc: int = 1              # the first greedy, further ones sampled (temperature 1, top-p 0.9)
    summary_tokens: int = 64                # max new tokens of a generated summary
    max_doc_tokens: int = 384               # documents are cut to this many tokens before prompting
    gen_batch_size: int = 8
    chunk_tokens: int = 256                 # text files are split into chunks of this many tokens
    max_chunks: int | None = 200            # text chunks used, spread over the text files (all: None)
    positions_per_chunk: int = 32           # random positions taken from each text chunk
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "auto"                    # auto | cpu | cuda (accelerate launch decides for multi-GPU)
    work_dir: str | None = None             # summaries cache + training state; default <out>/training

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            object.__setattr__(self, "data", (str(self.data),))
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        if not self.data:
            raise InputError("no training data: give at least one .jsonl or .txt file")
        if self.mode not in MODES:
            raise InputError(f"unknown training mode {self.mode!r}; choose one of {', '.join(MODES)}")
        positive = ("steps", "batch_size", "layers_per_step", "min_exit_layer", "rank", "lora_rank", "doc_positions",
                    "summaries_per_doc", "summary_tokens",
                    "max_doc_tokens", "gen_batch_size", "chunk_tokens", "positions_per_chunk", "checkpoint_every",
                    "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_docs", "max_chunks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InputError(f"{name} must be an integer >= 0 (or None for all), got {value!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise InputError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise InputError("weight_decay and grad_clip must be >= 0")
        if self.mode == "heads" and not (self.classifier or self.transform):
            raise InputError("nothing to train: the heads have neither a transform nor a classifier")
        if not (self.anchor >= 0 and math.isfinite(self.anchor)):
            raise InputError(f"anchor must be a finite number >= 0, got {self.anchor}")
        if self.lora_layers is not None and not _is_layer_range(self.lora_layers):
            raise InputError(f"lora_layers must look like '0-19' (first-last, 0-based), got {self.lora_layers!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"heads": 3e-3, "finetune": 2e-5, "lora": 3e-4}[self.mode]

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out) / "training"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"] = list(self.data)
        return d


def _is_layer_range(text: str) -> bool:
    first, _, last = text.partition("-")
    return first.isdigit() and (last == "" or (last.isdigit() and int(last) >= int(first)))


@dataclass(frozen=True)
class TrainResult:
    out: Path
    mode: str
    steps: int                               # steps done in total (== config.steps)
    steps_this_run: int
    resumed_from: int | None                 # the step a resumed run started from
    final_losses: dict                       # mean over the last log window
    history: tuple[dict, ...]                # one entry per log window of this run
    num_positions: int                       # heads: training positions; finetune: loss positions
    num_sequences: int
    summaries_generated: int                 # by this run (the rest came from the cache)
    timings: dict                            # seconds: load, summaries, features, train; per_step, per_summary
    heads: ExitHeads | None = None           # the trained heads (mode heads), on the CPU


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingData:
    documents: tuple[tuple[str, Record], ...]     # (file, record)
    texts: tuple[tuple[str, str], ...]            # (file, text)
    files: tuple[dict, ...]                       # what each file is, for the checkpoint's record


def read_training_data(paths: Sequence[str], max_docs: int | None = None) -> TrainingData:
    """Read every data file up front, so bad data fails before any model is loaded."""
    documents: list[tuple[str, Record]] = []
    texts: list[tuple[str, str]] = []
    files = []
    for path in paths:
        p = Path(path)
        suffix = p.suffix.lower()
        if p.is_dir():
            raise InputError(f"{p} is a directory; give the .jsonl or .txt files in it")
        if suffix in JSONL_SUFFIXES:
            records, skipped = read_training_jsonl(p)
            documents.extend((str(path), r) for r in records)
            entry = {"path": str(path), "kind": "jsonl", "records": len(records), "sha256": _file_hash(p)}
            if skipped:
                entry["skipped_empty_documents_at_lines"] = skipped
            files.append(entry)
        elif suffix in TEXT_SUFFIXES:
            texts.append((str(path), read_text(p)))
            files.append({"path": str(path), "kind": "text", "sha256": _file_hash(p)})
        else:
            if not p.is_file():
                raise InputError(f"file not found: {p}")
            raise InputError(f"{p}: unsupported training data file; give .jsonl records (a 'document' field and "
                             f"optional 'summary') or plain UTF-8 text ({', '.join(TEXT_SUFFIXES)})")
    if max_docs is not None:
        documents = documents[:max_docs]
    if not documents and not texts:
        raise InputError("no training documents or text left (max_docs=0 and no text files)")
    return TrainingData(tuple(documents), tuple(texts), tuple(files))


def read_training_jsonl(path: Path) -> tuple[list[Record], list[int]]:
    """Records of a JSONL training file, and the line numbers of records skipped because their
    document is empty (XSum has a few: photo galleries). Everything else that is wrong with the
    file is an InputError, as in calm.data.read_jsonl."""
    skipped: list[int] = []
    return read_jsonl(path, skipped=skipped), skipped


@dataclass(frozen=True)
class TrainSequence:
    """One token sequence and the positions of it that train: position p predicts targets[i]."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    targets: tuple[int, ...]
    kind: str                 # "summary" | "reference" | "text"
    source: str


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mix(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


@dataclass(frozen=True)
class _SummaryJob:
    key: str
    source: str
    record_id: str
    sample: int
    prompt: str


def _summary_jobs(calm, documents: Iterable[tuple[str, Record]], config: TrainConfig, samples: int) -> list[_SummaryJob]:
    jobs = []
    for source, record in documents:
        prompt = summary_prompt(truncate_document(calm.tokenizer, record.document, config.max_doc_tokens))
        for sample in range(samples):
            settings = (prompt, config.summary_tokens, sample, config.seed if sample else None)
            jobs.append(_SummaryJob(hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24], source,
                                    record.id, sample, prompt))
    return jobs


def _read_summary_cache(path: Path) -> dict[str, dict]:
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


def _write_summary_cache(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def generate_summaries(calm, jobs: Sequence[_SummaryJob], config: TrainConfig, cache_path: Path,
                       progress=None) -> tuple[dict[str, dict], int]:
    """The model's own summaries for `jobs`, from the cache where it has them; the cache is
    rewritten (atomically) after every batch, so an interrupted run loses at most one batch."""
    from calm.policy import ExitPolicy

    cache = _read_summary_cache(cache_path)
    missing = [j for j in jobs if j.key not in cache]
    # Similar lengths together: less left padding per batch.
    missing.sort(key=lambda j: (j.sample, len(j.prompt)))
    task = progress.add_task("summaries", total=len(missing)) if progress is not None and missing else None
    generated = 0
    for start in range(0, len(missing), config.gen_batch_size):
        batch = missing[start:start + config.gen_batch_size]
        sample = batch[0].sample
        same = [j for j in batch if j.sample == sample]          # greedy and sampled rows never share a batch
        rest = [j for j in batch if j.sample != sample]
        for group in (same, rest):
            if not group:
                continue
            sampled = group[0].sample > 0
            out = calm.generate([j.prompt for j in group], max_new_tokens=config.summary_tokens,
                                policy=ExitPolicy.never(), do_sample=sampled, top_p=0.9 if sampled else 1.0,
                                seed=_mix(config.seed, "summaries", group[0].key) if sampled else None)
            for job, ids, text in zip(group, out.token_ids, out.texts):
                cache[job.key] = {"key": job.key, "source": job.source, "id": job.record_id, "sample": job.sample,
                                  "text": text, "token_ids": list(ids)}
            generated += len(group)
        _write_summary_cache(cache_path, cache.values())
        if task is not None:
            progress.advance(task, len(batch))
    if task is not None:
        progress.remove_task(task)
    return cache, generated


def _prompt_ids(calm, prompt: str, max_new_tokens: int) -> list[int]:
    return calm.encode_prompts([prompt], max_new_tokens).ids[0].tolist()


def summary_sequence(prompt_ids: Sequence[int], summary_ids: Sequence[int], kind: str, source: str) -> TrainSequence:
    """prompt + summary; the positions are the n predictions that wrote the n summary tokens."""
    n, p = len(summary_ids), len(prompt_ids)
    ids = tuple(prompt_ids) + tuple(summary_ids)
    return TrainSequence(ids=ids, positions=tuple(range(p - 1, p + n - 1)), targets=tuple(summary_ids),
                         kind=kind, source=source)


def text_chunks(tokenizer, texts: Sequence[tuple[str, str]], config: TrainConfig,
                all_positions: bool = False) -> list[TrainSequence]:
    """Chunks of chunk_tokens tokens of the text files, max_chunks of them picked at random
    (seeded) across all files, each with positions_per_chunk random positions."""
    chunks: list[tuple[str, list[int]]] = []
    for source, text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), config.chunk_tokens):
            piece = ids[start:start + config.chunk_tokens]
            if len(piece) >= 2:
                chunks.append((source, piece))
    if texts and not chunks:
        raise InputError(f"the text files ({', '.join(s for s, _ in texts)}) hold fewer than 2 tokens")
    if config.max_chunks is not None and len(chunks) > config.max_chunks:
        pick = torch.randperm(len(chunks), generator=_generator(config.seed, "chunks"))[:config.max_chunks]
        chunks = [chunks[i] for i in sorted(pick.tolist())]
    out = []
    for number, (source, piece) in enumerate(chunks):
        first = min(MIN_CONTEXT, len(piece) - 2)
        candidates = torch.arange(first, len(piece) - 1)                  # every position has a next token
        if not all_positions and candidates.numel() > config.positions_per_chunk:
            order = torch.randperm(candidates.numel(), generator=_generator(config.seed, "positions", number))
            candidates = candidates[order[:config.positions_per_chunk]].sort().values
        positions = tuple(candidates.tolist())
        out.append(TrainSequence(ids=tuple(piece), positions=positions, targets=tuple(piece[p + 1] for p in positions),
                                 kind="text", source=source))
    return out


# --------------------------------------------------------------------------------------------
# hidden states
# --------------------------------------------------------------------------------------------

def _forward(model, ids: torch.Tensor, mask: torch.Tensor | None = None):
    kwargs = {"input_ids": ids, "output_hidden_states": True, "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask
    try:
        return model(**kwargs, logits_to_keep=1)
    except TypeError:
        return model(**kwargs)


def last_state_is_normed(model, adapter: Adapter, device) -> bool:
    """Whether transformers' last hidden state already went through the final norm (Llama and GPT-2
    do that; every other entry is a raw layer output): checked against the model's own logits."""
    ids = torch.arange(3, 3 + 6, device=device)[None] % adapter.vocab_size
    with torch.no_grad():
        out = _forward(model, ids)
        last = out.hidden_states[-1][0, -1].float()
        want = out.logits[0, -1].float()
        as_is = (adapter.lm_head(last.to(adapter.dtype)).float() - want).abs().max()
        normed = (adapter.lm_head(adapter.final_norm(last.to(adapter.dtype))).float() - want).abs().max()
    return bool(as_is <= normed)


@dataclass(frozen=True)
class Features:
    exits: torch.Tensor      # [P, L-1, D] raw hidden state after layers 1..L-1
    final: torch.Tensor      # [P, D] the final layer's state after the final norm (the LM head's input)


@torch.no_grad()
def hidden_features(model, adapter: Adapter, sequences: Sequence[TrainSequence], device, normed_last: bool,
                    progress=None, dtype: torch.dtype = torch.float32) -> Features:
    """The backbone's hidden states at every sequence's positions, one sequence per forward."""
    L, D = adapter.num_layers, adapter.hidden_size
    total = sum(len(s.positions) for s in sequences)
    exits = torch.empty(total, L - 1, D, dtype=dtype, device=device)
    final = torch.empty(total, D, dtype=dtype, device=device)
    task = progress.add_task("hidden states", total=len(sequences)) if progress is not None and sequences else None
    at = 0
    for seq in sequences:
        out = _forward(model, torch.tensor([seq.ids], device=device))
        hs = out.hidden_states
        pos = torch.tensor(seq.positions, device=device)
        n = pos.numel()
        for k in range(1, L):
            exits[at:at + n, k - 1] = hs[k][0].index_select(0, pos).to(dtype)
        last = hs[L][0].index_select(0, pos)
        final[at:at + n] = (last if normed_last else adapter.final_norm(last)).to(dtype)
        at += n
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return Features(exits, final)


# --------------------------------------------------------------------------------------------
# objectives (nn.Modules so that accelerate/DDP sees the forward)
# --------------------------------------------------------------------------------------------

def classifier_logits(heads: ExitHeads, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    """ExitHeads.classifier_logit for rows of different layers: h [R, D], layers [R] (1..L-1)."""
    h = h.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    idx = layers - 1
    return (h * heads.cls_weight.index_select(0, idx).float()).sum(-1) + heads.cls_bias.index_select(0, idx).float()


class HeadsObjective(nn.Module):
    """Self-distillation of the exit heads against the frozen backbone's final layer."""

    def __init__(self, heads: ExitHeads, adapter: Adapter):
        super().__init__()
        self.heads = heads
        self.adapter = adapter          # a plain object: the backbone is not a submodule, so not trained

    def forward(self, h: torch.Tensor, layers: torch.Tensor, final: torch.Tensor, row_pos: torch.Tensor):
        """h [R, D] exit states at layers [R]; final [B, D] normed final states; row_pos [R] -> index into B.
        Returns per row: KL(final || layer) [R], classifier logit [R], oracle label [R] (float)."""
        a = self.adapter
        with torch.no_grad():
            teacher = a.lm_head(final.to(a.dtype)).float().log_softmax(-1)              # [B, V]
            teacher_top = teacher.argmax(-1)
        h = h.to(a.dtype)
        student = a.lm_head(a.final_norm(self.heads.transform(h, layers))).float().log_softmax(-1)   # [R, V]
        t = teacher.index_select(0, row_pos)
        kl = F.kl_div(student, t, reduction="none", log_target=True).sum(-1)
        labels = (student.detach().argmax(-1) == teacher_top.index_select(0, row_pos)).float()
        logit = classifier_logits(self.heads, h.detach(), layers)
        return kl, logit, labels


def layer_weights(num_layers: int) -> torch.Tensor:
    """CALM's fine-tuning weights of the L per-layer LM losses: w_k = k / sum_j j, k = 1..L."""
    k = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return k / k.sum()


class FinetuneObjective(nn.Module):
    """CALM fine-tuning: every layer's LM loss through the shared final norm and head."""

    def __init__(self, model: nn.Module, adapter: Adapter, normed_last: bool):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.normed_last = normed_last

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        """Per-layer mean cross-entropy [L] at the positions (rows, cols) of the batch."""
        a = self.adapter
        hs = _forward(self.model, ids, mask).hidden_states
        losses = []
        for k in range(1, a.num_layers + 1):
            h = hs[k][rows, cols]
            if k < a.num_layers or not self.normed_last:
                h = a.final_norm(h)
            losses.append(F.cross_entropy(a.lm_head(h).float(), targets))
        return torch.stack(losses)


# --------------------------------------------------------------------------------------------
# deterministic data order and schedule
# --------------------------------------------------------------------------------------------

class EpochSampler:
    """Indices of step `step`: consecutive slices of per-epoch permutations seeded by (seed, rank, epoch)."""

    def __init__(self, size: int, seed: int, rank: int = 0):
        if size < 1:
            raise InputError("no training positions: the data produced no usable sequences")
        self.size, self.seed, self.rank = size, seed, rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=_generator(self.seed, "epoch", self.rank, epoch))}
        return self._perms[epoch]

    def indices(self, step: int, count: int) -> torch.Tensor:
        out, i = [], step * count
        while count > 0:
            epoch, offset = divmod(i, self.size)
            take = min(count, self.size - offset)
            out.append(self._perm(epoch)[offset:offset + take])
            i += take
            count -= take
        return torch.cat(out)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to 10 % of the peak."""
    peak = config.learning_rate
    warm = int(config.warmup * config.steps)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _local_count(total: int, rank: int, world: int) -> int:
    return total // world + (1 if rank < total % world else 0)


# --------------------------------------------------------------------------------------------
# training state (safetensors + JSON metadata, written atomically)
# --------------------------------------------------------------------------------------------

def _fingerprint(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE}


def check_fingerprint(stored: dict, config: TrainConfig) -> None:
    """A resume must run with the saved run's settings (those in RESUME_FREE aside)."""
    now = json.loads(json.dumps(_fingerprint(config)))
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if diff:
        raise InputError("cannot resume: the training settings differ from the saved run in "
                         + ", ".join(f"{k} (saved {stored.get(k)!r}, now {now.get(k)!r})" for k in diff)
                         + "; use the same settings, or start again without --resume")


def save_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, step: int, meta: dict,
               extra_tensors: dict[str, torch.Tensor]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for k, v in extra_tensors.items():
        tensors[f"extra.{k}"] = v.detach().cpu().clone().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    metadata = {"format": "calm-training-state", "step": str(step), "meta": json.dumps(meta),
                "param_groups": json.dumps(groups)}
    write_safetensors(path, tensors, metadata)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"training state {path} is corrupt ({exc}); start again without --resume") from exc
    if metadata.get("format") != "calm-training-state":
        raise InputError(f"{path} is not a calm training state")
    return tensors, metadata


def _restore(tensors: dict, metadata: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}


# --------------------------------------------------------------------------------------------
# backbone reference
# --------------------------------------------------------------------------------------------

def _backbone_refs(model_ref: str) -> str:
    """What load_backbone resolves: a calm checkpoint's own backbone, or the reference itself."""
    if is_checkpoint(model_ref):
        cfg = read_config(model_ref)
        ref = cfg.backbone
        if not Path(ref).is_absolute() and (Path(model_ref) / ref).exists():
            ref = str((Path(model_ref) / ref).resolve())
        return ref
    return model_ref


def adapted_backbone(model_ref: str, model: nn.Module) -> nn.Module:
    """The backbone with the LoRA adapter of the model reference (a checkpoint, or an alias's
    shipped assets) merged in, as CalmModel.from_pretrained would load it."""
    from calm.checkpoint import with_adapter
    from calm.model import default_checkpoint
    source = Path(model_ref) if is_checkpoint(model_ref) else default_checkpoint(model_ref)
    return with_adapter(source, model) if source is not None else model


def stored_backbone_ref(load_ref: str, out: Path) -> str:
    """The backbone as the checkpoint names it: aliases and hub ids as given, paths absolute,
    or relative to the checkpoint when they lie inside it."""
    path = Path(load_ref).expanduser()
    if not path.exists():
        return load_ref
    path = path.resolve()
    try:
        return str(path.relative_to(out.resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    want_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but torch sees no CUDA GPU")
    return Accelerator(cpu=not want_cuda, mixed_precision="bf16" if want_cuda else "no")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True),
                    disable=not enabled, transient=False)


class _Progress:
    """rich Progress with a default 'info' field."""

    def __init__(self, progress):
        self.p = progress
        self.console = progress.console

    def add_task(self, description, total, **kw):
        return self.p.add_task(description, total=total, info=kw.get("info", ""))

    def advance(self, task, n=1):
        self.p.advance(task, n)

    def update(self, task, **kw):
        self.p.update(task, **kw)

    def remove_task(self, task):
        self.p.update(task, visible=True)


def train(config: TrainConfig, *, command: str | None = None, progress: bool = True,
          callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train exit heads (mode 'heads') or fine-tune the backbone (mode 'finetune'); see the module doc.

    callback(step, losses) runs after every step once its checkpoint (if any) is written; raising
    from it interrupts training like a crash would (the tests use that to check resuming).
    """
    if config.mode == "lora":
        from calm.lora_training import train_lora
        return train_lora(config, command=command, progress=progress, callback=callback)
    t_start = time.perf_counter()
    data = read_training_data(config.data, config.max_docs)
    out, work = Path(config.out), config.work_path
    for entry in data.files:
        if entry.get("skipped_empty_documents_at_lines"):
            lines = entry["skipped_empty_documents_at_lines"]
            print(f"warning: {entry['path']}: skipped {len(lines)} record(s) with an empty document "
                  f"(line {', '.join(map(str, lines[:10]))}{' ...' if len(lines) > 10 else ''})", file=sys.stderr)
    from calm.loading import load_backbone
    from calm.model import CalmModel

    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    load_ref = _backbone_refs(config.model)
    loaded = load_backbone(load_ref, dtype=torch.float32, device=accelerator.device)
    model, tokenizer = adapted_backbone(config.model, loaded.model), loaded.tokenizer
    adapter = adapter_for(model)
    if adapter.is_encoder_decoder:
        raise UnsupportedModelError("calm training supports decoder-only models; this one is an encoder-decoder")
    if tokenizer is None:
        raise InputError(f"model {config.model!r} has no tokenizer; training reads text and needs one")
    calm = CalmModel(model, tokenizer, backbone=load_ref)
    model.requires_grad_(False)
    normed_last = last_state_is_normed(model, adapter, accelerator.device)
    t_loaded = time.perf_counter()
    if is_checkpoint(out) and main:
        try:
            previous = read_config(out)
        except CheckpointError:                   # unreadable: it is overwritten below anyway
            previous = None
        if previous is not None and previous.calibration:
            print(f"warning: {out} holds a calibration table for its previous heads; the new checkpoint drops it "
                  "(calibrate the new heads again)", file=sys.stderr)

    bar = _progress(progress and main)
    with bar:
        ui = _Progress(bar)
        # ---- sequences ------------------------------------------------------------------------
        summaries_s = 0.0
        generated = 0
        sequences: list[TrainSequence] = []
        docs = list(data.documents)
        if config.mode == "finetune":
            need = [(s, r) for s, r in docs if not (isinstance(r.summary, str) and r.summary.strip())]
        else:
            need = docs
        samples = config.summaries_per_doc if config.mode == "heads" else 1
        jobs = _summary_jobs(calm, need, config, samples)
        cache_path = work / SUMMARIES_FILE
        if jobs:
            t0 = time.perf_counter()
            mine = jobs[rank::world]
            shard_path = cache_path if world == 1 else work / f"summaries.rank{rank}.jsonl"
            if world > 1 and cache_path.is_file():
                shared = _read_summary_cache(cache_path)
                mine = [j for j in mine if j.key not in shared]
            _, generated = generate_summaries(calm, mine, config, shard_path, ui)
            if world > 1:
                accelerator.wait_for_everyone()
                if main:
                    merged = _read_summary_cache(cache_path)
                    for r in range(world):
                        merged.update(_read_summary_cache(work / f"summaries.rank{r}.jsonl"))
                    _write_summary_cache(cache_path, merged.values())
                accelerator.wait_for_everyone()
            cache = _read_summary_cache(cache_path)
            summaries_s = time.perf_counter() - t0
            for job in jobs:
                row = cache[job.key]
                if row["token_ids"]:
                    prompt = _prompt_ids(calm, job.prompt, config.summary_tokens)
                    sequences.append(summary_sequence(prompt, row["token_ids"], "summary", job.source))
        if config.mode == "finetune":
            eos = calm.eos_token_ids[:1]
            for source, record in docs:
                if isinstance(record.summary, str) and record.summary.strip():
                    prompt = summary_prompt(truncate_document(tokenizer, record.document, config.max_doc_tokens))
                    target = tokenizer(record.summary.strip(), add_special_tokens=False)["input_ids"] + list(eos)
                    sequences.append(summary_sequence(_prompt_ids(calm, prompt, config.summary_tokens), target,
                                                      "reference", source))
        sequences.extend(text_chunks(tokenizer, data.texts, config))
        sequences = [s for s in sequences if s.positions]
        if not sequences:
            raise InputError("the training data produced no usable positions (empty summaries, too little text)")
        local_sequences = sequences[rank::world]
        num_positions = sum(len(s.positions) for s in sequences)

        # ---- model, optimizer -----------------------------------------------------------------
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        features = None
        if config.mode == "heads":
            heads = ExitHeads(HeadsConfig(num_layers=adapter.num_layers, hidden_size=adapter.hidden_size,
                                          rank=config.rank, transform=config.transform,
                                          classifier=config.classifier, min_layer=config.min_exit_layer)
                             ).to(accelerator.device)
            if not config.transform:
                heads.down.requires_grad_(False)
                heads.up.requires_grad_(False)
            if not config.classifier:
                heads.cls_weight.requires_grad_(False)
                heads.cls_bias.requires_grad_(False)
            features = hidden_features(model, adapter, local_sequences, accelerator.device, normed_last, ui)
            objective: nn.Module = HeadsObjective(heads, adapter)
            trained: nn.Module = heads
            sampler = EpochSampler(features.final.shape[0], config.seed, rank)
        else:
            heads = None
            model.requires_grad_(True)
            model.train()
            objective = FinetuneObjective(model, adapter, normed_last)
            trained = model
            sampler = EpochSampler(len(local_sequences), config.seed, rank)
        features_s = time.perf_counter() - t0
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      betas=(0.9, 0.999), eps=1e-8, foreach=False)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        L = adapter.num_layers
        pos_count = torch.zeros(L - 1, dtype=torch.float64)
        all_count = torch.zeros(L - 1, dtype=torch.float64)

        # ---- resume ---------------------------------------------------------------------------
        state_path = work / STATE_FILE
        start, resumed_from = 0, None
        if config.resume and state_path.is_file():
            tensors, metadata = load_state(state_path)
            meta = json.loads(metadata["meta"])
            check_fingerprint(meta.get("fingerprint", {}), config)
            if meta.get("num_processes", 1) != world:
                ui.console.print(f"[yellow]resuming with {world} processes; the run was saved with "
                                 f"{meta.get('num_processes')}, so its data order changes")
            extras = _restore(tensors, metadata, accelerator.unwrap_model(objective).heads
                              if config.mode == "heads" else accelerator.unwrap_model(objective).model,
                              optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
            if "pos_count" in extras:
                pos_count, all_count = extras["pos_count"].double(), extras["all_count"].double()
            start = resumed_from = int(metadata["step"])
            history_before = meta.get("history", [])
            if main:
                ui.console.print(f"resuming from step {start} of {config.steps} ({state_path})")
        else:
            history_before = []
            if config.resume and main:
                ui.console.print(f"no training state in {work}: starting from step 0")

        stored_ref = stored_backbone_ref(load_ref, out) if config.mode == "heads" else BACKBONE_DIR
        weights = layer_weights(L).to(accelerator.device)
        history: list[dict] = []
        window: dict[str, list[float]] = {}
        last_losses: dict = history_before[-1] if history_before else {}

        def checkpoint(step: int) -> None:
            accelerator.wait_for_everyone()
            if not main:
                return
            unwrapped = accelerator.unwrap_model(objective)
            module = unwrapped.heads if config.mode == "heads" else unwrapped.model
            meta = {"fingerprint": _fingerprint(config), "num_processes": world, "history": history_before + history,
                    "config": config.to_dict()}
            save_state(state_path, module, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                       step, meta, {"pos_count": pos_count, "all_count": all_count})
            extra = {"training": {
                "command": command or f"calm.training.train({config!r})", "mode": config.mode,
                "config": config.to_dict(), "data": list(data.files), "steps": step, "total_steps": config.steps,
                "final_losses": last_losses, "positions": num_positions, "sequences": len(sequences),
                "summaries": sum(1 for s in sequences if s.kind == "summary"),
                "backbone_source": config.model, "torch": torch.__version__, "num_processes": world}}
            if config.mode == "finetune":
                _save_backbone(module, tokenizer, out / BACKBONE_DIR)
            save_checkpoint(out, CheckpointConfig(backbone=stored_ref, heads=module.config if heads is not None else None,
                                                  extra=extra), module if heads is not None else None)

        # ---- steps ----------------------------------------------------------------------------
        t_train = time.perf_counter()
        local_b = _local_count(config.batch_size, rank, world)
        task = ui.add_task(config.mode, total=config.steps)
        ui.update(task, completed=start)
        for step in range(start, config.steps):
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.mode == "heads":
                metrics, loss = _heads_step(config, accelerator, objective, features, sampler, step, rank, local_b,
                                            pos_count, all_count)
            else:
                metrics, loss = _finetune_step(config, accelerator, objective, local_sequences, sampler, step,
                                               local_b, weights)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                entry = {"step": done, "lr": lr, **{k: sum(v) / len(v) for k, v in window.items()}}
                history.append(entry)
                last_losses = entry
                window = {}
                if main:
                    ui.console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in entry.items()))
            ui.advance(task)
            ui.update(task, info=" ".join(f"{k}={v[-1]:.3f}" for k, v in window.items()) if window else "")
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpoint(done)
            if callback is not None:
                callback(done, dict(last_losses))
        if start >= config.steps:
            checkpoint(config.steps)                 # a resume of a finished run rewrites its checkpoint
        t_end = time.perf_counter()

    steps_run = max(0, config.steps - start)
    train_s = t_end - t_train
    timings = {"load": t_loaded - t_start, "summaries": summaries_s, "features": features_s, "train": train_s,
               "total": t_end - t_start, "per_step": train_s / steps_run if steps_run else float("nan"),
               "per_summary": summaries_s / generated if generated else float("nan")}
    return TrainResult(out=out, mode=config.mode, steps=config.steps, steps_this_run=steps_run,
                       resumed_from=resumed_from, final_losses=dict(last_losses), history=tuple(history),
                       num_positions=num_positions, num_sequences=len(sequences), summaries_generated=generated,
                       timings=timings, heads=heads.cpu().eval() if heads is not None else None)


def _heads_step(config, accelerator, objective, features: Features, sampler: EpochSampler, step: int, rank: int,
                count: int, pos_count: torch.Tensor, all_count: torch.Tensor):
    L1 = features.exits.shape[1]                                   # L - 1 exit layers
    first = min(config.min_exit_layer, L1)
    k = min(config.layers_per_step, L1 - first + 1)
    idx = sampler.indices(step, count)
    g = _generator(config.seed, "layers", rank, step)
    layers = torch.rand(count, L1 - first + 1, generator=g).argsort(1)[:, :k] + first      # [b, k] in first..L-1
    device = features.exits.device
    idx_d, layers_d = idx.to(device), layers.to(device)
    h = features.exits[idx_d[:, None], layers_d - 1].reshape(count * k, -1)                 # [R, D]
    final = features.final.index_select(0, idx_d)
    row_layers = layers_d.reshape(-1)
    row_pos = torch.arange(count, device=device).repeat_interleave(k)
    with accelerator.autocast():
        kl, logit, labels = objective(h, row_layers, final, row_pos)
    # Class balance per layer from decayed label counts (summed over processes).
    batch_pos = torch.zeros(L1, dtype=torch.float64, device=device).index_add_(0, row_layers - 1, labels.double())
    batch_all = torch.zeros(L1, dtype=torch.float64, device=device).index_add_(0, row_layers - 1,
                                                                               torch.ones_like(labels, dtype=torch.float64))
    if accelerator.num_processes > 1:
        batch_pos, batch_all = accelerator.reduce(batch_pos, "sum"), accelerator.reduce(batch_all, "sum")
    pos_count.mul_(COUNT_DECAY).add_(batch_pos.cpu())
    all_count.mul_(COUNT_DECAY).add_(batch_all.cpu())
    pos_weight = ((all_count - pos_count + 1) / (pos_count + 1)).clamp(0.01, 100.0).float().to(device)
    loss = torch.zeros((), device=device)
    metrics = {"agree": labels.mean().item()}
    if config.transform:
        loss = loss + kl.mean()
        metrics["kl"] = kl.mean().item()
    if config.classifier:
        bce = F.binary_cross_entropy_with_logits(logit, labels, pos_weight=pos_weight[row_layers - 1])
        loss = loss + bce
        metrics["bce"] = bce.item()
        metrics["cls_acc"] = ((logit > 0).float() == labels).float().mean().item()
    return metrics, loss


def _finetune_step(config, accelerator, objective, sequences: Sequence[TrainSequence], sampler: EpochSampler,
                   step: int, count: int, weights: torch.Tensor):
    idx = sampler.indices(step, count).tolist()
    batch = [sequences[i] for i in idx]
    width = max(len(s.ids) for s in batch)
    device = weights.device
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, s in enumerate(batch):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        mask[r, :len(s.ids)] = 1
        rows += [r] * len(s.positions)
        cols += list(s.positions)
        targets += list(s.targets)
    with accelerator.autocast():
        per_layer = objective(ids.to(device), mask.to(device), torch.tensor(rows, device=device),
                              torch.tensor(cols, device=device), torch.tensor(targets, device=device))
    loss = (per_layer * weights).sum()
    return {"loss": loss.item(), "first": per_layer[0].item(), "last": per_layer[-1].item()}, loss


# --------------------------------------------------------------------------------------------
# agreement report: how often layer k's argmax equals the final layer's, before vs after training
# --------------------------------------------------------------------------------------------

def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    pos, neg = scores[labels], scores[~labels]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    ranks = torch.empty_like(scores, dtype=torch.float64)
    order = scores.argsort()
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    return float((ranks[labels].sum() - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


@torch.no_grad()
def layer_agreement(adapter: Adapter, heads: ExitHeads | None, features: Features, chunk: int = 256) -> dict:
    """Per exit layer k = 1..L-1: the fraction of positions where argmax of layer k's prediction
    (plain shared head, and through `heads` when given) equals the final layer's argmax, and the
    exit classifier's quality against that oracle label."""
    L1 = features.exits.shape[1]
    P = features.final.shape[0]
    plain = torch.zeros(L1)
    trained = torch.zeros(L1)
    cls_rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(L1)]
    use_cls = heads is not None and heads.config.classifier
    for start in range(0, P, chunk):
        final = features.final[start:start + chunk].to(adapter.dtype)
        top = adapter.lm_head(final).argmax(-1)
        for k in range(1, L1 + 1):
            h = features.exits[start:start + chunk, k - 1].to(adapter.dtype)
            layers = torch.full((h.shape[0],), k, dtype=torch.long, device=h.device)
            plain[k - 1] += (adapter.lm_head(adapter.final_norm(h)).argmax(-1) == top).sum().item()
            if heads is not None:
                agree = adapter.lm_head(adapter.final_norm(heads.transform(h, layers))).argmax(-1) == top
                trained[k - 1] += agree.sum().item()
                if use_cls:
                    cls_rows[k - 1].append((heads.classify(h, k).cpu(), agree.cpu()))
    result = {"layers": list(range(1, L1 + 1)), "positions": P, "plain": (plain / P).tolist()}
    if heads is not None:
        result["heads"] = (trained / P).tolist()
    if use_cls:
        aucs, acc, p_pos, p_neg = [], [], [], []
        for rows in cls_rows:
            probs = torch.cat([r[0] for r in rows])
            labels = torch.cat([r[1] for r in rows])
            aucs.append(_auc(probs, labels))
            acc.append(float(((probs >= 0.5) == labels).float().mean()))
            p_pos.append(float(probs[labels].mean()) if labels.any() else None)
            p_neg.append(float(probs[~labels].mean()) if (~labels).any() else None)
        result["classifier"] = {"auc": aucs, "accuracy_at_0.5": acc, "mean_p_agree": p_pos, "mean_p_disagree": p_neg}
    return result


@dataclass(frozen=True)
class SummaryFeatures:
    features: Features
    documents: int
    examples: tuple[str, ...]      # the first generated summaries, for the report
    seconds: float                 # generating the summaries (or reading them from the cache)


def summary_features(calm, data: str, num_docs: int, *, summary_tokens: int = 48, max_doc_tokens: int = 256,
                     gen_batch_size: int = 16, progress: bool = True, cache: str | None = None) -> SummaryFeatures:
    """The backbone's hidden states at every position of its own greedy summaries of the first
    num_docs documents of `data`. `cache`: a JSONL file keeping the summaries between reports
    (they depend on the backbone only, not on the heads)."""
    t0 = time.perf_counter()
    records = read_training_jsonl(Path(data))[0][:num_docs]        # documents without text are skipped
    cfg = TrainConfig(data=(data,), out=".", summary_tokens=summary_tokens, max_doc_tokens=max_doc_tokens,
                      gen_batch_size=gen_batch_size)
    jobs = _summary_jobs(calm, [(data, r) for r in records], cfg, 1)
    bar = _progress(progress)
    with bar, tempfile.TemporaryDirectory() as tmp:
        ui = _Progress(bar)
        summaries, _ = generate_summaries(calm, jobs, cfg, Path(cache) if cache else Path(tmp) / SUMMARIES_FILE, ui)
        sequences = [summary_sequence(_prompt_ids(calm, j.prompt, summary_tokens), summaries[j.key]["token_ids"],
                                      "summary", data) for j in jobs if summaries[j.key]["token_ids"]]
        seconds = time.perf_counter() - t0
        normed = last_state_is_normed(calm.model, calm.adapter, calm.device)
        features = hidden_features(calm.model, calm.adapter, sequences, calm.device, normed, ui)
    return SummaryFeatures(features, len(records), tuple(summaries[j.key]["text"] for j in jobs[:3]), seconds)


def agreement_report(checkpoint: str, data: str, num_docs: int = 50, *,
                     summary_tokens: int = 48, max_doc_tokens: int = 256, gen_batch_size: int = 16,
                     device: str | None = None, progress: bool = True, cache: str | None = None) -> dict:
    """Agreement with the final layer on the model's own greedy summaries of the first num_docs
    documents of `data`: the plain shared head (before training) vs the checkpoint's heads (after)."""
    from calm.model import CalmModel

    t0 = time.perf_counter()
    config = read_config(checkpoint)
    calm = CalmModel.from_pretrained(checkpoint, device=device)
    if calm.heads is None:
        raise InputError(f"{checkpoint} has no exit heads to report on")
    found = summary_features(calm, data, num_docs, summary_tokens=summary_tokens, max_doc_tokens=max_doc_tokens,
                             gen_batch_size=gen_batch_size, progress=progress, cache=cache)
    result = layer_agreement(calm.adapter, calm.heads, found.features)
    result.update({"checkpoint": str(checkpoint), "backbone": config.backbone, "data": str(data),
                   "documents": found.documents, "summary_tokens": summary_tokens, "max_doc_tokens": max_doc_tokens,
                   "training": (config.extra or {}).get("training", {}).get("config"),
                   "seconds": {"summaries": found.seconds, "total": time.perf_counter() - t0},
                   "examples": list(found.examples)})
    return result


def agreement_markdown(report: dict) -> str:
    lines = [f"# Per-layer agreement with the final layer: {report['checkpoint']}", "",
             f"Backbone `{report['backbone']}`; {report['documents']} documents of `{report['data']}`, "
             f"{report['positions']} positions of the model's own greedy summaries (max {report['summary_tokens']} "
             f"new tokens, documents cut to {report['max_doc_tokens']} tokens).", "",
             "Agreement = argmax of layer k's next-token prediction equals the final layer's argmax. "
             "*before*: the backbone's own final norm + LM head on layer k's state; *after*: through the trained "
             "low-rank map first. Classifier AUC: exit classifier's score against the *after* agreement label.", ""]
    cls = report.get("classifier")
    header = "| layer | before | after | gain |" + (" classifier AUC | acc@0.5 |" if cls else "")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for i, k in enumerate(report["layers"]):
        before, after = report["plain"][i], report["heads"][i]
        row = f"| {k} | {before:.3f} | {after:.3f} | {after - before:+.3f} |"
        if cls:
            auc = cls["auc"][i]
            row += f" {auc:.3f} |" if auc is not None else " – |"
            row += f" {cls['accuracy_at_0.5'][i]:.3f} |"
        lines.append(row)
    mean_b = sum(report["plain"]) / len(report["plain"])
    mean_a = sum(report["heads"]) / len(report["heads"])
    lines += ["", f"Mean over layers: before {mean_b:.3f}, after {mean_a:.3f}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


if __name__ == "__main__":
    from calm.cli.train import train_command
    train_command(prog_name="python -m calm.training")
