"""A 4-bit twin of a float model, for drafting: the same modules, with each linear of the layer stack computing on
int4 blocks through calm.engine.quantized (torch's CPU int4 kernel).

Lossless decoding drafts tokens that the full model then verifies in one pass. Where the context offers nothing to
copy, the drafts have to come from a model. At batch 1 a decode step reads every weight once, so a twin holding
0.75 bytes per weight instead of 4 decodes a token in about half a float32 step, and it agrees with the float
model on nearly every token (calm's native weights, the same kind of blocks, give the float32 model's tokens on
88% of whole 48-token summaries: benchmarks/results/native_smollm2.md). Its drafts are only proposals: every
committed token is the float model's own, so the output is the float model's exactly.

The twin shares everything but those linears with its model: embeddings, norms, rotary tables, the LM head
(and its certified argmax), and the KV cache it writes into while drafting (verification overwrites those
columns). Each weight is quantized as GGUF's Q4_1 does, per group of 32 inputs: w ≈ d·q + m, q in 0..15. It costs
about 0.75 bytes per quantized weight beside the float32 ones (80 MB for SmolLM2-135M's 106M linear weights).
"""

from __future__ import annotations

import copy
import weakref

import torch

from calm.adapters import adapter_for
from calm.engine.decode import Network
from calm.engine.kernels import _version
from calm.engine.quantized import GROUP, QuantBlocks, QuantizedLinear, native_available

LEVELS = 15  # Q4_1: codes 0..15


def quantize_q4_1(weight: torch.Tensor) -> QuantBlocks:
    """weight [out, in] (in a multiple of GROUP) -> Q4_1 blocks: per group of GROUP inputs, d = (max - min)/15 and
    m = min in float16, q = round((w - m)/d). The error per weight is at most d/2 plus the float16 rounding."""
    out, width = weight.shape
    w = weight.detach().float().reshape(out, width // GROUP, GROUP)  # [out, in/G, G]
    low, high = torch.aminmax(w, dim=-1)  # [out, in/G]
    scales = ((high - low) / LEVELS).half()
    mins = low.half()
    d = scales.float()
    inverse = torch.where(d > 0, 1.0 / d, 0.0)[..., None]  # a constant group: every code 0
    codes = (w - mins.float()[..., None]).mul_(inverse).round_().clamp_(0, LEVELS)
    return QuantBlocks("Q4_1", codes.to(torch.uint8).reshape(out, width), scales, mins)


def quantizable(module: torch.nn.Module, head: torch.nn.Module | None) -> bool:
    """A plain float nn.Linear on the CPU whose input width splits into groups, other than the LM head (the twin
    shares the head and its certified argmax): the layer stack's projections, and any other plain linear."""
    if type(module) is not torch.nn.Linear or module is head:
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.is_floating_point() and weight.shape[1] % GROUP == 0


def twin_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of `model`'s module tree sharing every parameter and buffer, whose quantizable linears are
    QuantizedLinear over their Q4_1 blocks (and a copy of their biases); None where none is quantizable, torch
    lacks the int4 kernel, or a module runs a forward of its own (build the twin outside
    calm.engine.kernels.packed_linears)."""
    if not native_available() or any("forward" in vars(m) for m in model.modules()):
        return None  # a module with a forward of its own (accelerate's hooks, calm's packed kernels) is not copied
    head = _head(model)
    names = [name for name, m in model.named_modules() if quantizable(m, head)]
    if not names:
        return None
    return _skeleton(model, set(names), "")


def _skeleton(module: torch.nn.Module, quantize: set[str], prefix: str) -> torch.nn.Module:
    """module's tree copied: the same parameters and buffers, new module objects, linears named in `quantize`
    as QuantizedLinear."""
    if prefix in quantize:
        assert isinstance(module, torch.nn.Linear)
        with torch.no_grad():
            return QuantizedLinear(quantize_q4_1(module.weight), module.bias)
    twin = copy.copy(module)  # a new object over the same attributes
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    for name, value in vars(module).items():  # hooks stay with the model: its twin only drafts
        if "hooks" in name and isinstance(value, dict):
            setattr(twin, name, type(value)())
    twin._modules = {
        name: None if child is None else _skeleton(child, quantize, f"{prefix}.{name}" if prefix else name)
        for name, child in module._modules.items()
    }
    return twin


def twin_available(net: Network) -> bool:
    """Whether twin_network can build a twin of `net` (without building it)."""
    adapter = net.adapter
    if not adapter.projections_called or getattr(adapter, "device", torch.device("cpu")).type != "cpu":
        return False
    head = _head(adapter.model)
    return native_available() and any(quantizable(m, head) for m in adapter.model.modules())


def twin_network(net: Network) -> Network | None:
    """The 4-bit twin of `net`'s backbone as a Network (no exit heads; the same certified argmax), or None where
    no twin can be built: an adapter that reads projection weights itself (Adapter.projections_called), no
    quantizable linear, no int4 kernel, or a backbone off the CPU."""
    model = net.adapter.model
    if not twin_available(net):
        return None
    twin = twin_model(model)
    if twin is None:
        return None
    return Network(adapter_for(twin), None, net.argmax)  # type: ignore[arg-type]  # a copy of a PreTrainedModel


_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[tuple[int, int], ...], Network]] = (
    weakref.WeakKeyDictionary()
)


def twin_of(net: Network) -> Network | None:
    """`net`'s twin (twin_network), built once per model and again when one of its linear weights changed (its
    storage or in-place version); None where it has none."""
    model = net.adapter.model
    stamp = _weights_stamp(model)
    kept = _TWINS.get(model)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    twin = twin_network(net)
    if twin is not None:
        _TWINS[model] = (stamp, twin)
    return twin


def _weights_stamp(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    tensors = [t for m in linears for t in (m.weight, m.bias) if t is not None]
    return tuple((t.data_ptr(), _version(t)) for t in tensors)


def twin_bytes(model: torch.nn.Module) -> int:
    """Bytes a twin of `model` would hold beyond it (its quantized linears' buffers; all else is shared), measured
    by quantizing one linear at a time, so the twin is never held whole (0: the model has no twin)."""
    if not native_available() or not adapter_for(model).projections_called:  # type: ignore[arg-type]
        return 0
    head = _head(model)
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and quantizable(module, head):
            with torch.no_grad():
                linear = QuantizedLinear(quantize_q4_1(module.weight), module.bias)
            total += sum(t.untyped_storage().nbytes() for t in linear.buffers())
    return total


def _head(model: torch.nn.Module) -> torch.nn.Module | None:
    output_embeddings = getattr(model, "get_output_embeddings", None)
    return output_embeddings() if callable(output_embeddings) else None
