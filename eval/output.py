"""JSONL output written safely: rows go to a temporary file beside the target as they arrive, and the
file is moved onto the target only when the run completes, so a reader sees the old file or the whole
new one, never half of it. An interrupted run leaves its rows in TARGET.partial instead."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from calm.checkpoints.checkpoint import _umask

logger = logging.getLogger("calm")


class JsonlOutput:
    """One JSON object per line into a temporary file; commit() moves it onto `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.resolve().parent)
        self.tmp = Path(tmp)
        self.file: IO[str] = os.fdopen(fd, "w", encoding="utf-8")
        self.rows = 0

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.rows += 1

    def commit(self) -> None:
        self._close()
        os.replace(self.tmp, self.path)

    def abandon(self) -> Path | None:
        """Keep the rows written so far as PATH.partial (None if there were none)."""
        self._close()
        if self.rows == 0:
            self.tmp.unlink(missing_ok=True)
            return None
        partial = self.path.with_name(self.path.name + ".partial")
        os.replace(self.tmp, partial)
        return partial

    def _close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions


@contextmanager
def jsonl_output(path: str | Path | None) -> Iterator[JsonlOutput | None]:
    """A JsonlOutput for `path` (None: no file), committed when the block ends, kept as .partial if it fails."""
    if path is None:
        yield None
        return
    out = JsonlOutput(path)
    try:
        yield out
    except BaseException:
        partial = out.abandon()
        if partial is not None:
            logger.warning(f"the run stopped: the {out.rows} rows written so far are in {partial}")
        raise
    out.commit()
