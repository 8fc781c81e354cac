"""Count the host synchronisations a piece of torch code would make on a GPU, on any device.

A sync is an operation whose result the host must read before it can go on: a scalar read
(`.item()`, `bool(t)`, `int(t)`), a data-dependent output shape (`nonzero`, boolean-mask indexing,
`masked_select`, `unique`), or a copy to the host (`.tolist()`, `.cpu()`). On a GPU each one waits
for every queued kernel to finish. On a CPU they cost nothing, so they are counted where they are
asked for: at the ATen operator (a TorchDispatchMode), plus `Tensor.tolist`/`numpy`, which read
memory without one. Counting is exact for eager code; code compiled by `torch.compile` runs below
the dispatcher, and `fullgraph=True` is what shows it has no sync (one would break the graph).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# operators that always make the host wait for the device
ALWAYS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.masked_select.default,
    aten.where.default,  # where(cond): nonzero
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
# operators that wait only when indexed with a boolean mask (converted to indices with nonzero)
MASK_INDEXED = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _is_mask(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether one ATen call makes the host wait."""
    if func in ALWAYS:
        return True
    if func in MASK_INDEXED:
        return any(_is_mask(t) for t in args[1] if t is not None)
    if func == aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func == aten._to_copy.default:  # .cpu(), .to("cpu")
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func == aten.copy_.default:  # cpu_tensor.copy_(device_tensor)
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...  then c.total, and c.by_op (a Counter of operator names)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._patched: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs):
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> SyncCounter:
        for name in ("tolist", "numpy"):  # host reads that dispatch no operator
            original = getattr(torch.Tensor, name)
            self._patched[name] = original
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.by_op[name] += 1
            return original(tensor, *args, **kwargs)

        return call
