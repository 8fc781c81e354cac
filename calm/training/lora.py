"""Mode lora: CALM fine-tuning with LoRA, which makes the backbone exit-ready while its full-depth
output stays put (the wiring of peft into a training run; the objective is LoraObjective).

Self-distillation toward the original model. Per step, for a batch of sequences:
- the teacher is the original model (peft's adapters disabled), run once under no_grad: its
  final-layer next-token distribution at the loss positions;
- a rotating subset of exit layers (`layers_per_step` of min_exit_layer..L-1, LayerSkip-style)
  reads each layer's state through its exit head (low-rank map, then the shared final norm and
  LM head) and is pulled toward the teacher by KL, weighted as in CALM (w_k proportional to k);
- the anchor: KL of the adapted model's own final layer to the teacher, weighted by `anchor`,
  keeps the full model where it was;
- the exit classifier learns, on the detached states, whether layer k's token equals the adapted
  model's final token (class-balanced by decayed per-layer counts).

Loss positions are the reference summary's positions plus `doc_positions` random positions of the
document (and random positions of text chunks; calm.training.data.lora_sequences), so the
vocabulary-sized work stays small. Only the LoRA matrices and the exit heads train, starting from
the model reference's own heads where they fit. Runs in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from calm.checkpoints import lora
from calm.checkpoints.checkpoint import is_checkpoint, load_heads, name_backbone, read_config
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.training.config import TrainConfig
from calm.training.data import Sequences, TrainSequence
from calm.training.modes import Loaded, Run, adamw
from calm.training.objectives import LoraObjective, lora_loss, make_batch
from calm.training.order import EpochSampler, generator

if TYPE_CHECKING:
    from accelerate import Accelerator

    from calm.training.progress import ProgressUi


def lora_spec(config: TrainConfig) -> lora.LoraSpec:
    layers = None
    if config.lora_layers:
        first, _, last = config.lora_layers.partition("-")
        layers = tuple(range(int(first), int(last or first) + 1))
    return lora.LoraSpec(rank=config.lora_rank, alpha=2.0 * config.lora_rank, layers=layers)


class Trainable(nn.Module):
    """The trained tensors only (LoRA matrices and exit heads), under stable names, for the state file."""

    def __init__(self, peft_model: nn.Module, heads: ExitHeads):
        super().__init__()
        named = [(f"lora.{n}", p) for n, p in peft_model.named_parameters() if p.requires_grad]
        named += [(f"heads.{n}", p) for n, p in heads.named_parameters() if p.requires_grad]
        for name, p in named:
            self.register_parameter(name.replace(".", "__"), p)


def initial_heads(model_ref: str, num_layers: int, hidden: int, config: TrainConfig) -> ExitHeads:
    """Exit heads to start from: the model reference's own (a checkpoint, or an alias's shipped ones)
    when they fit, else fresh ones."""
    from calm.checkpoints.checkpoint import default_checkpoint

    source = Path(model_ref) if is_checkpoint(model_ref) else default_checkpoint(model_ref)
    fresh = HeadsConfig(num_layers=num_layers, hidden_size=hidden, rank=config.rank, min_layer=config.min_exit_layer)
    if source is not None:
        stored = read_config(source).heads
        if stored is not None and stored.rank == config.rank:
            heads = load_heads(source, stored, num_layers, hidden)
            fresh_heads = ExitHeads(fresh)
            fresh_heads.load_state_dict(heads.state_dict())
            return fresh_heads
    return ExitHeads(fresh)


def sample_layers(config: TrainConfig, num_layers: int, step: int) -> list[int]:
    """The exit layers trained at `step`: a seeded subset of min_exit_layer..L-1 (LayerSkip's rotation)."""
    first = min(config.min_exit_layer, num_layers - 1)
    candidates = torch.arange(first, num_layers)
    k = min(config.layers_per_step, candidates.numel())
    order = torch.randperm(candidates.numel(), generator=generator(config.seed, "lora-layers", step))
    return sorted(candidates[order[:k]].tolist())


@dataclass(frozen=True)
class LoraStep:
    """Mode lora: a batch of sequences from the sampler, a seeded subset of exit layers."""

    config: TrainConfig
    accelerator: Accelerator
    objective: LoraObjective
    sequences: Sequence[TrainSequence]
    sampler: EpochSampler
    counts: torch.Tensor  # [2, L-1] float64: decayed positive / all label counts per layer

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        indices = self.sampler.indices(step, self.config.batch_size).tolist()
        batch = make_batch([self.sequences[i] for i in indices], self.accelerator.device)
        layers = sample_layers(self.config, self.objective.adapter.num_layers, step)
        with self.accelerator.autocast():
            out = self.objective(batch, layers, self.objective.teacher(batch))
            return lora_loss(self.config, out, layers, self.counts)


def build_lora(
    config: TrainConfig,
    accelerator: Accelerator,
    loaded: Loaded,
    sequences: Sequences,
    progress: ProgressUi | None = None,
) -> Run:
    """Fresh LoRA adapters on the plain backbone and the reference's exit heads; the checkpoint names
    the backbone and holds the adapter."""
    a = loaded.calm.adapter
    heads = initial_heads(config.model, a.num_layers, a.hidden_size, config).to(accelerator.device)
    peft_model: Any = lora.attach(loaded.calm.model, lora_spec(config), a.num_layers)
    objective = LoraObjective(peft_model, heads, loaded.normed_last)
    trainable = Trainable(peft_model, heads)
    params = [p for p in trainable.parameters() if p.requires_grad]
    counts = torch.zeros(2, a.num_layers - 1, dtype=torch.float64)
    peft_model.train()
    sampler = EpochSampler(len(sequences.all), config.seed)
    step = LoraStep(config, accelerator, objective, sequences.all, sampler, counts)
    ref = name_backbone(loaded.load_ref, config.out)
    return Run(
        step=step,
        optimizer=adamw(params, config),
        params=params,
        trained=trainable,
        counts={"counts": counts},
        heads=heads,
        backbone=ref,
        save_backbone=partial(lora.save_adapter, peft_model, base_ref=ref),
    )
