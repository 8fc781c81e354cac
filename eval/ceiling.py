"""How far early exit can go with a checkpoint's exit heads: exit decisions replayed offline.

On the full model's own greedy summaries (teacher-forced), for every position and exit layer k:
whether layer k's exit head gives the final layer's argmax (agreement), and the confidence each
measure gives there (the exit classifier's probability; the softmax margin of the head's
distribution). From those:

- the oracle: every position exits at its first agreeing layer, a perfect and free exit decision;
- per measure and threshold: the layers used and the token error rate when each position exits at
  the first allowed layer whose confidence reaches the threshold.

The replay is first order: later positions see the full model's states, not propagated ones, and
one wrong token does not change what follows. It is therefore optimistic for every measure, and the
oracle is a lower bound on the average layers that any confidence measure can reach without token
errors using these heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from calm.adapters.base import Adapter
from calm.exits.confidence import softmax_margin
from calm.exits.heads import ExitHeads

if TYPE_CHECKING:
    from calm.training import Features

MEASURES = ("classifier", "softmax")


@dataclass(frozen=True)
class ExitReplay:
    agree: torch.Tensor  # [P, L-1] bool: layer k's exit-head argmax == final argmax
    scores: dict[str, torch.Tensor]  # measure -> [P, L-1] float32 confidence at layer k
    num_layers: int  # L
    min_exit_layer: int  # the heads' lowest trained layer: no exit below it

    @property
    def positions(self) -> int:
        return self.agree.shape[0]


@dataclass(frozen=True)
class ReplayPoint:
    measure: str
    threshold: float
    avg_layers: float
    token_error: float  # fraction of positions whose exit token differs from the final one
    exit_rate: float  # fraction of positions leaving before the last layer

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def replay_exits(adapter: Adapter, heads: ExitHeads, features: Features, chunk: int = 256) -> ExitReplay:
    """Agreement and confidences at every position and exit layer of `features`."""
    P, L1, _ = features.exits.shape
    agree = torch.zeros(P, L1, dtype=torch.bool)
    scores = {m: torch.zeros(P, L1) for m in MEASURES}
    for start in range(0, P, chunk):
        rows = slice(start, start + chunk)
        final_top = adapter.lm_head(features.final[rows].to(adapter.dtype)).argmax(-1).cpu()  # [c]
        for k in range(1, L1 + 1):
            h = features.exits[rows, k - 1].to(adapter.dtype)  # [c, D]
            layers = torch.full((h.shape[0],), k, dtype=torch.long, device=h.device)
            logits = adapter.lm_head(adapter.final_norm(heads.transform(h, layers)))  # [c, V]
            agree[rows, k - 1] = logits.argmax(-1).cpu() == final_top
            scores["softmax"][rows, k - 1] = softmax_margin(logits).cpu()
            scores["classifier"][rows, k - 1] = heads.classify(h, k).cpu()
    return ExitReplay(agree, scores, L1 + 1, max(1, heads.config.min_layer))


def first_exit(allowed: torch.Tensor, min_exit_layer: int, num_layers: int) -> torch.Tensor:
    """allowed [P, L-1] bool (exit possible after layer k) -> exit layer [P] in min_exit_layer..L."""
    allowed = allowed.clone()
    allowed[:, : min_exit_layer - 1] = False
    first = allowed.float().argmax(1) + 1  # [P]
    return torch.where(allowed.any(1), first, torch.full_like(first, num_layers))


def oracle_layers(replay: ExitReplay) -> float:
    """Average layers when every position exits at its first agreeing layer (no token errors)."""
    return float(first_exit(replay.agree, replay.min_exit_layer, replay.num_layers).float().mean())


def replay_point(replay: ExitReplay, measure: str, threshold: float) -> ReplayPoint:
    layers = first_exit(replay.scores[measure] >= threshold, replay.min_exit_layer, replay.num_layers)
    early = layers < replay.num_layers
    rows = early.nonzero()[:, 0]
    wrong = ~replay.agree[rows, layers[rows] - 1]
    P = replay.positions
    return ReplayPoint(
        measure, float(threshold), float(layers.float().mean()), float(wrong.sum()) / P, float(early.float().mean())
    )


def sweep(replay: ExitReplay, measure: str, thresholds: Sequence[float]) -> list[ReplayPoint]:
    return [replay_point(replay, measure, t) for t in thresholds]


def fewest_layers(points: Sequence[ReplayPoint], max_token_error: float) -> ReplayPoint | None:
    """The point with the fewest average layers among those within the token error bound."""
    within = [p for p in points if p.token_error <= max_token_error]
    return min(within, key=lambda p: p.avg_layers) if within else None
