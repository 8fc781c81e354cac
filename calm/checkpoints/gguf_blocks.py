"""Reading a GGUF file's quantized blocks (Q4_0, Q4_1, Q8_0) by the transformers module they belong to,
for native weights (calm.engine.quantized). The `gguf` package's GGUFReader maps the file; its name
map (the one transformers loads GGUF files with) says which tensor is which module's weight.

Llama's GGUF files store q_proj and k_proj rows in llama.cpp's rope layout; transformers un-permutes
them on load. A block holds 32 consecutive inputs of one row, so the same row permutation applied to
the blocks keeps every block whole. Whatever the architecture, `native_modules` (calm.checkpoints.native)
checks every weight dequantised from the blocks against the float32 weight transformers loaded, and
refuses a file where any differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from calm.checkpoints.checkpoint import write_safetensors
from calm.checkpoints.loading import gguf_cache_path
from calm.engine.quantized import FORMATS, GROUP, QuantBlocks
from calm.errors import CheckpointError

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per 32 weights: fp16 d (and Q4_1's fp16 m), then codes
ROPE_PERMUTED = ("llama",)  # GGUF architectures whose attn_q / attn_k rows transformers un-permutes


def read_blocks(gguf: Path, config: Any) -> Iterator[tuple[str, QuantBlocks]]:
    """The quantized weights of a GGUF file, one at a time (a weight's unpacked codes take a byte per
    weight), by the module name they load into in transformers' model for `config`
    ('model.layers.0.self_attn.q_proj', 'model.embed_tokens', ...); tensors in other formats (float32
    norms, K-quants) are left out."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise CheckpointError(f"{gguf} is not a readable GGUF file ({exc})") from exc
    arch = _architecture(reader)
    names = _module_names(arch, config)
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        base = tensor.name.removesuffix(".weight")
        if kind not in FORMATS or not tensor.name.endswith(".weight") or base not in names:
            continue
        blocks = parse_blocks(kind, np.asarray(tensor.data), int(tensor.shape[0]))
        yield names[base], _unpermute(arch, base, blocks, config)


def parse_blocks(kind: str, data: np.ndarray, width: int) -> QuantBlocks:
    """GGUF block bytes [out, width/32 * BLOCK_BYTES] (uint8) -> QuantBlocks of the weight [out, width]."""
    out = data.shape[0]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(out, width // GROUP, BLOCK_BYTES[kind])  # a copy
    scales = raw[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [out, in/32]
    if kind == "Q8_0":
        codes = raw[..., 2:].contiguous().view(torch.int8).reshape(out, width)
        return QuantBlocks(kind, codes, scales.clone())
    start = 4 if kind == "Q4_1" else 2
    mins = raw[..., 2:4].contiguous().view(torch.float16)[..., 0].clone() if kind == "Q4_1" else None
    packed = raw[..., start:]  # [out, in/32, 16]: element j in the low nibble of byte j, j + 16 in the high
    codes = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(out, width)
    return QuantBlocks(kind, codes, scales.clone(), mins)


def _architecture(reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError("the GGUF file names no general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def _module_names(arch: str, config: Any) -> dict[str, str]:
    """GGUF tensor base names ('blk.0.attn_q') -> transformers module names, for every layer."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    archs = {name: key for key, name in MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise CheckpointError(f"the gguf package does not know the GGUF architecture {arch!r}")
    layers = int(config.num_hidden_layers)
    name_map = get_tensor_name_map(archs[arch], layers)
    modules = ["model.embed_tokens", "lm_head"]
    per_layer: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    per_layer += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    modules += [f"model.layers.{i}.{part}" for i in range(layers) for part in per_layer]
    found = {}
    for module in modules:
        name = name_map.get_name(module)
        if name is not None:
            found[name] = module
    return found


def _unpermute(arch: str, base: str, blocks: QuantBlocks, config: Any) -> QuantBlocks:
    """Undo llama.cpp's rope row order on attn_q / attn_k, as transformers does on the float weights."""
    if arch not in ROPE_PERMUTED or not base.endswith((".attn_q", ".attn_k")):
        return blocks
    heads = int(config.num_attention_heads)
    if base.endswith(".attn_k"):
        heads = int(getattr(config, "num_key_value_heads", None) or heads)
    out = blocks.shape[0]
    order = torch.arange(out).view(heads, out // heads // 2, 2).transpose(1, 2).reshape(-1)  # [out]
    return blocks.permute_rows(order)


# ---- the cache: blocks kept as safetensors beside the dequantised weights, read without the GGUF parser ----


def block_cache_path(gguf: Path) -> Path:
    """Where the blocks of a GGUF file are kept once read and checked: beside its dequantised weights,
    keyed by the file's content (calm.checkpoints.loading.cache_dir; deleting that clears both)."""
    float_dir = gguf_cache_path(gguf)
    return float_dir.with_name(float_dir.name + ".native.safetensors")


def write_block_cache(path: Path, blocks: list[tuple[str, QuantBlocks]]) -> None:
    """The blocks as one safetensors file: 4-bit codes two to a byte, scales and minimums in fp16."""
    tensors, kinds = {}, {}
    for name, b in blocks:
        codes = b.codes if b.kind == "Q8_0" else b.codes[:, 0::2] | (b.codes[:, 1::2] << 4)
        tensors[f"{name}.codes"] = codes.contiguous()
        tensors[f"{name}.scales"] = b.scales.contiguous()
        if b.mins is not None:
            tensors[f"{name}.mins"] = b.mins.contiguous()
        kinds[name] = b.kind
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, {"format": "calm-gguf-blocks", "kinds": json.dumps(kinds)})


def read_block_cache(path: Path) -> Iterator[tuple[str, QuantBlocks]]:
    """The blocks written by write_block_cache, one weight at a time, in the order written."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = json.loads((f.metadata() or {})["kinds"])
            for name, kind in kinds.items():
                codes = f.get_tensor(f"{name}.codes")
                if kind != "Q8_0":
                    codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
                mins = f.get_tensor(f"{name}.mins") if kind == "Q4_1" else None
                yield name, QuantBlocks(kind, codes, f.get_tensor(f"{name}.scales"), mins)
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"the block cache {path} is unreadable ({exc}); delete it to convert again") from exc
