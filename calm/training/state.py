"""The training state: what a resume needs to continue to the same result as an uninterrupted run.

One safetensors file (written atomically, nothing pickled): the trained tensors (`model.*`), the
optimizer's moments (`optim.<index>.<slot>`), the RNG state (`rng.torch`, `rng.cuda`) and extra tensors
such as the classifier's label counts (`extra.*`); its metadata holds the format, the step, the
optimizer's param groups and `meta` (the config's fingerprint, the number of processes, the log
history and the config). A resume must run with the saved run's settings, those in RESUME_FREE aside."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from calm.checkpoints.checkpoint import write_safetensors
from calm.errors import InputError
from calm.training.config import TrainConfig

STATE_FILE = "state.safetensors"
FORMAT = "calm-training-state"
# Fields that may change between a run and its resume without changing the result.
RESUME_FREE = ("resume", "checkpoint_every", "log_every", "device", "out", "work_dir")


def fingerprint(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE}


def check_fingerprint(stored: dict, config: TrainConfig) -> None:
    """A resume must run with the saved run's settings (those in RESUME_FREE aside)."""
    now = json.loads(json.dumps(fingerprint(config)))
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if diff:
        raise InputError(
            "cannot resume: the training settings differ from the saved run in "
            + ", ".join(f"{k} (saved {stored.get(k)!r}, now {now.get(k)!r})" for k in diff)
            + "; use the same settings, or start again without --resume"
        )


def state_meta(config: TrainConfig, num_processes: int, history: list[dict]) -> dict:
    """The `meta` entry of the state's metadata."""
    return {
        "fingerprint": fingerprint(config),
        "num_processes": num_processes,
        "history": history,
        "config": config.to_dict(),
    }


def save_state(
    path: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict,
    extra_tensors: dict[str, torch.Tensor],
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for k, v in extra_tensors.items():
        tensors[f"extra.{k}"] = v.detach().cpu().clone().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    metadata = {"format": FORMAT, "step": str(step), "meta": json.dumps(meta), "param_groups": json.dumps(groups)}
    write_safetensors(path, tensors, metadata)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"training state {path} is corrupt ({exc}); start again without --resume") from exc
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path} is not a calm training state")
    return tensors, metadata


def restore_state(tensors: dict, metadata: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the saved tensors into module and optimizer, set the RNG state, and return the extra tensors."""
    module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}


@dataclass(frozen=True)
class Resumed:
    step: int  # the step the state was saved at
    history: tuple[dict, ...]  # the log windows before it
    num_processes: int  # of the saved run


def resume(
    path: Path,
    config: TrainConfig,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    counts: dict[str, torch.Tensor],
) -> Resumed:
    """Restore the state in `path` into module, optimizer and (in place) the extra tensors `counts`."""
    tensors, metadata = load_state(path)
    meta = json.loads(metadata["meta"])
    check_fingerprint(meta.get("fingerprint", {}), config)
    extras = restore_state(tensors, metadata, module, optimizer)
    for name, value in counts.items():
        if name in extras:
            value.copy_(extras[name])
    return Resumed(int(metadata["step"]), tuple(meta.get("history", [])), meta.get("num_processes", 1))
