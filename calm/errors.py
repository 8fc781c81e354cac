"""Errors raised by calm. Every user-facing failure is one of these, with a message that says what to do."""


class CalmError(Exception):
    """Base class of calm's errors."""


class InputError(CalmError, ValueError):
    """A prompt, document or argument that calm cannot use."""


class PolicyError(CalmError, ValueError):
    """An exit policy that does not fit the model (threshold or layer out of range)."""


class ModelNotFoundError(CalmError, FileNotFoundError):
    """A model name, path or hub id that does not resolve to a model."""


class CheckpointError(CalmError, ValueError):
    """A calm checkpoint that is missing, incomplete, corrupt or not safetensors."""


class UnsupportedModelError(CalmError, TypeError):
    """A transformers model whose architecture has no calm adapter."""


class CalibrationError(CalmError, ValueError):
    """A calibration table that cannot answer what was asked (e.g. risk consistency from a table without it)."""
