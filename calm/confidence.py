"""Confidence measures for the exit decision, all computed in float32.

softmax: top-1 minus top-2 probability of the exit layer's next-token distribution (needs the
    LM head: the costly measure, as the CALM paper notes; its logits are reused for the token).
state: cosine similarity between a layer's output and its input (cheap: no vocabulary).
classifier: the learned exit classifier of calm.heads (cheap: one dot product per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> p(top-1) - p(top-2) [R]."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def state_similarity(h_out: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """h_out, h_in [R, D] -> cosine similarity [R]."""
    return F.cosine_similarity(h_out.float(), h_in.float(), dim=-1)
