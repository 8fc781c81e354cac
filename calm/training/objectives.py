"""What each mode minimises: the objectives (nn.Modules, so that accelerate/DDP sees the forward)
and the losses built from their outputs.

- heads: KL(final layer || layer k through its exit head) on cached hidden states, and the exit
  classifier's class-balanced BCE against the oracle label "layer k's argmax is the final one's";
- finetune: CALM's average of every layer's LM loss, weighted w_k = k / sum_j j;
- lora: KL of sampled exit layers and of the adapted final layer (the anchor) to the original
  model, which is the same network with peft's adapters disabled, and the classifier's BCE.

The classifier's positive rate per layer is tracked with decayed label counts, and sets that
layer's pos_weight = negatives / positives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calm.adapters import adapter_for
from calm.adapters.base import Adapter
from calm.exits.heads import ExitHeads
from calm.training.config import TrainConfig
from calm.training.data import TrainSequence
from calm.training.features import forward_hidden

COUNT_DECAY = 0.99  # decay of the per-layer label counts behind the classifier's pos_weight
ANCHOR_NAME = "anchor"


def classifier_logits(heads: ExitHeads, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    """ExitHeads.classifier_logit for rows of different layers: h [R, D], layers [R] (1..L-1)."""
    h = h.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    idx = layers - 1
    return (h * heads.cls_weight.index_select(0, idx).float()).sum(-1) + heads.cls_bias.index_select(0, idx).float()


def balance_weights(positives: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The classifier's pos_weight per layer from (decayed) label counts: negatives / positives."""
    return ((total - positives + 1) / (positives + 1)).clamp(0.01, 100.0).float()


# ---- heads ----------------------------------------------------------------------------------------


