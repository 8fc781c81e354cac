"""The greedy next token without reading the whole float32 LM head.

On a CPU the LM head (49152 x 576 floats for SmolLM2, 113 MB) costs as much as ten decoder
layers, and it is paid for every token however early the token exits. For greedy decoding only
the argmax is needed, so `CertifiedArgmax` scores the vocabulary approximately, bounds each score's
error, and recomputes in float32 only the few tokens whose bound reaches the best guaranteed score.
The result is the float32 argmax: a token is skipped only when its exact logit is provably below another's.

The approximate scores, for up to INT8_MAX_ROWS rows (a decode step, a verification's slots), come from an
int8 copy of the head: each row w requantised to codes q with one bfloat16 scale s, through torch's int8
weight-only kernel with bfloat16 activations (SmolLM2's head on an AVX-512 Xeon, kernel_costs_smollm2.md:
4.1-4.9 ms for 1-4 rows against 7.7-9.0 for the packed float32 head; a bfloat16 copy cost 7.8 for one row).
Its error is bounded per row: the requantisation's exactly (|w - s q| is stored per row: Cauchy-Schwarz against
|x|), the activations' and the output's bfloat16 rounding and float32 accumulation relative to |s q| |x|
(`int8_error`). A native head (calm.engine.quantized.QuantizedLinear) gets its int8 copy from its dequantised
rows, the float32 weights.

More rows (a batch of 8 or 16) are scored by the float32 head itself (packed where calm.engine.kernels packs
it: 13.0 ms for 16 rows against the int8 copy's 17.3), whose bound is float32 accumulation's; a native head keeps
the int8 copy (27 ms for 16 rows against its int4 kernel's 38, whose looser bound leaves more candidates), and
scores on its int4 kernel (REL_ERROR) only where torch lacks the int8 kernel. Where a row's best
score clears its second by more than twice the widest bound, the best is the only candidate and is returned
without the candidates' bookkeeping: nearly always under float32's tight bound.
"""

from __future__ import annotations

import functools

import torch

from calm.engine.kernels import _version, linear
from calm.engine.quantized import QuantizedLinear

# |exact - approx| <= REL_ERROR * sum_i |w_i x_i| <= REL_ERROR * |w| |x|: bfloat16 rounding of w and
# of x (2^-8 each, relative), their product, and float32 accumulation over <= 8192 terms, with margin.
REL_ERROR = 0.0125
INT8_MAX_ROWS = 4  # rows up to which the int8 copy scores a float32 head (kernel_costs_smollm2.md: 6.7 ms certified
# at 4 rows against 9.0 for the packed float32 head alone; at 8 rows 13.1 against 10.5)
ROW_CHUNK = 4096  # head rows normed and requantised at a time (a native head's are dequantised first)


class CertifiedArgmax:
    def __init__(self, weight: torch.Tensor | None, native: QuantizedLinear | None = None):
        """weight: the LM head [V, D] (float32), or native: a QuantizedLinear head; without bias."""
        self.weight = weight.detach() if weight is not None else None
        self.native = native
        self.shape = (native.out_features, native.in_features) if native is not None else tuple(weight.shape)  # type: ignore[union-attr]
        self.int8: Int8Rows | None = None
        self.float_widths = torch.empty(0)  # [V]: |w_v|, times the float scorers' relative error
        self._build()
        self.version = _version(self.weight) if self.weight is not None else -1  # a native head's blocks do not change

    @classmethod
    def for_head(cls, head: torch.nn.Module) -> CertifiedArgmax | None:
        """One for a float32 nn.Linear or a native head without bias; None where it would not pay off."""
        if isinstance(head, QuantizedLinear) and head.bias is None:
            return cls(None, native=head)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
            return None
        return cls(head.weight)

    def _build(self) -> None:
        """The row norms and, where the int8 kernel serves this width, the int8 copy: one pass over the head's
        rows, ROW_CHUNK at a time (a native head's dequantised once)."""
        vocab, width = self.shape
        with_int8 = int8_available(width)
        norms, parts = [], []
        for start in range(0, vocab, ROW_CHUNK):
            rows = self._rows(torch.arange(start, min(start + ROW_CHUNK, vocab)))  # [C, D] float32
            norms.append(rows.norm(dim=1))
            parts += [_requantise(rows)] if with_int8 else []
        self.float_widths = torch.cat(norms)
        self.int8 = Int8Rows(*(torch.cat(p) for p in zip(*parts))) if with_int8 else None

    def _refresh(self) -> None:
        """Rebuild the int8 copy and the row norms after the float32 head changed in place (its version moved)."""
        version = _version(self.weight) if self.weight is not None else -1
        if version != self.version:
            self.version = version
            self._build()

    def _approx(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Scores [R, V] of x [R, D], each token's bound per unit |x| [V], and whether that bound is float32's
        (tight: the best score nearly always clears the rest)."""
        if self.int8 is not None and (x.shape[0] <= INT8_MAX_ROWS or self.native is not None):
            return self.int8.scores(x), self.int8.widths, False
        if self.native is not None:
            return self.native.int4(x), REL_ERROR * self.float_widths, False
        assert self.weight is not None
        return linear(x, self.weight), float32_error(x.shape[1]) * self.float_widths, True

    def _rows(self, cols: torch.Tensor) -> torch.Tensor:
        """The head's rows `cols` [C] in float32 [C, D]: the weight's, or a native head's dequantised."""
        if self.native is not None:
            return self.native.dequantize_rows(cols)
        assert self.weight is not None
        return self.weight.index_select(0, cols)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D]: the LM head's input (after the final norm) -> argmax of x @ weight.T, [R]."""
        x = x.float()
        self._refresh()
        approx, widths, tight = self._approx(x)  # [R, V], [V]
        norms = x.norm(dim=1, keepdim=True)  # [R, 1]
        if tight and approx.shape[1] > 1:
            top = approx.topk(2, dim=1)  # [R, 2]
            widest = norms[:, 0] * widths.max()  # [R]: no token's bound is wider
            if bool((top.values[:, 0] - top.values[:, 1] > 2 * widest).all()):  # one host sync
                return top.indices[:, 0]  # each row's best scores clear of every other token's: no candidate else
        bound = norms * widths  # [R, V]
        best_floor = (approx - bound).amax(dim=1, keepdim=True)  # [R, 1]
        rows, cols = (approx + bound >= best_floor).nonzero(as_tuple=True)  # candidates
        exact = (self._rows(cols) * x.index_select(0, rows)).sum(-1)  # [C]
        scores = torch.full_like(approx, float("-inf"))
        scores[rows, cols] = exact
        return scores.argmax(dim=1)


