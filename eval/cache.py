"""Per-example results of a sweep, kept under OUT/cache so an interrupted `calm eval` resumes.

One JSONL file per sweep point (`full.jsonl`, `softmax@0.9.jsonl`, ...; with several processes,
`full.rank1.jsonl` and so on), appended and fsync'ed after every batch. `meta.json` records what
the outputs depend on (model, data, fields, max_new_tokens, prompt); a cache made with different
settings is refused rather than mixed in. A line cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from calm.checkpoints.checkpoint import write_atomic
from calm.errors import InputError

META_FILE = "meta.json"


class ResultCache:
    def __init__(self, directory: Path, rank: int | None = None):
        self.directory = Path(directory)
        self.rank = rank  # None: one process, files without a rank suffix

    @classmethod
    def open(
        cls, directory: Path, meta: dict, resume: bool, rank: int | None = None, is_main: bool = True
    ) -> ResultCache:
        """The cache in `directory` for a run with `meta`. Every process refuses a cache of another run
        (so none waits on a main process that failed); the main one clears it (no resume) and writes meta."""
        cache = cls(directory, rank)
        meta_path = cache.directory / META_FILE
        if resume and meta_path.is_file():
            old = _read_meta(meta_path)
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if changed:
                raise InputError(
                    f"{cache.directory.parent} holds results of a different run (differs in "
                    f"{', '.join(changed)}); pass --no-resume to start over, or choose another --out"
                )
        if is_main:
            if not resume:
                for path in cache.directory.glob("*.jsonl"):
                    path.unlink()
            write_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
        return cache

    def done(self, point: str) -> dict[str, dict]:
        """Rows already computed for a point, by example id, from every process's file; the latest row of an
        example wins (one redone after an interruption, timed with the other points of its run)."""
        rows: dict[str, dict] = {}
        for path in sorted(self.directory.glob(f"{point}.jsonl")) + sorted(self.directory.glob(f"{point}.rank*.jsonl")):
            for row in _read_rows(path):
                rows[row["id"]] = row
        return rows

    def append(self, point: str, rows: list[dict]) -> None:
        """Add rows to this process's file for `point`, durably (fsync) before returning."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{point}.jsonl" if self.rank is None else f"{point}.rank{self.rank}.jsonl"
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with open(self.directory / name, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by a crash: start a fresh one
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _read_meta(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable cache {path} ({exc}); pass --no-resume to start over") from exc
    return data if isinstance(data, dict) else {}


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by an interruption: recomputed
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows
