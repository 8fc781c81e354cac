"""Native 4-bit weights: linears and embeddings that compute on a GGUF checkpoint's own quantized blocks.

At batch 1 decoding reads every weight once per token, so its time is the bytes read. SmolLM2's GGUF
holds 0.6 bytes per weight; dequantised to float32 it is 4. `QuantizedLinear` keeps the blocks packed
for torch's int4 kernel (`aten._weight_int4pack_mm_for_cpu`, tinygemm's CPU port, group 32) and runs
it with bfloat16 activations, its fast path (float32 activations take its slow path, 10x slower):

- Q4_1 (w = d*q + m, q in 0..15) maps exactly: the kernel computes w = (q - 8)*scale + zero per group,
  so scale = d and zero = m + 8d. Q4_0 (w = d*(q - 8)): scale = d, zero = 0.
- Q8_0 (w = d*q, q in -127..127) has no exact int8 kernel: `_weight_int8pack_mm` takes one scale per
  output channel, Q8_0 one per 32 inputs. Its codes split exactly into two 4-bit planes,
  q + 128 = 16a + b, so w = (a - 8)*16d + b*d: one int4 matmul over [x, x] (2x the input width, 1 byte
  per weight in all). Measured on the 576 x 49152 LM head: 3.7 ms against 6.9 ms for the packed
  float32 linear (one thread, the busy 2-core Intel Xeon of native_smollm2.md); bfloat16 dequantisation
  would read 2 bytes per weight and round the products (18 significant bits) to 8.
- The kernel takes its scales in bfloat16 (the activations' dtype), so the fp16 block scales lose 3
  bits there: outputs differ from the dequantised float32 matmul by about 2^-8 relative (the
  activations' rounding is of the same size). The fp16 originals are kept for dequantisation.

Many rows (a prompt): the int4 kernel runs 2-3x slower than a float32 GEMM at 256-600 rows, while
dequantising a layer's weight costs about what 100 rows of the kernel do. From FLOAT_FROM_ROWS rows a
linear dequantises its weight (exactly: the float32 values transformers loads) into a temporary and
runs torch's float32 linear: the prompt runs on the float32 model's weights, one weight at a time
(the largest temporary is one weight in float32), and decoding on the blocks.

Memory per weight: 0.5 bytes of int4 codes (1 for Q8_0), 2 x 2 bytes per 32 weights for the fp16 scale
(and Q4_1's minimum), 4 per 32 for the kernel's bfloat16 scale and zero: about 0.75 bytes.
`QuantizedEmbedding` gathers rows of the tied Q8_0 token embedding from the same packed planes and
dequantises them exactly, so a tied embedding and LM head share one copy.

Only CPU tensors: torch's CUDA int4 kernel packs differently (unmeasured here; no GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm.engine.kernels import _KEPT, _kept_only
from calm.errors import InputError

GROUP = 32  # weights per GGUF block along the input dimension, and the kernel's group size
FORMATS = ("Q4_0", "Q4_1", "Q8_0")
PACK_N = 64  # the CPU int4 packing works in blocks of 64 output rows: [N/64, K, 32] bytes, lo nibble n, hi n + 32
FLOAT_FROM_ROWS = 64  # from this many rows, dequantise and run the float32 GEMM (see the module docstring)
PACK_ROWS = 64 * 64  # rows packed at a time: a multiple of PACK_N
INNER_K_TILES = 2  # the packing argument of _convert_weight_to_int4pack_for_cpu (ignored by its CPU layout)


@dataclass(frozen=True)
class QuantBlocks:
    """A weight [out, in] as GGUF blocks of GROUP inputs, unpacked: w = scale*code + offset per block
    (Q4_0: code - 8; Q8_0: no offset)."""

    kind: str  # one of FORMATS
    codes: torch.Tensor  # [out, in] uint8 0..15 (Q4_0, Q4_1) or int8 -127..127 (Q8_0)
    scales: torch.Tensor  # [out, in/GROUP] float16: the block's d
    mins: torch.Tensor | None = None  # [out, in/GROUP] float16: Q4_1's m

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise InputError(f"unsupported block format {self.kind!r}; native weights take {', '.join(FORMATS)}")
        out, width = self.codes.shape
        if width % GROUP or self.scales.shape != (out, width // GROUP):
            raise InputError(f"{self.kind} blocks of shape {tuple(self.codes.shape)} do not split into {GROUP}s")
        if (self.mins is not None) != (self.kind == "Q4_1"):
            raise InputError(f"{self.kind} blocks {'need' if self.kind == 'Q4_1' else 'take no'} minimums")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    def permute_rows(self, order: torch.Tensor) -> QuantBlocks:
        """The same weight with its rows reordered (blocks run along the input, so rows keep them whole)."""
        mins = None if self.mins is None else self.mins[order]
        return QuantBlocks(self.kind, self.codes[order], self.scales[order], mins)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32, computed as gguf's dequantize_blocks does (bit-exact with it)."""
        return _dequantize(self.kind, self.codes, self.scales, self.mins)


