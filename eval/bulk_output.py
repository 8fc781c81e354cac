"""--output of a bulk run (`calm summarize`, `calm generate`): rows are written as they finish, an interrupted run
resumes, and several processes (`accelerate launch`) each write their share.

Rows go into FILE.partial (process R of W > 1: FILE.partial-R-of-W), one JSON object per line, flushed as each
finishes. A run that finds such a file keeps its rows and skips their ids: it resumes. When every process is
done, process 0 writes FILE whole, in input order, atomically, and the partial files go. A reader sees the old
FILE or the whole new one, never half of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from calm.checkpoints.checkpoint import write_atomic
from calm.errors import InputError


def partial_path(path: Path, rank: int = 0, world: int = 1) -> Path:
    suffix = ".partial" if world == 1 else f".partial-{rank}-of-{world}"
    return path.with_name(path.name + suffix)


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a partial file (a last line cut by the interruption is dropped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class BulkOutput:
    """This process's partial file: the ids it already holds (done), and write(row) for each new row."""

    def __init__(self, path: str | Path, resume: bool = True, rank: int = 0, world: int = 1) -> None:
        self.path, self.rank, self.world = Path(path), rank, world
        self.partial = partial_path(self.path, rank, world)
        kept = read_rows(self.partial) if resume and self.partial.is_file() else []
        self.done = {str(row.get("id")) for row in kept}
        self.resumed = self.rows = len(kept)
        self.file: IO[str] = self.partial.open("w", encoding="utf-8")
        for row in kept:  # rewritten whole, so a cut last line does not stay in the file
            self._write(row)

    def write(self, row: dict) -> None:
        self._write(row)
        self.rows += 1

    def _write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def merge(self, ids: Sequence[str]) -> int:
        """Process 0, once every process has closed its file: FILE from all partial files, in the order of `ids`
        (the input's); the partial files are removed. -> rows written."""
        parts = [partial_path(self.path, r, self.world) for r in range(self.world)]
        rows = {str(row.get("id")): row for part in parts if part.is_file() for row in read_rows(part)}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise InputError(
                f"{len(missing)} rows are missing from the partial files of {self.path} (first: {missing[0]})"
            )
        text = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in ids)
        write_atomic(self.path, text.encode("utf-8"))
        for part in parts:
            part.unlink(missing_ok=True)
        return len(ids)


def check_unique(ids: Sequence[str]) -> None:
    """Resuming and merging go by id: a bulk run with --output needs each input's id once."""
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise InputError(f"the id {i!r} appears twice in the input; --output resumes and merges rows by id")
        seen.add(i)


class BulkJob:
    """A bulk run's share of the inputs (this process's, without the rows an interrupted run already wrote) and
    its --output (None: no file; then only one process may run)."""

    def __init__(self, output: str | None, ids: Sequence[str], resume: bool) -> None:
        from calm.eval.shard import Shard

        self.shard, self.ids = Shard.current(), list(ids)
        if output is None and self.shard.world > 1:
            raise InputError(
                "under accelerate launch, give --output FILE: process 0 collects every process's rows there"
            )
        if output is not None:
            check_unique(self.ids)
        self.out = BulkOutput(output, resume, self.shard.rank, self.shard.world) if output else None

    @property
    def resumed(self) -> int:
        return self.out.resumed if self.out is not None else 0

    def todo(self, count: int) -> list[int]:
        """Indices of the inputs this process still has to run."""
        mine = self.shard.split(list(range(count)))
        done = self.out.done if self.out is not None else set()
        return [i for i in mine if self.ids[i] not in done]

    def write(self, row: dict) -> None:
        if self.out is not None:
            self.out.write(row)

    def finish(self) -> int | None:
        """Close this process's file; once all are done, process 0 writes FILE. -> rows in FILE (None: not here)."""
        if self.out is None:
            return None
        self.out.close()
        self.shard.barrier()
        return self.out.merge(self.ids) if self.shard.is_main else None

    def abandon(self) -> str | None:
        """The run stopped: where its rows are, for the message (None: no file)."""
        if self.out is None:
            return None
        self.out.close()
        return f"the {self.out.rows} rows written so far are in {self.out.partial}"