class HeadsObjective(nn.Module):
    """Self-distillation of the exit heads against the frozen backbone's final layer."""

    def __init__(self, heads: ExitHeads, adapter: Adapter):
        super().__init__()
        self.heads = heads
        self.adapter = adapter  # a plain object: the backbone is not a submodule, so not trained

    def forward(
        self, h: torch.Tensor, layers: torch.Tensor, final: torch.Tensor, row_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [R, D] exit states at layers [R]; final [B, D] normed final states; row_pos [R] -> index into B.
        Returns per row: KL(final || layer) [R], classifier logit [R], oracle label [R] (float)."""
        a = self.adapter
        with torch.no_grad():
            teacher = a.lm_head(final.to(a.dtype)).float().log_softmax(-1)  # [B, V]
            teacher_top = teacher.argmax(-1)
        h = h.to(a.dtype)
        student = a.lm_head(a.final_norm(self.heads.transform(h, layers))).float().log_softmax(-1)  # [R, V]
        t = teacher.index_select(0, row_pos)
        kl = F.kl_div(student, t, reduction="none", log_target=True).sum(-1)
        labels = (student.detach().argmax(-1) == teacher_top.index_select(0, row_pos)).float()
        logit = classifier_logits(self.heads, h.detach(), layers)
        return kl, logit, labels


def label_counts(
    labels: torch.Tensor, row_layers: torch.Tensor, num_exit_layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and all labels per exit layer [L-1] (float64) of rows at layers row_layers [R] (1..L-1)."""
    device = labels.device
    positives = torch.zeros(num_exit_layers, dtype=torch.float64, device=device).index_add_(
        0, row_layers - 1, labels.double()
    )
    total = torch.zeros(num_exit_layers, dtype=torch.float64, device=device).index_add_(
        0, row_layers - 1, torch.ones_like(labels, dtype=torch.float64)
    )
    return positives, total


def heads_loss(
    config: TrainConfig,
    kl: torch.Tensor,
    logit: torch.Tensor,
    labels: torch.Tensor,
    row_layers: torch.Tensor,
    pos_weight: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean KL (with a transform) plus the class-balanced BCE (with a classifier), and the metrics."""
    loss = torch.zeros((), device=kl.device)
    metrics = {"agree": labels.mean().item()}
    if config.transform:
        loss = loss + kl.mean()
        metrics["kl"] = kl.mean().item()
    if config.classifier:
        bce = F.binary_cross_entropy_with_logits(logit, labels, pos_weight=pos_weight[row_layers - 1])
        loss = loss + bce
        metrics["bce"] = bce.item()
        metrics["cls_acc"] = ((logit > 0).float() == labels).float().mean().item()
    return loss, metrics


# ---- finetune -------------------------------------------------------------------------------------


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

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Per-layer mean cross-entropy [L] at the positions (rows, cols) of the batch."""
        a = self.adapter
        hs = forward_hidden(self.model, ids, mask).hidden_states
        losses = []
        for k in range(1, a.num_layers + 1):
            h = hs[k][rows, cols]
            if k < a.num_layers or not self.normed_last:
                h = a.final_norm(h)
            losses.append(F.cross_entropy(a.lm_head(h).float(), targets))
        return torch.stack(losses)


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # [B, T] long, right-padded
    mask: torch.Tensor  # [B, T] long
    rows: torch.Tensor  # [P] long: loss positions (rows, cols)
    cols: torch.Tensor  # [P] long
    targets: torch.Tensor  # [P] long: the next token at each loss position


def make_batch(sequences: Sequence[TrainSequence], device: torch.device | str) -> Batch:
    width = max(len(s.ids) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for r, s in enumerate(sequences):
        ids[r, : len(s.ids)] = torch.tensor(s.ids)
        mask[r, : len(s.ids)] = 1
        rows += [r] * len(s.positions)
        cols += list(s.positions)
        targets += list(s.targets)
    return Batch(
        ids.to(device),
        mask.to(device),
        torch.tensor(rows, device=device),
        torch.tensor(cols, device=device),
        torch.tensor(targets, device=device),
    )


# ---- lora -----------------------------------------------------------------------------------------


class LoraObjective(nn.Module):
    """KL of sampled exit layers and of the final layer to the original model, and the classifier."""

    def __init__(self, peft_model: Any, heads: ExitHeads, normed_last: bool):
        super().__init__()
        self.model = peft_model  # a peft.PeftModel
        self.heads = heads
        self.adapter = adapter_for(peft_model.get_base_model())
        self.normed_last = normed_last

    def _log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h [P, D] after `layer` layers -> log-probabilities [P, V] through the exit head."""
        a = self.adapter
        if layer < a.num_layers:
            h = a.final_norm(self.heads.transform(h, torch.full((h.shape[0],), layer, device=h.device)))
        elif not self.normed_last:
            h = a.final_norm(h)
        return a.lm_head(h).float().log_softmax(-1)

    def teacher(self, batch: Batch) -> torch.Tensor:
        """The original model's final-layer log-probabilities at the loss positions [P, V]."""
        with torch.no_grad(), self.model.disable_adapter():
            hs = forward_hidden(self.model, batch.ids, batch.mask).hidden_states
            return self._log_probs(hs[-1][batch.rows, batch.cols], self.adapter.num_layers)

    def forward(self, batch: Batch, layers: Sequence[int], teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per sampled layer: KL [k], classifier logits and labels [k, P]; the anchor KL []."""
        hs = forward_hidden(self.model, batch.ids, batch.mask).hidden_states
        final = self._log_probs(hs[-1][batch.rows, batch.cols], self.adapter.num_layers)  # [P, V]
        final_top = final.detach().argmax(-1)
        kls, logits, labels = [], [], []
        for layer in layers:
            h = hs[layer][batch.rows, batch.cols]  # [P, D]
            student = self._log_probs(h, layer)
            kls.append(F.kl_div(student, teacher, reduction="batchmean", log_target=True))
            labels.append((student.detach().argmax(-1) == final_top).float())
            layer_ids = torch.full((h.shape[0],), layer, device=h.device)
            logits.append(classifier_logits(self.heads, h.detach(), layer_ids))
        anchor = F.kl_div(final, teacher, reduction="batchmean", log_target=True)
        return {
            "kl": torch.stack(kls),
            "logits": torch.stack(logits),
            "labels": torch.stack(labels),
            ANCHOR_NAME: anchor,
            "final_agree": (final_top == teacher.argmax(-1)).float().mean(),
        }


def lora_loss(
    config: TrainConfig, out: dict[str, torch.Tensor], layers: Sequence[int], counts: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss and its metrics. counts [2, L-1] float64: decayed positive / all label counts per layer."""
    idx = torch.tensor(layers) - 1
    weights = torch.tensor(layers, dtype=torch.float32, device=out["kl"].device)
    exit_kl = (out["kl"] * weights).sum() / weights.sum()
    labels = out["labels"]  # [k, P]
    counts.mul_(COUNT_DECAY)
    counts[0].index_add_(0, idx, labels.sum(1).double().cpu())
    counts[1].index_add_(0, idx, torch.full((len(layers),), float(labels.shape[1]), dtype=torch.float64))
    pos_weight = balance_weights(counts[0], counts[1])[idx]
    bce = F.binary_cross_entropy_with_logits(
        out["logits"], labels, pos_weight=pos_weight[:, None].to(labels.device).expand_as(labels)
    )
    loss = exit_kl + config.anchor * out[ANCHOR_NAME] + bce
    metrics = {
        "exit_kl": exit_kl.item(),
        "anchor_kl": out[ANCHOR_NAME].item(),
        "bce": bce.item(),
        "agree": labels.mean().item(),
        "final_agree": out["final_agree"].item(),
    }
    return loss, metrics
