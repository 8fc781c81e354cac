"""Exit heads: what turns an intermediate hidden state into a token, and a cheap exit classifier.

Per exit layer k (1..L-1):
- a low-rank residual map  h -> h + (h A_k) B_k  in front of the model's own final norm and
  LM head (B_k starts at zero, so an untrained head is the plain shared LM head);
- a linear classifier on the RMS-normalised hidden state, p_k(exit) = sigmoid(w_k · ĥ + b_k).
  It costs D multiply-adds per row, far below one layer, and needs no vocabulary softmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadsConfig:
    num_layers: int  # L of the backbone; heads exist for layers 1..L-1
    hidden_size: int
    rank: int = 32
    transform: bool = True
    classifier: bool = True
    min_layer: int = 1  # heads below this layer are untrained: identity map, never confident

    def to_dict(self) -> dict:
        return asdict(self)


class ExitHeads(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        n, d, r = config.num_layers - 1, config.hidden_size, config.rank
        self.down = nn.Parameter(torch.randn(n, d, r) * d**-0.5)  # A_k  [L-1, D, r]
        self.up = nn.Parameter(torch.zeros(n, r, d))  # B_k  [L-1, r, D]
        self.cls_weight = nn.Parameter(torch.zeros(n, d))  # w_k  [L-1, D]
        self.cls_bias = nn.Parameter(torch.zeros(n))  # b_k  [L-1]

    def transform(self, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """h [R, D] from exit layers [R] (1..L; L passes through) -> adapted h [R, D]."""
        if not self.config.transform:
            return h
        early = layers < self.config.num_layers
        idx = (layers - 1).clamp(max=self.config.num_layers - 2)
        a = self.down.index_select(0, idx).to(h.dtype)  # [R, D, r]
        b = self.up.index_select(0, idx).to(h.dtype)  # [R, r, D]
        delta = torch.bmm(torch.bmm(h[:, None], a), b)[:, 0]  # [R, D]
        return torch.where(early[:, None], h + delta, h)

    def classify(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Exit probability [R] (float32) of hidden states h [R, D] at exit layer `layer`."""
        if layer < self.config.min_layer:
            return torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        return torch.sigmoid(self.classifier_logit(h, layer))

    def classifier_logit(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h @ self.cls_weight[layer - 1].float() + self.cls_bias[layer - 1].float()