class Int8Rows:
    """A head's rows as int8 codes with one bfloat16 scale each, and each row's bound per unit |x|."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, widths: torch.Tensor) -> None:
        self.codes = codes  # [V, D] int8
        self.scales = scales  # [V] bfloat16
        self.widths = widths  # [V] float32: |w - s q| + int8_error(D) |s q|

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D] float32 -> approximate logits [R, V] float32."""
        x16 = x.to(torch.bfloat16).contiguous()  # [R, D]: rows 32-byte aligned (D % 16 == 0)
        return torch.ops.aten._weight_int8pack_mm(x16, self.codes, self.scales).float()


def _requantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows w [C, D] float32 -> codes [C, D] int8, scales [C] bfloat16, widths [C]: s = max|w| / 127 in
    bfloat16, q = round(w / s). s q is exact in float32 (8 + 7 significant bits), and so is w - s q (within a
    factor of 2 of each other where q != 0, Sterbenz); the norms' float32 rounding is covered by `margin`."""
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)  # [C]
    s = scales.float()[:, None]
    codes = (w / s).round().clamp(-127, 127)  # [C, D]
    requantised = s * codes
    margin = 1 + 2 * w.shape[1] * 2.0**-24 + 1e-6
    widths = (w - requantised).norm(dim=1) * margin + int8_error(w.shape[1]) * requantised.norm(dim=1) * margin
    return codes.to(torch.int8), scales, widths * margin


def int8_error(terms: int) -> float:
    """The int8 kernel's error relative to |s q| |x|: bfloat16 rounding of the activations (2^-9) and of the
    output (2^-9 of at most (1 + 2^-9) |s q| |x|), float32 accumulation over `terms` products (doubled), margin."""
    return 2.0**-8 + 2.0**-12 + 4 * terms * 2.0**-24


def int8_available(width: int) -> bool:
    """Whether torch has the int8 kernel for rows of `width` (its x86 paths load 16 (AVX-512) or 8 (AVX2)
    activations at a time, aligned, with no tail), computing as `int8_error` assumes."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and width % 16 == 0 and _int8_products_exact()


@functools.cache
def _int8_products_exact() -> bool:
    """Probe: the kernel multiplies each code by its scale in float32 (exact: 8 + 7 significant bits), not
    rounded to bfloat16 first as some builds do, which int8_error does not cover. With s = 1 + 2^-7,
    127 s - 126 s is s exactly; rounded products would give 1."""
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    x[0, :2] = torch.tensor([1.0, -1.0])
    codes = torch.zeros(1, 16, dtype=torch.int8)
    codes[0, :2] = torch.tensor([127, 126], dtype=torch.int8)
    scale = torch.tensor([1 + 2.0**-7], dtype=torch.bfloat16)
    try:
        out = torch.ops.aten._weight_int8pack_mm(x, codes, scale)
    except RuntimeError:
        return False
    return float(out[0, 0]) == 1 + 2.0**-7


def float32_error(terms: int) -> float:
    """A bound on float32 accumulation's error over `terms` products, relative to sum |w x|: terms * 2^-24
    (the classic gamma_n, to first order), doubled for margin."""
    return 2 * terms * 2.0**-24
