"""EngineOptions: how the decode step runs (engine, compile, sync_every), as generate() and the commands
take it. GenerationConfig checks the values when a generation is set up."""

from __future__ import annotations

from dataclasses import dataclass

from calm.engine.generation import engine_settings


@dataclass(frozen=True)
class EngineOptions:
    kind: str = "auto"  # "dynamic", "static", or auto: dynamic on a CPU, static on a GPU (resolve_engine)
    compile: bool | str = False  # static engine: the step through torch.compile; a string names the backend
    sync_every: int = 8  # static engine: ask "have all rows finished?" every this many tokens

    @classmethod
    def from_spec(cls, spec: str) -> EngineOptions:
        """The options of a command-line engine spec: auto, dynamic, static or static+compile."""
        settings = engine_settings(spec)
        return cls(settings["engine"], settings["compile"])

    @property
    def spec(self) -> str:
        """The command-line spec of these options (a named compile backend reads as +compile)."""
        return f"{self.kind}+compile" if self.compile else self.kind

    @property
    def settings(self) -> tuple[str, bool | str, int]:
        """GenerationConfig's engine, compile and sync_every."""
        return self.kind, self.compile, self.sync_every

    @property
    def chosen(self) -> bool:
        """Whether an engine was picked rather than left to auto (compiling picks the static one)."""
        return self.kind != "auto" or bool(self.compile)
