"""Where `calm eval` and `calm calibrate` run under `accelerate launch` or torchrun: this process's rank,
device and share of the documents (one process: rank 0 of 1)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    from accelerate import PartialState


@dataclass(frozen=True)
class Shard:
    """This process's place among `accelerate launch` processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    state: PartialState | None = None  # set when world > 1

    @classmethod
    def current(cls) -> Shard:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU ranks would not sync
        return cls(state.process_index, state.num_processes, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """The device to load the model on: this process's own under accelerate, unless one is named."""
        if self.state is not None and requested in (None, "auto"):
            return str(self.state.device)
        return requested

    def split(self, records: list[T]) -> list[T]:
        if self.state is None:
            return records
        with self.state.split_between_processes(records) as mine:
            return list(mine)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def eval_device(requested: str | None) -> str | None:
    """The device `calm eval` loads the model on: under accelerate, each process's own (unless named)."""
    return Shard.current().device(requested)
