"""The greedy next token without reading the whole float32 LM head.

On a CPU the LM head (49152 x 576 floats for SmolLM2, 113 MB) costs as much as ten decoder
layers, and it is paid for every token however early the token exits. For greedy decoding only
the argmax is needed, so `CertifiedArgmax` scores the vocabulary with a bfloat16 copy of the head
(half the bytes), bounds each score's rounding error, and recomputes in float32 only the few
tokens whose bound reaches the best guaranteed score. The result is the float32 argmax: a token
is skipped only when its exact logit is provably below another's.
"""

from __future__ import annotations

import torch

from calm.engine.kernels import linear

# |exact - approx| <= REL_ERROR * sum_i |w_i x_i| <= REL_ERROR * |w| |x|: bfloat16 rounding of w and
# of x (2^-8 each, relative), their product, and float32 accumulation over <= 8192 terms, with margin.
REL_ERROR = 0.0125


class CertifiedArgmax:
    def __init__(self, weight: torch.Tensor):
        """weight: the LM head [V, D] (float32); the head must be a plain linear map without bias."""
        self.weight = weight
        self.low = weight.detach().to(torch.bfloat16)  # [V, D]
        self.row_norms = weight.detach().float().norm(dim=1)  # [V]

    @classmethod
    def for_head(cls, head: torch.nn.Module) -> CertifiedArgmax | None:
        """One for a float32 nn.Linear head without bias; None where it would not pay off."""
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
            return None
        return cls(head.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D]: the LM head's input (after the final norm) -> argmax of x @ weight.T, [R]."""
        x = x.float()
        approx = linear(x.to(torch.bfloat16), self.low).float()  # [R, V]
        bound = REL_ERROR * x.norm(dim=1, keepdim=True) * self.row_norms  # [R, V]
        best_floor = (approx - bound).amax(dim=1, keepdim=True)  # [R, 1]
        rows, cols = (approx + bound >= best_floor).nonzero(as_tuple=True)  # candidates
        exact = (self.weight.index_select(0, cols) * x.index_select(0, rows)).sum(-1)  # [C]
        scores = torch.full_like(approx, float("-inf"))
        scores[rows, cols] = exact
        return scores.argmax(dim=1)
