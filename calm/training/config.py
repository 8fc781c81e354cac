"""What a training run does (`TrainConfig`) and what it reports (`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from calm.errors import InputError
from calm.exits.heads import ExitHeads

MODES = ("heads", "finetune", "lora")
POSITIVE = (
    "steps",
    "batch_size",
    "layers_per_step",
    "min_exit_layer",
    "rank",
    "lora_rank",
    "doc_positions",
    "summaries_per_doc",
    "summary_tokens",
    "max_doc_tokens",
    "gen_batch_size",
    "chunk_tokens",
    "positions_per_chunk",
    "checkpoint_every",
    "log_every",
)
PEAK_LR = {"heads": 3e-3, "finetune": 2e-5, "lora": 3e-4}


@dataclass(frozen=True)
class TrainConfig:
    """What `train` does. Paths are strings so the config is JSON as it stands."""

    data: tuple[str, ...]  # .jsonl (`document`, optional `summary`) and .txt files
    out: str  # the calm checkpoint directory written
    model: str = "smollm2"  # alias, local dir, .gguf, hub id, or a calm checkpoint
    mode: str = "heads"  # "heads" (frozen backbone), "finetune" or "lora" (calm.training.lora)
    steps: int = 600
    batch_size: int = 64  # heads: positions per step; finetune, lora: sequences per step
    layers_per_step: int = 4  # heads: exit layers sampled per position
    min_exit_layer: int = 1  # heads: train exit layers min_exit_layer..L-1 only
    lr: float | None = None  # None: 3e-3 (heads), 2e-5 (finetune), 3e-4 (lora)
    warmup: float = 0.05  # fraction of steps of linear warm-up; cosine decay to 10 % after
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 32  # of the exit heads' low-rank maps
    lora_rank: int = 16  # lora: rank of the backbone's adapters
    lora_layers: str | None = None  # lora: decoder layers adapted, "first-last" (0-based); None: all
    anchor: float = 1.0  # lora: weight of the final layer's KL to the original model
    doc_positions: int = 16  # lora: random document positions per sequence besides the summary
    classifier: bool = True
    transform: bool = True
    seed: int = 0
    resume: bool = False
    max_docs: int | None = None  # documents used from the JSONL files (all of them: None)
    summaries_per_doc: int = 1  # the first greedy, further ones sampled (temperature 1, top-p 0.9)
    summary_tokens: int = 64  # max new tokens of a generated summary
    max_doc_tokens: int = 384  # documents are cut to this many tokens before prompting
    gen_batch_size: int = 8
    chunk_tokens: int = 256  # text files are split into chunks of this many tokens
    max_chunks: int | None = 200  # text chunks used, spread over the text files (all: None)
    positions_per_chunk: int = 32  # random positions taken from each text chunk
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda (accelerate launch decides for multi-GPU)
    work_dir: str | None = None  # summaries cache + training state; default <out>/training

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            object.__setattr__(self, "data", (str(self.data),))
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        if not self.data:
            raise InputError("no training data: give at least one .jsonl or .txt file")
        if self.mode not in MODES:
            raise InputError(f"unknown training mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_docs", "max_chunks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InputError(f"{name} must be an integer >= 0 (or None for all), got {value!r}")
        self._check_numbers()

    def _check_numbers(self) -> None:
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
        return self.lr if self.lr is not None else PEAK_LR[self.mode]

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
    steps: int  # steps done in total (== config.steps)
    steps_this_run: int
    resumed_from: int | None  # the step a resumed run started from
    final_losses: dict  # mean over the last log window
    history: tuple[dict, ...]  # one entry per log window of this run
    num_positions: int  # heads: training positions; finetune, lora: loss positions
    num_sequences: int
    summaries_generated: int  # by this run (the rest came from the cache)
    timings: dict  # seconds: load, summaries, features, train; per_step, per_summary
    heads: ExitHeads | None = None  # the trained heads (modes heads and lora), on the CPU
