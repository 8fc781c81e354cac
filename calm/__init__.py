"""calm: confident adaptive early-exit decoding for Hugging Face language models.

The classes that need torch are imported on first use, so that `calm --help` answers at once."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from calm.errors import CalmError, CheckpointError, InputError, ModelNotFoundError, PolicyError, UnsupportedModelError

if TYPE_CHECKING:
    from calm.checkpoints.devices import set_threads
    from calm.engine.generation import GenerationResult
    from calm.exits.policy import ExitPolicy
    from calm.model import CalmModel

__version__ = "0.1.0"

_LAZY = {
    "CalmModel": "calm.model",
    "ExitPolicy": "calm.exits.policy",
    "GenerationResult": "calm.engine.generation",
    "set_threads": "calm.checkpoints.devices",
}

__all__ = [
    "CalmModel",
    "ExitPolicy",
    "GenerationResult",
    "CalmError",
    "CheckpointError",
    "InputError",
    "ModelNotFoundError",
    "PolicyError",
    "UnsupportedModelError",
    "set_threads",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calm' has no attribute {name!r}")
