"""calm checkpoints: a directory with `calm_config.json` (backbone reference, heads config,
calibration table), `exit_heads.safetensors`, and optionally the backbone itself (a transformers
directory in safetensors, under the subdirectory the config names). Safetensors only: nothing is
unpickled and no code from a checkpoint is ever run. Files are written atomically, the config last.

The backbone is named one of four ways (`backbone_kind` in the config): a calm alias ("smollm2"),
a hub id, a local path, or "included" (a directory inside the checkpoint, relative to it). A
checkpoint that names its backbone may hold a LoRA adapter for it (peft's `adapter_config.json` and
`adapter_model.safetensors`, calm.checkpoints.lora), merged into the backbone at load.

Saving and loading run a list of steps over the parts a checkpoint holds (`SAVE_STEPS`, `LOAD_STEPS`),
so a new part is one writer and one loader."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from calm.adapters import adapter_for
from calm.calibration.table import CalibrationTable
from calm.checkpoints import lora
from calm.checkpoints.loading import ALIASES, HUB_ID, load_backbone
from calm.checkpoints.quiet import quiet_transformers
from calm.errors import CheckpointError
from calm.exits.heads import ExitHeads, HeadsConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONFIG_FILE = "calm_config.json"
HEADS_FILE = "exit_heads.safetensors"
BACKBONE_DIR = "backbone"
FORMAT = "calm-checkpoint"
VERSION = 1
ALIAS, HUB, PATH, INCLUDED = "alias", "hub", "path", "included"
BACKBONE_KINDS = (ALIAS, HUB, PATH, INCLUDED)


@dataclass(frozen=True)
class CheckpointConfig:
    backbone: str  # what load_backbone resolves: an alias, path or hub id, or a dir inside
    heads: HeadsConfig | None = None
    calibration: CalibrationTable | None = None
    extra: dict | None = None  # training metadata (command, data, steps)
    backbone_kind: str | None = None  # one of BACKBONE_KINDS; None: inferred when saved or read

    def to_dict(self) -> dict:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "backbone": self.backbone,
            "heads": self.heads.to_dict() if self.heads else None,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "extra": self.extra or {},
        }
        if self.backbone_kind is not None:
            data["backbone_kind"] = self.backbone_kind
        return data


@dataclass(frozen=True)
class Components:
    """What a checkpoint holds besides its config. The backbone (model, tokenizer) is written only
    when the config says it is included; `adapter` is the checkpoint directory whose LoRA adapter is
    merged into the model (its files go with a checkpoint that names the backbone)."""

    model: PreTrainedModel | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    heads: ExitHeads | None = None
    adapter: Path | None = None

    def backbone(self) -> PreTrainedModel:
        """The backbone model; loading always has one."""
        if self.model is None:
            raise CheckpointError("no backbone model was loaded")
        return self.model


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


# ---- atomic writers -------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path so that a reader sees the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Tensors as a safetensors file, written atomically."""
    write_atomic(path, save_tensors(tensors, metadata=metadata))


