"""The weight format a model computes on: `weights=` of CalmModel.from_pretrained and `--weights`.

- "float32": the backbone as transformers loads it (a GGUF dequantised): today's path, exact with transformers.
- "bfloat16": the same in bfloat16 (what dtype="bfloat16" gives).
- "native": the GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks (calm.engine.quantized): every linear whose
  weight the file holds in those formats, and a tied token embedding, are swapped after loading for
  modules that compute on the blocks. Every swapped weight, dequantised, must equal the float32 weight
  transformers loaded, bit for bit (so the blocks are the model calm loaded: a merged adapter or an
  unknown row order is refused). A 16/32-bit checkpoint has no blocks: refused with an InputError.
- "auto" (the default): the format stored as fastest for this checkpoint on this kind of device
  (`WEIGHTS_KEY` in the checkpoint's calm_config.json extra, written from benchmarks/bench_native.py),
  else float32. An explicit dtype= chooses float weights of that dtype.

The shipped calibration table and speculative setting were measured on float32 weights; they are read
unchanged whatever the format (native outputs agree with float32 on most, not all, tokens: the report
benchmarks/results/native_smollm2.md gives the share).
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calm.checkpoints.gguf_blocks import block_cache_path, read_block_cache, read_blocks, write_block_cache
from calm.checkpoints.loading import ALIASES, smollm2_gguf
from calm.engine.quantized import QuantBlocks, QuantizedEmbedding, QuantizedLinear, native_available
from calm.errors import CheckpointError, InputError
from calm.exits.policy import ExitPolicy
from calm.speculative.lossless import LOSSLESS, ModeRun

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS = ("auto", "native", "float32", "bfloat16")
WEIGHTS_KEY = "weights"  # calm_config.json extra: {"cpu": StoredWeights}
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StoredWeights:
    """The weight format `auto` runs for a checkpoint on one kind of device, from benchmarks/bench_native.py."""

    fastest: str  # what auto runs: native where faster and agreeing with float32 (bench_native), else float32
    decode_ms: dict  # format -> decode ms per token at batch 1
    report: str
    machine: str = ""

    @classmethod
    def from_extra(cls, extra: dict | None, device_type: str) -> StoredWeights | None:
        data = ((extra or {}).get(WEIGHTS_KEY) or {}).get(device_type)
        if not data:
            return None
        try:
            stored = cls(**data)
        except TypeError as exc:
            raise InputError(
                f"the weight-format measurement stored with this checkpoint is unreadable ({exc}); "
                "run benchmarks/bench_native.py --store again"
            ) from exc
        if stored.fastest not in WEIGHTS[1:]:
            raise InputError(f"the stored fastest weight format {stored.fastest!r} is not one of {WEIGHTS[1:]}")
        return stored

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WeightsChoice:
    """The format a load runs, its float dtype (None: torch's default), and why."""

    weights: str  # native, float32 or bfloat16
    dtype: torch.dtype | None
    reason: str


def check_weights(weights: str | None) -> str:
    weights = "auto" if weights is None else str(weights).strip().lower()
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    return weights


def gguf_file(name: str) -> Path | None:
    """The GGUF file a model name loads from (an alias, a .gguf path), or None (a float checkpoint)."""
    if name in ALIASES:
        return smollm2_gguf()
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def choose_weights(  # long: one rule per case, each with its reason
    weights: str | None, dtype: torch.dtype | None, source: str, device: torch.device | None, extra: dict | None
) -> WeightsChoice:
    """The format to load `source` in: weights as asked, checked against dtype= and the device."""
    weights = check_weights(weights)
    on_cpu = device is None or device.type == "cpu"
    if weights in FLOAT_DTYPES:
        if dtype is not None and dtype != FLOAT_DTYPES[weights]:
            raise InputError(f"weights={weights!r} and dtype={dtype} disagree; give one of them")
        return WeightsChoice(weights, FLOAT_DTYPES[weights], "asked for")
    if weights == "native":
        if dtype not in (None, torch.float32):
            raise InputError(f"weights='native' computes in float32 around its 4-bit kernels; drop dtype={dtype}")
        if gguf_file(source) is None:
            raise InputError(
                f"weights='native' computes on a GGUF file's quantized blocks, and {source!r} is a 16/32-bit "
                "checkpoint with none; load a .gguf file (Q4_0, Q4_1 or Q8_0), or use weights='float32'"
            )
        if not on_cpu:
            raise InputError("weights='native' runs torch's CPU int4 kernel; use device='cpu' (GPU: unmeasured)")
        if not native_available():
            raise InputError(f"weights='native' needs torch's CPU int4 kernel, missing in torch {torch.__version__}")
        return WeightsChoice("native", None, "asked for")
    if dtype is not None:
        return WeightsChoice(str(dtype).removeprefix("torch."), dtype, f"dtype={dtype} given")
    stored = StoredWeights.from_extra(extra, "cpu" if on_cpu else "cuda")
    if stored is None:
        return WeightsChoice("float32", None, "auto: no weight-format measurement stored for this checkpoint")
    usable = stored.fastest != "native" or (gguf_file(source) is not None and on_cpu and native_available())
    fastest = stored.fastest if usable else "float32"
    ms = ", ".join(f"{k} {v:.1f} ms" for k, v in stored.decode_ms.items())
    return WeightsChoice(
        fastest, FLOAT_DTYPES.get(fastest), f"auto: the stored choice (decode {ms} per token, {stored.report})"
    )


def apply_weights(model: PreTrainedModel, choice: WeightsChoice, source: str, merged_adapter: bool = False) -> None:
    """Put the loaded backbone (of `source`) on the chosen weights: native swaps its modules in place."""
    if choice.weights != "native":
        return
    gguf = gguf_file(source)
    assert gguf is not None  # choose_weights checked
    if merged_adapter:
        raise InputError(
            "weights='native' computes on the GGUF file's blocks, which a merged LoRA adapter does not "
            "change; use weights='float32' for a checkpoint with an adapter"
        )
    to_native(model, gguf)


def format_note(weights: str, knob: bool, stored_setting: bool) -> str:
    """What a run's description adds where a stored measurement taken on float32 weights (the calibration
    table behind a knob, the stored speculative setting) runs on other weights."""
    if weights == "float32" or not (knob or stored_setting):
        return ""
    what = "calibration" if knob else "speculative setting"
    return f" [the stored {what} was measured on float32 weights; this run is on {weights}]"


def to_native(model: PreTrainedModel, gguf: Path) -> int:
    """Swap the model's linears (and a tied token embedding) whose weights the GGUF file holds as Q4_0, Q4_1
    or Q8_0 blocks for modules computing on those blocks, in place, one weight at a time (each float32
    weight is freed as its blocks replace it); returns how many modules were swapped. The first time, the
    blocks are read from the file, checked against the float32 weights, and kept (block_cache_path); later
    loads read them from there (the GGUF parser spends seconds on the tokenizer's fields)."""
    cache = block_cache_path(gguf)
    fresh = not cache.is_file()
    kept: list[tuple[str, QuantBlocks]] = []
    swapped = 0
    for name, blocks in read_blocks(gguf, model.config) if fresh else read_block_cache(cache):
        if _swap(model, name, blocks, check=fresh):
            swapped += 1
            kept += [(name, blocks)] if fresh else []
    if not swapped:
        raise InputError(f"{gguf.name} holds no Q4_0, Q4_1 or Q8_0 weights of this model: use weights='float32'")
    if fresh:
        write_block_cache(cache, kept)
    return swapped


def _swap(model: PreTrainedModel, name: str, blocks: QuantBlocks, check: bool) -> bool:
    """Replace module `name` by one over `blocks` (a tied embedding: the LM head, and the embedding reads it)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    modules = {m: n for n, m in model.named_modules() if m is embed or m is head}
    module = model.get_submodule(name) if name in dict(model.named_modules()) else None
    tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    if module is embed and tied:
        name, module = modules[head], head
    if not isinstance(module, torch.nn.Linear | torch.nn.Embedding):
        return False
    if check:
        _check_same(name, blocks, module.weight)
    if isinstance(module, torch.nn.Embedding):
        _replace(model, name, QuantizedEmbedding(QuantizedLinear(blocks), module.padding_idx))
        return True
    new = QuantizedLinear(blocks, module.bias)
    _replace(model, name, new)
    if module is head and tied and isinstance(embed, torch.nn.Embedding):
        _replace(model, modules[embed], QuantizedEmbedding(new, embed.padding_idx))
    return True


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_same(name: str, blocks: QuantBlocks, weight: torch.Tensor) -> None:
    if blocks.shape != tuple(weight.shape) or not torch.equal(blocks.dequantize(), weight.detach().float()):
        raise CheckpointError(
            f"the GGUF blocks of {name} do not dequantise to the weight transformers loaded (a merged adapter, "
            "or a row order calm does not know); use weights='float32'"
        )


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights, shared blocks)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM (its own, reset by exec), else getrusage's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


NATIVE_LOSSLESS = (
    "full model (lossless; speculative decoding on native weights differed from their full model on 3 of 16 "
    "measured runs, so lossless does not draft on them: docs/weights.md)"
)


def native_lossless(weights: str, mode: str, run: ModeRun | None) -> ModeRun | None:
    """The lossless run on these weights: on native ones, the full model (verifying several positions at once
    rounds differently from one, so drafts would not give the native full model's tokens exactly)."""
    if weights != "native" or mode != LOSSLESS or run is None or run.spec is None:
        return run
    return ModeRun(None, ExitPolicy.never(), NATIVE_LOSSLESS)
