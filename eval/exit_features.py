"""Can a richer exit decision get closer to the oracle? Exit features replayed offline.

For every position of the model's own greedy summaries and every exit layer k, the replay of
`calm.eval.ceiling` knows whether layer k's exit head agrees with the final layer. Here each
(position, layer) also gets the features a richer exit classifier could read:

- cheap (no vocabulary): the trained classifier's logit, the cosine between layer k's and layer
  k-1's states, and k itself;
- from the exit head's distribution (a full-vocabulary head at every check, the costly part):
  top-1 probability, top-1 minus top-2 margin, entropy, and whether layers k-1 and k-2 gave the
  same argmax as layer k (consecutive-layer agreement).

`fit_exit_model` trains a logistic regression on these features from one split's replay and
`score_exit_model` scores another's, so a feature set can be swept like any measure with
`calm.eval.ceiling.sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm.adapters.base import Adapter
from calm.exits.heads import ExitHeads
from calm.training.features import Features

CHEAP = ("classifier_logit", "state_cosine", "layer")
HEAD = ("max_prob", "margin", "entropy", "agree_prev", "agree_prev2")
ALL = CHEAP + HEAD


@dataclass(frozen=True)
class ExitFeatures:
    values: torch.Tensor  # [P, L-1, F] float32, F = len(ALL)
    agree: torch.Tensor  # [P, L-1] bool: layer k's exit-head argmax == final argmax
    num_layers: int
    min_exit_layer: int

    def select(self, names: tuple[str, ...]) -> torch.Tensor:
        return self.values[..., [ALL.index(n) for n in names]]


@torch.no_grad()
def exit_features(adapter: Adapter, heads: ExitHeads, features: Features, chunk: int = 256) -> ExitFeatures:
    """Every feature of ALL at every position and exit layer of `features`."""
    P, L1, _ = features.exits.shape
    values = torch.zeros(P, L1, len(ALL))
    agree = torch.zeros(P, L1, dtype=torch.bool)
    for start in range(0, P, chunk):
        rows = slice(start, start + chunk)
        values[rows], agree[rows] = _chunk_features(adapter, heads, features.exits[rows], features.final[rows])
    return ExitFeatures(values, agree, L1 + 1, max(1, heads.config.min_layer))


def _chunk_features(
    adapter: Adapter, heads: ExitHeads, exits: torch.Tensor, final: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exits [c, L-1, D], final [c, D] -> features [c, L-1, F], agreement [c, L-1]."""
    c, L1, _ = exits.shape
    final_top = adapter.lm_head(final.to(adapter.dtype)).argmax(-1)  # [c]
    out = torch.zeros(c, L1, len(ALL))
    tops = torch.zeros(c, L1, dtype=torch.long)
    for k in range(1, L1 + 1):
        h = exits[:, k - 1].to(adapter.dtype)  # [c, D]
        layers = torch.full((c,), k, dtype=torch.long)
        logp = adapter.lm_head(adapter.final_norm(heads.transform(h, layers))).float().log_softmax(-1)  # [c, V]
        top2 = logp.topk(2, dim=-1)
        p1, p2 = top2.values[:, 0].exp(), top2.values[:, 1].exp()
        tops[:, k - 1] = top2.indices[:, 0]
        prev = exits[:, k - 2] if k > 1 else h
        out[:, k - 1, ALL.index("classifier_logit")] = heads.classifier_logit(h, k)
        out[:, k - 1, ALL.index("state_cosine")] = F.cosine_similarity(h.float(), prev.float(), dim=-1)
        out[:, k - 1, ALL.index("layer")] = k / (L1 + 1)
        out[:, k - 1, ALL.index("max_prob")] = p1
        out[:, k - 1, ALL.index("margin")] = p1 - p2
        out[:, k - 1, ALL.index("entropy")] = -(logp.exp() * logp).sum(-1)
    same_prev = torch.zeros(c, L1, dtype=torch.bool)
    same_prev[:, 1:] = tops[:, 1:] == tops[:, :-1]
    out[..., ALL.index("agree_prev")] = same_prev.float()
    out[:, 2:, ALL.index("agree_prev2")] = (same_prev[:, 2:] & same_prev[:, 1:-1]).float()
    return out, tops == final_top[:, None]


@dataclass(frozen=True)
class ExitModel:
    """A logistic regression over named features, standardised on the data it was fitted to."""

    names: tuple[str, ...]
    mean: torch.Tensor  # [F]
    std: torch.Tensor  # [F]
    weight: torch.Tensor  # [F]
    bias: float


def _trainable(f: ExitFeatures, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x = f.select(names)[:, f.min_exit_layer - 1 :].reshape(-1, len(names))  # [N, F]
    y = f.agree[:, f.min_exit_layer - 1 :].reshape(-1).float()  # [N]
    return x, y


def fit_exit_model(f: ExitFeatures, names: tuple[str, ...], steps: int = 300, l2: float = 1e-4) -> ExitModel:
    """Logistic regression of agreement on the features `names`, over the layers exits may use."""
    x, y = _trainable(f, names)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(len(names), requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ExitModel(names, mean, std, w.detach(), float(b.detach()))


def score_exit_model(model: ExitModel, f: ExitFeatures) -> torch.Tensor:
    """Exit probability [P, L-1] of the model at every position and layer of `f`."""
    z = (f.select(model.names) - model.mean) / model.std
    return torch.sigmoid(z @ model.weight + model.bias)