@quiet_transformers()
def save_backbone(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, target: Path) -> None:
    """Replace target with the model (and tokenizer) saved by transformers in safetensors."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    old = target.with_name(target.name + ".old")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- naming the backbone --------------------------------------------------------------------------


def backbone_kind(ref: str, checkpoint: str | Path | None = None) -> str:
    """How `ref` names a backbone: a calm alias, a directory inside `checkpoint`, a local path or a hub id."""
    path = Path(ref).expanduser()
    if ref in ALIASES:
        return ALIAS
    if checkpoint is not None and not path.is_absolute() and (Path(checkpoint) / path).is_dir():
        return INCLUDED
    if path.exists() or path.is_absolute() or not HUB_ID.match(ref):
        return PATH
    return HUB


def name_backbone(ref: str, checkpoint: str | Path) -> str:
    """`ref` as a checkpoint in `checkpoint` names it: aliases and hub ids as given, local paths
    relative to the checkpoint when inside it, else absolute."""
    path = Path(ref).expanduser()
    if ref in ALIASES or not path.exists():
        return ref
    try:
        return str(path.resolve().relative_to(Path(checkpoint).resolve()))
    except ValueError:
        return str(path.resolve())


def backbone_location(path: str | Path, config: CheckpointConfig) -> str:
    """What load_backbone is given for the backbone of the checkpoint in `path`."""
    if config.backbone_kind != INCLUDED:
        return config.backbone
    location = Path(path) / config.backbone
    if not (location / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint {path} says its backbone is included in {config.backbone}/, but "
            "that directory holds no transformers model (config.json is missing)"
        )
    return str(location)


# ---- saving ---------------------------------------------------------------------------------------


def _write_backbone(path: Path, config: CheckpointConfig, parts: Components) -> None:
    if config.backbone_kind == INCLUDED and parts.model is not None:
        save_backbone(parts.model, parts.tokenizer, path / config.backbone)


def check_adapter_target(path: str | Path, adapter: Path | None, include_backbone: bool) -> None:
    """Refuse a save that would leave a LoRA adapter in `path` that is not this model's, or one that
    the included (already merged) backbone would get a second time."""
    path = Path(path)
    if not lora.has_adapter(path):
        return
    if include_backbone:
        raise CheckpointError(
            f"{path} holds a LoRA adapter, which loading would merge into the included backbone a "
            "second time; save into a directory without one"
        )
    if adapter is None or adapter.resolve() != path.resolve():
        raise CheckpointError(
            f"{path} holds a LoRA adapter that this model does not have; save into another "
            f"directory, or delete {lora.ADAPTER_CONFIG} and {lora.ADAPTER_WEIGHTS} there first"
        )


def _write_adapter(path: Path, config: CheckpointConfig, parts: Components) -> None:
    if config.backbone_kind == INCLUDED or parts.adapter is None or parts.adapter.resolve() == path.resolve():
        return
    for name in (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG):  # weights first: the config marks it complete
        write_atomic(path / name, (parts.adapter / name).read_bytes())


def _write_heads(path: Path, config: CheckpointConfig, parts: Components) -> None:
    if parts.heads is not None:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in parts.heads.state_dict().items()}
        write_safetensors(path / HEADS_FILE, tensors, {"format": FORMAT})


SaveStep = Callable[[Path, CheckpointConfig, Components], None]
SAVE_STEPS: tuple[SaveStep, ...] = (_write_backbone, _write_adapter, _write_heads)


def save_checkpoint(
    path: str | Path,
    config: CheckpointConfig,
    heads: ExitHeads | None = None,
    backbone: tuple[PreTrainedModel, Any] | None = None,
    adapter: Path | None = None,
) -> None:
    """Write the parts, then the config. `backbone` (model, tokenizer) is saved when the config's
    backbone_kind is 'included'; otherwise the LoRA adapter files in the directory `adapter` are copied
    along. A config without a backbone_kind gets the one its reference has."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, tokenizer = backbone if backbone is not None else (None, None)
    parts = Components(model=model, tokenizer=tokenizer, heads=heads, adapter=adapter)
    for step in SAVE_STEPS:
        step(path, config, parts)
    if config.backbone_kind is None:
        config = replace(config, backbone_kind=backbone_kind(config.backbone, path))
    backbone_location(path, config)  # an included backbone must be there before the config
    write_atomic(path / CONFIG_FILE, json.dumps(config.to_dict(), indent=2).encode())


def store_extra(path: str | Path, key: str, value: dict) -> None:
    """Set extra[key] in a checkpoint's config file, leaving every other field (and file) as it is."""
    read_config(path)  # a readable checkpoint first
    file = Path(path) / CONFIG_FILE
    data = json.loads(file.read_text(encoding="utf-8"))
    data["extra"] = {**(data.get("extra") or {}), key: value}
    write_atomic(file, json.dumps(data, indent=2).encode())


# ---- reading and loading --------------------------------------------------------------------------


