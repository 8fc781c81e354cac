"""The greedy next token without reading the whole float32 LM head.

On a CPU the LM head (49152 x 576 floats for SmolLM2, 113 MB) costs as much as ten decoder
layers, and it is paid for every token however early the token exits. For greedy decoding only
the argmax is needed, so `CertifiedArgmax` scores the vocabulary with a bfloat16 copy of the head
(half the bytes), bounds each score's rounding error, and recomputes in float32 only the few
tokens whose bound reaches the best guaranteed score. The result is the float32 argmax: a token
is skipped only when its exact logit is provably below another's.

A native head (calm.engine.quantized.QuantizedLinear) is scored the same way: its int4 kernel rounds the
activations, the block scales and its output to bfloat16 (at most 2^-8 + 2^-9 of sum |w x| in all, under
REL_ERROR), and the candidates are recomputed in float32 on their dequantised rows, the float32 weights
themselves: the argmax is the float32 model's for the same final state.

Several rows at once (a verification's drafted slots, a batch) are scored with the float32 head itself where
it runs packed (calm.engine.kernels): on a CPU without native bfloat16 arithmetic oneDNN's bfloat16 matmul is
compute-bound and costs about the rows times one row's (SmolLM2 on an AVX-512 Xeon: 13.2 ms for 4 rows against
8.7 ms in float32), while the packed float32 head costs about the same for 1 to 8 rows. Its bound is float32
accumulation's, so the candidates are as few as ever and the recomputed argmax is the same as one row's.
That bound is tight enough that each row's best score nearly always clears its second by more than twice the
widest bound; then the best is the only candidate, and it is returned without the candidates' bookkeeping.
"""

from __future__ import annotations

import torch

from calm.engine.kernels import linear, packing
from calm.engine.quantized import QuantizedLinear

# |exact - approx| <= REL_ERROR * sum_i |w_i x_i| <= REL_ERROR * |w| |x|: bfloat16 rounding of w and
# of x (2^-8 each, relative), their product, and float32 accumulation over <= 8192 terms, with margin.
REL_ERROR = 0.0125


FLOAT32_MIN_ROWS = 2  # rows from which a packed float32 head scores faster than the bfloat16 copy
NORM_CHUNK = 4096  # rows of a native head dequantised at a time for its row norms


class CertifiedArgmax:
    def __init__(self, weight: torch.Tensor | None, native: QuantizedLinear | None = None):
        """weight: the LM head [V, D] (float32), or native: a QuantizedLinear head; without bias."""
        self.weight = weight
        self.native = native
        if native is not None:
            chunks = range(0, native.out_features, NORM_CHUNK)
            rows = [torch.arange(i, min(i + NORM_CHUNK, native.out_features)) for i in chunks]
            self.row_norms = torch.cat([native.dequantize_rows(r).norm(dim=1) for r in rows])  # [V]
        else:
            assert weight is not None
            self.low = weight.detach().to(torch.bfloat16)  # [V, D]
            self.row_norms = weight.detach().float().norm(dim=1)  # [V]
        self.max_norm = float(self.row_norms.max())

    @classmethod
    def for_head(cls, head: torch.nn.Module) -> CertifiedArgmax | None:
        """One for a float32 nn.Linear or a native head without bias; None where it would not pay off."""
        if isinstance(head, QuantizedLinear) and head.bias is None:
            return cls(None, native=head)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
            return None
        return cls(head.weight)

    def _approx(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Scores [R, V] of x [R, D] and their error relative to |w| |x|."""
        if self.native is not None:
            return self.native.int4(x), REL_ERROR
        if self.weight is not None and x.shape[0] >= FLOAT32_MIN_ROWS and packing():
            return linear(x, self.weight), float32_error(x.shape[1])
        return linear(x.to(torch.bfloat16), self.low).float(), REL_ERROR

    def _rows(self, cols: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.dequantize_rows(cols)
        assert self.weight is not None
        return self.weight.index_select(0, cols)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D]: the LM head's input (after the final norm) -> argmax of x @ weight.T, [R]."""
        x = x.float()
        approx, rel_error = self._approx(x)  # [R, V]
        if rel_error < REL_ERROR and approx.shape[1] > 1:  # float32 scores: the best is nearly always clear
            top = approx.topk(2, dim=1)  # [R, 2]
            widest = rel_error * x.norm(dim=1) * self.max_norm  # [R]: no token's bound is wider
            if bool((top.values[:, 0] - top.values[:, 1] > 2 * widest).all()):  # one host sync
                return top.indices[:, 0]  # each row's best scores clear of every other token's: no candidate else
        bound = rel_error * x.norm(dim=1, keepdim=True) * self.row_norms  # [R, V]
        best_floor = (approx - bound).amax(dim=1, keepdim=True)  # [R, 1]
        rows, cols = (approx + bound >= best_floor).nonzero(as_tuple=True)  # candidates
        exact = (self._rows(cols) * x.index_select(0, rows)).sum(-1)  # [C]
        scores = torch.full_like(approx, float("-inf"))
        scores[rows, cols] = exact
        return scores.argmax(dim=1)


def float32_error(terms: int) -> float:
    """A bound on float32 accumulation's error over `terms` products, relative to sum |w x|: terms * 2^-24
    (the classic gamma_n, to first order), doubled for margin."""
    return 2 * terms * 2.0**-24