def _dequantize(kind: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    out, width = codes.shape
    q = codes.view(out, width // GROUP, GROUP).float()  # [out, in/G, G]
    d = scales.float()[..., None]  # [out, in/G, 1]
    if kind == "Q4_0":
        w = d * (q - 8)
    elif kind == "Q4_1":
        assert mins is not None
        w = d * q + mins.float()[..., None]
    else:
        w = q * d
    return w.view(out, width)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] (0..15, N a multiple of PACK_N) -> the CPU kernel's packed [N, K/2] uint8, PACK_ROWS
    rows at a time (the op takes int32 codes: 4 bytes a weight for the chunk only; blocks of 64 rows pack alone)."""
    chunks = codes.split(PACK_ROWS)
    return torch.cat([_pack_op(c.to(torch.int32).contiguous()) for c in chunks])


def _pack_op(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)


def _unpack(packed: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The codes [rows, width] uint8 back from the packed layout ([rows/64, width, 32]: lo nibble row
    i, hi nibble row i + 32 of each 64)."""
    p = packed.view(rows // PACK_N, width, PACK_N // 2)
    return torch.cat([p & 15, p >> 4], dim=-1).permute(0, 2, 1).reshape(rows, width)


@functools.cache
def unpack_matches() -> bool:
    """Whether this torch packs int4 weights as _unpack reads them (checked once, on a small probe): if
    not, prompts run on the int4 kernel too, and embeddings from a kept copy."""
    codes = torch.randint(0, 16, (2 * PACK_N, 2 * GROUP), generator=torch.Generator().manual_seed(0))
    try:
        packed = _pack_op(codes.to(torch.int32))
    except RuntimeError:
        return False
    return packed.shape == (2 * PACK_N, GROUP) and torch.equal(_unpack(packed, 2 * PACK_N, 2 * GROUP), codes.byte())


def native_available() -> bool:
    """Whether this torch has the CPU int4 kernel (torch >= 2.6 builds it in)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and unpack_matches()


class QuantizedLinear(torch.nn.Module):
    """A linear map over GGUF blocks: x [..., in] -> [..., out] (+ bias), through the int4 kernel for few
    rows and a float32 GEMM on the dequantised weight for many (module docstring)."""

    packed: torch.Tensor  # buffers, typed for mypy (nn.Module's __getattr__ says Tensor | Module)
    scales_zeros: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bias: torch.Tensor | None
    codes: torch.Tensor | None

    def __init__(self, blocks: QuantBlocks, bias: torch.Tensor | None = None):
        super().__init__()
        self.kind = blocks.kind
        self.out_features, self.in_features = blocks.shape
        self.planes = 2 if blocks.kind == "Q8_0" else 1
        padded = -self.out_features % PACK_N  # zero rows up to the packing's multiple of 64, sliced off after
        codes, scale, zero = _kernel_form(blocks)  # [N, planes*K] 0..15, [N, planes*K/G] each (float32)
        codes = F.pad(codes, (0, 0, 0, padded))
        self.register_buffer("packed", _pack(codes))  # [N', planes*K/2] uint8
        self.register_buffer("scales_zeros", _table(scale, zero).to(torch.bfloat16))
        self.register_buffer("scales", blocks.scales.clone())  # [N, K/G] float16, for exact dequantisation
        self.register_buffer("mins", None if blocks.mins is None else blocks.mins.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.keep_codes = not unpack_matches()  # a torch packing otherwise: keep the codes for dequantisation
        self.register_buffer("codes", blocks.codes.clone() if self.keep_codes else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.kind}"

    def block_codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' codes [out, in] (or of `rows` only), uint8 / int8 as in QuantBlocks."""
        if self.codes is not None:
            return self.codes if rows is None else self.codes[rows]
        width = self.planes * self.in_features
        if rows is None:
            codes = _unpack(self.packed, self.packed.shape[0], width)[: self.out_features]
        else:
            codes = _unpack_rows(self.packed, rows, width)
        if self.planes == 1:
            return codes
        high, low = codes.split(self.in_features, dim=-1)
        return (high.short() * 16 + low.short() - 128).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in float32: exactly the values of gguf's dequantisation."""
        return _dequantize(self.kind, self.block_codes(), self.scales, self.mins)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The weight's rows [R] (long) dequantised: [R, in] float32."""
        mins = None if self.mins is None else self.mins[rows]
        return _dequantize(self.kind, self.block_codes(rows), self.scales[rows], mins)

    def joint(self, members: tuple[torch.nn.Module, ...]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None:
        """One call for `members` (this module first) over one input, where their blocks stack: a decode
        step's K and V, or gate and up, through one kernel call instead of one each; None where they do not.
        Built on first use, eagerly (under torch.compile the members run one by one: the same outputs), and kept
        while the members are these modules (see `stack`)."""
        if torch.compiler.is_compiling():
            return None
        cached = self.__dict__.get("_joint")
        if cached is None or cached[0] != members:
            stacked = QuantizedLinear.stack(members)
            cached = (members, None if stacked is None else _joint_call(stacked, members))
            self.__dict__["_joint"] = cached  # a plain attribute: no submodule, nothing saved twice
        return cached[1]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the stack behind: a copy stacks its own members again when it runs."""
        state = dict(super().__getstate__())
        state.pop("_joint", None)
        state.pop("_stacked", None)
        return state

    @staticmethod
    def stack(members: tuple[torch.nn.Module, ...]) -> QuantizedLinear | None:
        """The members' weights as one [sum out, in] module, or None where they do not stack (other types,
        formats, widths or biases, or rows not whole packing blocks). Its outputs are the members' side by
        side, bit for bit: the kernel computes each output row alone. The members' packed codes and block
        scales become views of the stack's, so the weights are held once (the bfloat16 scale-and-zero
        tables, 1/8 of the codes' bytes, twice); a member already in a stack joins no other. The stack keeps its
        own copy of those tables and of the biases: an in-place change to them after stacking is not seen."""
        if len(members) < 2 or not all(_stackable(m, members[0]) for m in members):
            return None
        with torch.inference_mode(False):  # normal tensors, even when first run inside inference mode
            return QuantizedLinear._stacked_of(members)

    @staticmethod
    def _stacked_of(members: tuple[torch.nn.Module, ...]) -> QuantizedLinear:
        parts: list[QuantizedLinear] = list(members)  # type: ignore[arg-type]  # checked by _stackable
        stack = QuantizedLinear.__new__(QuantizedLinear)  # built from the parts' tensors, not from blocks
        torch.nn.Module.__init__(stack)
        first = parts[0]
        stack.kind, stack.in_features, stack.planes, stack.keep_codes = (
            first.kind, first.in_features, first.planes, first.keep_codes
        )  # fmt: skip
        stack.out_features = sum(m.out_features for m in parts)
        for name, dim in (("packed", 0), ("scales", 0), ("mins", 0), ("bias", 0), ("scales_zeros", 1), ("codes", 0)):
            tensors = [getattr(m, name) for m in parts]
            stack.register_buffer(name, None if tensors[0] is None else torch.cat(tensors, dim=dim))
        start = 0
        for m in parts:
            rows = slice(start, start + m.out_features)
            for name in ("packed", "scales", "mins"):
                if m._buffers[name] is not None:
                    m._buffers[name] = stack._buffers[name][rows]  # type: ignore[index]
            m.__dict__["_stacked"] = True
            start += m.out_features
        return stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows >= FLOAT_FROM_ROWS:
            return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        kept = None if torch.compiler.is_compiling() else _KEPT.get()  # only_slots: the dynamic engine's verification
        if kept is not None and x.shape[:-1] == kept.shape:
            return _kept_only(x, kept, self.int4)
        return self.int4(x)

    def int4(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through the int4 kernel (bfloat16 activations, float32 accumulation)."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [R, K]
        if self.planes == 2:
            flat = torch.cat([flat, flat], dim=-1)  # [R, 2K]: the high and the low plane
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)  # [R, N']
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]  # [R, N]: the packing's zero rows off
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def _stackable(m: torch.nn.Module, first: torch.nn.Module) -> bool:
    if (
        type(m) is not QuantizedLinear
        or type(first) is not QuantizedLinear
        or m.keep_codes
        or m.__dict__.get("_stacked")
    ):
        return False

    def form(q: QuantizedLinear) -> tuple:
        return (q.kind, q.in_features, q.planes, q.bias is None)

    return form(m) == form(first) and m.out_features % PACK_N == 0 and m.packed.shape[0] == m.out_features


def _joint_call(
    stack: QuantizedLinear, members: tuple[torch.nn.Module, ...]
) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    sizes = [m.out_features for m in members]  # type: ignore[misc]

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> each member's output [..., out_i]: one int4 call for few rows; a prompt's many rows
        run member by member (each dequantised alone, as without the stack)."""
        if x.shape[:-1].numel() >= FLOAT_FROM_ROWS:
            return tuple(m(x) for m in members)
        return stack(x).split(sizes, dim=-1)

    return run


def _unpack_rows(packed: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """The codes [R, width] uint8 of the wanted rows [R] only, read from the packed layout."""
    blocks = packed.view(-1, width, PACK_N // 2)  # [N/64, W, 32]
    slot = rows % PACK_N
    picked = blocks[rows // PACK_N, :, slot % (PACK_N // 2)]  # [R, W]: the bytes holding each row
    return torch.where((slot >= PACK_N // 2)[:, None], picked >> 4, picked & 15)


def kernel_table(blocks: QuantBlocks, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernel's scale-and-zero table of `blocks` in `dtype` (QuantizedLinear keeps it in bfloat16, the
    kernel's fast path): [P*K/G, N', 2], rows padded to the packing's multiple of PACK_N."""
    _, scale, zero = _kernel_form(blocks)
    return _table(scale, zero).to(dtype)


def _table(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale and zero [N, P*K/G] (float32) -> the kernel's table layout [P*K/G, N', 2], zero rows up to N'."""
    zeros = torch.stack([scale, zero], dim=-1)  # [N, P*K/G, 2]
    padded = -zeros.shape[0] % PACK_N
    return F.pad(zeros, (0, 0, 0, 0, 0, padded)).transpose(0, 1).contiguous()


def _kernel_form(blocks: QuantBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks as the kernel's w = (c - 8)*scale + zero: codes [N, P*K] (0..15), scale and zero
    [N, P*K/G] float32, P = 1 plane (Q4_0, Q4_1) or 2 (Q8_0: high plane, then low plane)."""
    d = blocks.scales.float()
    if blocks.kind == "Q4_1":
        assert blocks.mins is not None
        return blocks.codes, d, blocks.mins.float() + 8 * d
    if blocks.kind == "Q4_0":
        return blocks.codes, d, torch.zeros_like(d)
    shifted = blocks.codes.short() + 128  # 1..255 = 16*high + low
    codes = torch.cat([shifted // 16, shifted % 16], dim=1).to(torch.uint8)  # [N, 2K]
    scale = torch.cat([16 * d, d], dim=1)  # (high - 8)*16d + (low - 8)*d + 8d = d*q
    zero = torch.cat([torch.zeros_like(d), 8 * d], dim=1)
    return codes, scale, zero


class QuantizedEmbedding(torch.nn.Module):
    """An embedding lookup over the rows of a QuantizedLinear's blocks (a tied token embedding): ids
    [...] -> [..., D] float32, exactly the dequantised rows."""

    def __init__(self, table: QuantizedLinear, padding_idx: int | None = None):
        super().__init__()
        self.table = table  # shared with the LM head: one copy
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, blocks={self.table.kind}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # [R]
        return self.table.dequantize_rows(flat).view(*ids.shape, self.embedding_dim)