def read_config(path: str | Path) -> CheckpointConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a calm checkpoint: {CONFIG_FILE} is missing")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint config {file}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a calm checkpoint config (format field missing or wrong)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{file} has checkpoint version {data.get('version')!r}; this calm reads version {VERSION}"
        )
    if not isinstance(data.get("backbone"), str) or not data["backbone"]:
        raise CheckpointError(f"{file} names no backbone model")
    kind = data.get("backbone_kind") or backbone_kind(data["backbone"], path)
    if kind not in BACKBONE_KINDS:
        raise CheckpointError(f"{file}: unknown backbone_kind {kind!r}; expected one of {', '.join(BACKBONE_KINDS)}")
    return CheckpointConfig(
        backbone=data["backbone"],
        heads=_heads_config(file, data.get("heads")),
        calibration=_calibration(file, data.get("calibration")),
        extra=data.get("extra") or {},
        backbone_kind=kind,
    )


def _heads_config(file: Path, heads: dict | None) -> HeadsConfig | None:
    try:
        return HeadsConfig(**heads) if heads else None
    except TypeError as exc:
        raise CheckpointError(f"{file}: bad heads config: {exc}") from exc


def _calibration(file: Path, table: dict | None) -> CalibrationTable | None:
    if table is None:
        return None
    try:
        if not isinstance(table, dict):
            raise ValueError(f"expected an object, got {type(table).__name__}")
        return CalibrationTable.from_dict(table)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: unreadable calibration table ({exc}); run calm calibrate again") from exc


def load_heads(path: str | Path, config: HeadsConfig, num_layers: int, hidden_size: int) -> ExitHeads:
    """Exit heads from a checkpoint, checked against the backbone they will run on."""
    file = Path(path) / HEADS_FILE
    if (config.num_layers, config.hidden_size) != (num_layers, hidden_size):
        raise CheckpointError(
            f"exit heads in {path} were trained for {config.num_layers} layers x {config.hidden_size} "
            f"hidden, but the backbone has {num_layers} x {hidden_size}"
        )
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} declares exit heads but {HEADS_FILE} is missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt exit heads file {file}: {exc}") from exc
    heads = ExitHeads(config)
    expected = {k: v.shape for k, v in heads.state_dict().items()}
    got = {k: v.shape for k, v in tensors.items()}
    if expected != got:
        raise CheckpointError(f"exit heads file {file} does not match its config: expected {expected}, found {got}")
    heads.load_state_dict(tensors)
    return heads.eval()


def with_adapter(path: str | Path, model: PreTrainedModel) -> PreTrainedModel:
    """The backbone with the LoRA adapter of the checkpoint in `path` merged in, when it holds one."""
    return lora.merge_adapter(model, path) if lora.has_adapter(path) else model


def _merge_adapter(path: Path, config: CheckpointConfig, parts: Components) -> Components:
    if not lora.has_adapter(path):
        return parts
    return replace(parts, model=with_adapter(path, parts.backbone()), adapter=path)


def _load_heads(path: Path, config: CheckpointConfig, parts: Components) -> Components:
    if config.heads is None:
        return parts
    adapter = adapter_for(parts.backbone())
    return replace(parts, heads=load_heads(path, config.heads, adapter.num_layers, adapter.hidden_size))


LoadStep = Callable[[Path, CheckpointConfig, Components], Components]
LOAD_STEPS: tuple[LoadStep, ...] = (_merge_adapter, _load_heads)  # in order, after the backbone


def load_parts(path: str | Path, config: CheckpointConfig, backbone: Components) -> Components:
    """Run the load steps of the checkpoint in `path` over an already loaded backbone."""
    parts = backbone
    for step in LOAD_STEPS:
        parts = step(Path(path), config, parts)
    return parts


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[CheckpointConfig, Components, str]:
    """The config, the loaded parts and where the backbone was loaded from."""
    config = read_config(path)
    location = backbone_location(path, config)
    loaded = load_backbone(location, dtype=dtype, device=device)
    return config, load_parts(path, config, Components(loaded.model, loaded.tokenizer)), location


def default_checkpoint(name: str) -> Path | None:
    """The shipped heads and calibration for a built-in alias, if any are packaged."""
    from importlib.resources import files

    if name not in ALIASES:
        return None
    path = Path(str(files("calm") / "assets" / name))
    return path if is_checkpoint(path) else None
