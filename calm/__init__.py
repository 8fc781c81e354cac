"""calm: confident adaptive early-exit decoding for Hugging Face language models."""

from calm.errors import CalmError, CheckpointError, InputError, ModelNotFoundError, PolicyError, UnsupportedModelError
from calm.generation import GenerationResult
from calm.model import CalmModel
from calm.policy import ExitPolicy

__version__ = "0.1.0"

__all__ = ["CalmModel", "ExitPolicy", "GenerationResult", "CalmError", "CheckpointError", "InputError",
           "ModelNotFoundError", "PolicyError", "UnsupportedModelError"]
