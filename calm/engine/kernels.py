"""Packed CPU matmuls: the backbone's nn.Linear layers through oneDNN, each weight reordered once.

On the AMD EPYC CPU of this project's machines, torch's default fp32 linear (MKL) costs 1.42× one
position to run two and 1.64× to run three, so verifying drafted tokens costs almost what decoding them
one by one costs. oneDNN's linear on a weight packed (reordered) for 4 rows runs 3 to 5 positions in
0.94-0.97× the time of one (benchmarks/results/speculative_smollm2.md, "what verifying costs"): wide
verification becomes as cheap as a decode step, and the whole forward gets a little faster.

`packed_linears(model)` installs the packed forward on every plain fp32 CPU nn.Linear of the model for
the duration of a generation, and removes it after, so the model outside calm (transformers' own
`generate`, training) runs torch's kernels. A packed weight is cached per weight and packed again when
the weight changes (its storage or version). Costs: one extra copy of those weights in memory.

`only_slots(keep)` narrows that further for a forward over B rows of T token slots where only some
slots count (speculative verification: each row's pending token and its own drafts, not the cycle's
widest draft): the packed linears then run on the kept slots alone, packed into one [N, in] matrix, and
give zeros at the others, whose outputs nothing reads (their cache columns are masked). Attention,
norms and the other per-token work still see the padded [B, T] layout.

Exactness: the packed kernel sums in another order than MKL, as MKL itself does for different row
counts, so logits differ in the last bits (about 1e-5); greedy tokens differ only at a near-tie. calm's
full model and its lossless mode run the same kernels, so they stay identical to each other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from calm.errors import InputError

KERNELS = ("auto", "torch", "onednn")  # auto: onednn where it applies (a CPU, fp32, inference), else torch
PACK_ROWS = 4  # the row count weights are packed for: 3-5 rows then cost what one does (measured above)
_ACTIVE: ContextVar[bool] = ContextVar("calm_packed_kernels", default=False)  # inside packed_linears
# id(weight) -> (a weak reference to it, its storage and version when packed, the packed copy): tensors
# compare by value, so they cannot key a WeakKeyDictionary; an entry goes when its weight does. Kept off
# the modules, so copying or saving a model never meets oneDNN's opaque tensors.
_PACKED: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


@dataclass(frozen=True)
class KeptSlots:
    """The token slots of a [B, T] forward that count: index [N] into its B*T flattened slots."""

    shape: torch.Size  # (B, T): a linear's input [B, T, in] of exactly this leading shape is narrowed
    index: torch.Tensor  # [N] long


_KEPT: ContextVar[KeptSlots | None] = ContextVar("calm_kept_slots", default=None)  # inside only_slots


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise InputError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packable(linear: torch.nn.Module) -> bool:
    """A plain fp32 nn.Linear on the CPU without a forward of its own on the instance (subclasses such as
    peft's LoRA layers, accelerate's hooked modules, or one already packed by an enclosing block keep theirs)."""
    if type(linear) is not torch.nn.Linear or "forward" in vars(linear) or hasattr(linear, "_hf_hook"):
        return False
    weight = linear.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() > 0


def uses_onednn(kernels: str) -> bool:
    """Whether `kernels` asks for the packed path here: 'onednn', or 'auto' where oneDNN is built in; never
    where autograd records (the packed op has no backward) or under autocast (it keeps its dtypes)."""
    check_kernels(kernels)
    if kernels == "torch" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if kernels == "onednn" and not onednn_available():
        raise InputError("kernels='onednn' needs a torch built with oneDNN (mkldnn); use kernels='torch'")
    return onednn_available()


@contextmanager
def packed_linears(model: torch.nn.Module, kernels: str = "auto") -> Iterator[None]:
    """Inside the block, every packable nn.Linear of `model` runs oneDNN's linear on its packed weight,
    and so does `linear` (calm's own matmuls, such as calm.engine.lm_head's float32 head scoring many rows).
    A model with nothing to pack (on a GPU, in half precision) runs as it is."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and packable(m)]
    if not linears or not uses_onednn(kernels):
        yield
        return
    token = _ACTIVE.set(True)
    installed: list[torch.nn.Linear] = []
    try:
        for module in linears:
            module.forward = _packed_forward(module)  # type: ignore[method-assign,assignment]  # this block only
            installed.append(module)
        yield
    finally:
        _ACTIVE.reset(token)
        for module in installed:
            del module.forward  # the class's forward again


@contextmanager
def only_slots(keep: torch.Tensor) -> Iterator[torch.Tensor]:
    """Inside packed_linears: packed linears over inputs [B, T, in] (keep's shape [B, T], bool) compute
    the kept slots only and return zeros at the rest. Where every slot is kept, or outside
    packed_linears, nothing changes. Yields the kept slots' flattened indices [N] (one host sync)."""
    index = keep.reshape(-1).nonzero()[:, 0]  # [N]
    if not _ACTIVE.get():
        yield index
        return
    token = _KEPT.set(None if index.numel() == keep.numel() else KeptSlots(keep.shape, index))
    try:
        yield index
    finally:
        _KEPT.reset(token)


def clear_cache() -> None:
    """Forget every packed weight. Needed only after a weight changed without its version counter
    moving (a write through `weight.data`, as peft's unsafe merge does): calm packs again on next use."""
    _PACKED.clear()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T, through oneDNN on a packed copy of `weight` inside packed_linears
    (bfloat16 included where the CPU has oneDNN's bf16 kernels: it accumulates in float32 and rounds the
    output once, as torch's does); torch's linear anywhere else."""
    if not _ACTIVE.get() or not _packs(x, weight):
        return torch.nn.functional.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, _packed(weight), None, "none", [], "")


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered for oneDNN, packed once and again when its storage or version changes."""
    key, state = id(weight), (weight.data_ptr(), _version(weight))
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != state:
        gone = weakref.ref(weight, lambda _: _PACKED.pop(key, None))
        entry = _PACKED[key] = (gone, state, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
    return entry[2]


def _packs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or x.dtype != weight.dtype or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    return weight.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _version(weight: torch.Tensor) -> int:
    """The weight's in-place change counter (an inference tensor has none: -1)."""
    try:
        return weight._version
    except RuntimeError:
        return -1


def _packed_forward(linear: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias = linear.weight, linear.bias
    packed = _packed(weight)

    def forward(x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], as nn.Linear; torch's own where this thread is not generating."""
        if not _ACTIVE.get() or torch.is_grad_enabled() or x.dtype != torch.float32:
            return torch.nn.functional.linear(x, weight, bias)
        kept = _KEPT.get()
        if kept is not None and x.shape[:-1] == kept.shape:
            return _kept_only(
                x, kept, lambda rows: torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
            )
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


def _kept_only(x: torch.Tensor, kept: KeptSlots, op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """op over the kept slots of x [B, T, in] only -> [B, T, out], zeros at the slots not kept."""
    rows = op(x.reshape(-1, x.shape[-1]).index_select(0, kept.index))  # [N, out]
    out = rows.new_zeros(x.shape[:-1].numel(), rows.shape[-1]).index_copy_(0, kept.index, rows)
    return out.view(*x.shape[:-1], rows.shape[-1])
