"""calm checkpoints: a directory with `calm_config.json` (backbone reference, heads config,
calibration table) and `exit_heads.safetensors`. Safetensors only: nothing is unpickled and no
code from a checkpoint is ever run. Files are written atomically, the config last."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from calm.calibration import CalibrationTable
from calm.errors import CheckpointError
from calm.heads import ExitHeads, HeadsConfig

CONFIG_FILE = "calm_config.json"
HEADS_FILE = "exit_heads.safetensors"
FORMAT = "calm-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointConfig:
    backbone: str                       # what load_backbone resolves: an alias, path or hub id
    heads: HeadsConfig | None = None
    calibration: CalibrationTable | None = None
    extra: dict | None = None           # training metadata (command, data, steps)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "backbone": self.backbone,
                "heads": self.heads.to_dict() if self.heads else None,
                "calibration": self.calibration.to_dict() if self.calibration else None, "extra": self.extra or {}}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


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
        os.chmod(tmp, 0o666 & ~_umask())             # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Tensors as a safetensors file, written atomically."""
    write_atomic(path, save_tensors(tensors, metadata=metadata))


def save_checkpoint(path: str | Path, config: CheckpointConfig, heads: ExitHeads | None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if heads is not None:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
        write_safetensors(path / HEADS_FILE, tensors, {"format": FORMAT})
    write_atomic(path / CONFIG_FILE, json.dumps(config.to_dict(), indent=2).encode())


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
        raise CheckpointError(f"{file} has checkpoint version {data.get('version')!r}; this calm reads version {VERSION}")
    if not isinstance(data.get("backbone"), str) or not data["backbone"]:
        raise CheckpointError(f"{file} names no backbone model")
    try:
        heads = HeadsConfig(**data["heads"]) if data.get("heads") else None
    except TypeError as exc:
        raise CheckpointError(f"{file}: bad heads config: {exc}") from exc
    return CheckpointConfig(backbone=data["backbone"], heads=heads, calibration=_calibration(file, data.get("calibration")),
                            extra=data.get("extra") or {})


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
        raise CheckpointError(f"exit heads in {path} were trained for {config.num_layers} layers x {config.hidden_size} "
                              f"hidden, but the backbone has {num_layers} x {hidden_size}")
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
