"""The options objects CalmModel.generate takes, one per concern (SamplingConfig, EngineOptions,
SpeculativeOptions), merged with the keyword shortcuts it also takes (do_sample=, compile=, mode=, ...)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from calm.engine.options import EngineOptions
from calm.engine.sampling import SamplingConfig
from calm.errors import InputError
from calm.speculative.options import SpeculativeOptions

Options = TypeVar("Options", SamplingConfig, EngineOptions, SpeculativeOptions)


def with_shortcuts(name: str, given: Options | None, default: Options, **shortcuts: Any) -> Options:
    """The options object `given`, else `default` with the shortcuts that were given (None: not given).
    A shortcut beside an object must agree with it: two different values are refused, not ranked."""
    shortcuts = {key: value for key, value in shortcuts.items() if value is not None}
    if given is None:
        return replace(default, **shortcuts)
    for key, value in shortcuts.items():
        if getattr(given, key) != value:
            raise InputError(
                f"{name}= says {key}={getattr(given, key)!r} but {key}={value!r} was also given; give one of them"
            )
    return given


def sampling_options(given: SamplingConfig | None, **shortcuts: Any) -> SamplingConfig:
    return with_shortcuts("sampling", given, SamplingConfig(), **shortcuts)


def engine_options(engine: str | EngineOptions, **shortcuts: Any) -> EngineOptions:
    """engine= as an EngineOptions, or a name ("auto", "dynamic", "static") with compile= and sync_every=."""
    if isinstance(engine, str):
        return with_shortcuts("engine", None, EngineOptions(engine), **shortcuts)
    return with_shortcuts("engine", engine, EngineOptions(), **shortcuts)


def speculative_options(given: SpeculativeOptions | None, **shortcuts: Any) -> SpeculativeOptions:
    return with_shortcuts("speculative", given, SpeculativeOptions(), **shortcuts)
