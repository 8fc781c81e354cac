"""What each mode trains and how one of its steps runs: the mode builds a `Run` from the loaded
backbone and the sequences, and the loop (calm.training.loop) runs it. Modes heads and finetune
are here; lora, which wires in peft, is in calm.training.lora."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from calm.checkpoints.checkpoint import BACKBONE_DIR, name_backbone, save_backbone
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.training.config import TrainConfig
from calm.training.data import Sequences, TrainSequence
from calm.training.features import Features, hidden_features
from calm.training.objectives import (
    COUNT_DECAY,
    FinetuneObjective,
    HeadsObjective,
    balance_weights,
    heads_loss,
    label_counts,
    layer_weights,
    make_batch,
)
from calm.training.order import EpochSampler, generator, local_count

if TYPE_CHECKING:
    from accelerate import Accelerator

    from calm.model import CalmModel
    from calm.training.progress import ProgressUi

Step = Callable[[int], "tuple[torch.Tensor, dict[str, float]]"]  # step index -> loss, metrics


@dataclass(frozen=True)
class Loaded:
    calm: CalmModel  # the frozen backbone (its model, tokenizer and adapter)
    load_ref: str  # what load_backbone was given
    normed_last: bool  # whether the last hidden state is already normed (last_state_is_normed)


@dataclass(frozen=True)
class Run:
    """What the step loop needs, built once by the mode. The loop only reads it; the tensors change."""

    step: Step  # the loss (and its metrics) of step i, not yet backpropagated
    optimizer: Any  # a torch optimizer, or accelerate's wrapper of it
    params: Sequence[nn.Parameter]  # the trained parameters, for the gradient clip
    trained: nn.Module  # the module whose state_dict the training state holds
    counts: dict[str, torch.Tensor]  # decayed label counts: extra.<name> in the state, updated in place
    heads: ExitHeads | None  # the exit heads written to the checkpoint
    backbone: str  # the backbone as the checkpoint names it
    save_backbone: Callable[[Path], None] | None  # writes the tuned backbone (or its LoRA adapter) into the checkpoint


def adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8, foreach=False
    )


@dataclass(frozen=True)
class HeadsStep:
    """Mode heads: positions from the sampler, a seeded choice of layers_per_step exit layers for each."""

    config: TrainConfig
    accelerator: Accelerator
    objective: nn.Module  # HeadsObjective, prepared
    features: Features
    sampler: EpochSampler
    count: int  # positions per step in this process
    counts: dict[str, torch.Tensor]  # pos_count, all_count [L-1] float64

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        exits, final = self.features.exits, self.features.final
        L1 = exits.shape[1]  # L - 1 exit layers
        first = min(self.config.min_exit_layer, L1)
        k = min(self.config.layers_per_step, L1 - first + 1)
        idx = self.sampler.indices(step, self.count)
        g = generator(self.config.seed, "layers", self.accelerator.process_index, step)
        layers = torch.rand(self.count, L1 - first + 1, generator=g).argsort(1)[:, :k] + first  # [b, k] in first..L-1
        device = exits.device
        idx_d, layers_d = idx.to(device), layers.to(device)
        h = exits[idx_d[:, None], layers_d - 1].reshape(self.count * k, -1)  # [R, D]
        row_layers = layers_d.reshape(-1)
        row_pos = torch.arange(self.count, device=device).repeat_interleave(k)
        with self.accelerator.autocast():
            kl, logit, labels = self.objective(h, row_layers, final.index_select(0, idx_d), row_pos)
        pos_weight = self._pos_weight(labels, row_layers, L1).to(device)
        return heads_loss(self.config, kl, logit, labels, row_layers, pos_weight)

    def _pos_weight(self, labels: torch.Tensor, row_layers: torch.Tensor, num_exit_layers: int) -> torch.Tensor:
        """Class balance per layer from decayed label counts (summed over processes)."""
        batch_pos, batch_all = label_counts(labels, row_layers, num_exit_layers)
        if self.accelerator.num_processes > 1:
            batch_pos, batch_all = self.accelerator.reduce(batch_pos, "sum"), self.accelerator.reduce(batch_all, "sum")
        pos_count, all_count = self.counts["pos_count"], self.counts["all_count"]
        pos_count.mul_(COUNT_DECAY).add_(batch_pos.cpu())
        all_count.mul_(COUNT_DECAY).add_(batch_all.cpu())
        return balance_weights(pos_count, all_count)


@dataclass(frozen=True)
class FinetuneStep:
    """Mode finetune: a batch of sequences from the sampler, the layer-weighted LM loss."""

    accelerator: Accelerator
    objective: nn.Module  # FinetuneObjective, prepared
    sequences: Sequence[TrainSequence]
    sampler: EpochSampler
    count: int  # sequences per step in this process
    weights: torch.Tensor  # [L] layer_weights

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = make_batch(
            [self.sequences[i] for i in self.sampler.indices(step, self.count).tolist()], self.weights.device
        )
        with self.accelerator.autocast():
            per_layer = self.objective(batch.ids, batch.mask, batch.rows, batch.cols, batch.targets)  # [L]
        loss = (per_layer * self.weights).sum()
        return loss, {"loss": loss.item(), "first": per_layer[0].item(), "last": per_layer[-1].item()}


def _label_counts(num_layers: int) -> dict[str, torch.Tensor]:
    """Decayed per-layer label counts of the classifier (mode finetune has none and keeps them at zero)."""
    return {
        "pos_count": torch.zeros(num_layers - 1, dtype=torch.float64),
        "all_count": torch.zeros(num_layers - 1, dtype=torch.float64),
    }


def build_heads(
    config: TrainConfig, accelerator: Accelerator, loaded: Loaded, sequences: Sequences, progress: ProgressUi | None
) -> Run:
    """Fresh exit heads on the frozen backbone's hidden states, computed once here."""
    a, device = loaded.calm.adapter, accelerator.device
    heads = ExitHeads(
        HeadsConfig(
            num_layers=a.num_layers,
            hidden_size=a.hidden_size,
            rank=config.rank,
            transform=config.transform,
            classifier=config.classifier,
            min_layer=config.min_exit_layer,
        )
    ).to(device)
    for part, trains in (
        (heads.down, config.transform),
        (heads.up, config.transform),
        (heads.cls_weight, config.classifier),
        (heads.cls_bias, config.classifier),
    ):
        part.requires_grad_(trains)
    features = hidden_features(loaded.calm.model, a, sequences.local, device, loaded.normed_last, progress)
    params = [p for p in heads.parameters() if p.requires_grad]
    objective, optimizer = accelerator.prepare(HeadsObjective(heads, a), adamw(params, config))
    rank, world = accelerator.process_index, accelerator.num_processes
    counts = _label_counts(a.num_layers)
    step = HeadsStep(
        config,
        accelerator,
        objective,
        features,
        EpochSampler(features.final.shape[0], config.seed, rank),
        local_count(config.batch_size, rank, world),
        counts,
    )
    return Run(
        step=step,
        optimizer=optimizer,
        params=params,
        trained=heads,
        counts=counts,
        heads=heads,
        backbone=name_backbone(loaded.load_ref, config.out),
        save_backbone=None,
    )


def build_finetune(
    config: TrainConfig, accelerator: Accelerator, loaded: Loaded, sequences: Sequences, progress: ProgressUi | None
) -> Run:
    """The whole backbone trains; the checkpoint includes it."""
    model, a = loaded.calm.model, loaded.calm.adapter
    model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    objective, optimizer = accelerator.prepare(FinetuneObjective(model, a, loaded.normed_last), adamw(params, config))
    rank, world = accelerator.process_index, accelerator.num_processes
    step = FinetuneStep(
        accelerator,
        objective,
        sequences.local,
        EpochSampler(len(sequences.local), config.seed, rank),
        local_count(config.batch_size, rank, world),
        layer_weights(a.num_layers).to(accelerator.device),
    )
    tokenizer = loaded.calm.tokenizer
    return Run(
        step=step,
        optimizer=optimizer,
        params=params,
        trained=model,
        counts=_label_counts(a.num_layers),
        heads=None,
        backbone=BACKBONE_DIR,
        save_backbone=lambda out: save_backbone(model, tokenizer, out / BACKBONE_DIR),
    )
