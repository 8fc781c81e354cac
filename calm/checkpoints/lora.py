"""LoRA adapters of the backbone, through peft: attach for training, save adapter-only, and merge
into the backbone at load time so that decoding runs plain weights and costs nothing extra.

A calm checkpoint may hold `adapter_config.json` + `adapter_model.safetensors` (peft's own files)
beside its exit heads. Loading checks them against the backbone before merging: a missing file,
an adapter for another architecture or with other shapes is a CheckpointError, never a silent
partial load. Nothing is unpickled: peft reads the safetensors file only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from calm.checkpoints.quiet import quiet_transformers
from calm.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Which maps of which layers get a rank-`rank` adapter."""

    rank: int = 16
    alpha: float = 32.0
    layers: tuple[int, ...] | None = None  # 0-based decoder layers; None: all
    targets: tuple[str, ...] = LLAMA_LINEARS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InputError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise InputError("LoRA needs at least one target module")

    def peft_config(self, num_layers: int) -> LoraConfig:
        from peft import LoraConfig

        if self.layers is not None and any(not 0 <= i < num_layers for i in self.layers):
            raise InputError(f"LoRA layers {self.layers} are outside the model's 0..{num_layers - 1}")
        # peft annotates lora_alpha as int, but only divides by it: alpha = 2 * rank may be any float
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]
            lora_dropout=0.0,
            bias="none",
            target_modules=list(self.targets),
            layers_to_transform=list(self.layers) if self.layers is not None else None,
        )


def attach(model: PreTrainedModel, spec: LoraSpec, num_layers: int) -> PeftModel:
    """The model wrapped by peft with fresh adapters (B = 0: output unchanged); only they train."""
    from peft import get_peft_model

    model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, spec.peft_config(num_layers))


def has_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@quiet_transformers()
def save_adapter(peft_model: PeftModel, path: str | Path, base_ref: str | None = None) -> None:
    """peft's adapter-only files (safetensors), written into a temporary directory and moved into
    place. base_ref: the backbone as the calm checkpoint names it (instead of a local cache path)."""
    import os
    import shutil
    import tempfile

    path = Path(path)
    if base_ref is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_ref
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=path))
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # weights first: the config marks it complete
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@quiet_transformers()
def merge_adapter(model: PreTrainedModel, path: str | Path) -> PreTrainedModel:
    """The backbone with the checkpoint's adapter merged into its weights (plain transformers model)."""
    from peft import PeftModel

    path = Path(path)
    config = _read_adapter_config(path)
    _check_shapes(model, path, config)
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        merged = peft_model.merge_and_unload()
    if not isinstance(merged, type(model)):
        raise CheckpointError(
            f"merging the LoRA adapter {path} gave a {type(merged).__name__}, not the backbone's {type(model).__name__}"
        )
    return merged


def _read_adapter_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt LoRA adapter config {file}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file} is not a LoRA adapter config (peft_type {config.get('peft_type')!r})")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint {path} has {ADAPTER_CONFIG} but {ADAPTER_WEIGHTS} is missing")
    return config


def _check_shapes(model: torch.nn.Module, path: Path, config: dict) -> None:
    """Every adapter tensor must sit on a linear map of this model, with matching in/out sizes."""
    file = path / ADAPTER_WEIGHTS
    modules = dict(model.named_modules())
    rank = int(config.get("r", 0))
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt LoRA adapter weights {file}: {exc}") from exc
    if not shapes:
        raise CheckpointError(f"LoRA adapter weights {file} hold no tensors")
    for key, shape in shapes.items():
        name, kind = _target_of(key)
        target = modules.get(name)
        if not isinstance(target, torch.nn.Linear):
            raise CheckpointError(
                f"LoRA adapter {path} does not fit this backbone: it adapts {name!r}, "
                "which the model does not have (an adapter for another base model?)"
            )
        want = (rank, target.in_features) if kind == "lora_A" else (target.out_features, rank)
        if shape != want:
            raise CheckpointError(
                f"LoRA adapter {path} does not fit this backbone: {key} has shape {shape}, "
                f"expected {want} (an adapter for another base model?)"
            )


def _target_of(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    -> ('model.layers.0.self_attn.q_proj', 'lora_A')."""
    parts = key.split(".")
    for kind in ("lora_A", "lora_B"):
        if kind in parts:
            i = parts.index(kind)
            name = ".".join(parts[:i])
            return name.removeprefix("base_model.model."), kind
    raise CheckpointError(f"unexpected tensor {key!r} in a LoRA adapter file")
