"""calm.eval: what the `calm` commands run, as library code.

- inputs: documents from a JSONL file, a text file, stdin or a string.
- summarize: summaries of documents in batches, with exit layers per token.
- render: summaries coloured by exit layer (rich) or annotated in plain text.
- output: JSONL rows written atomically.
- rouge: ROUGE-1/2/L F1 with rouge-score.
- sweep: the threshold sweep of `calm eval` (resumable, shardable with accelerate).
- point: one point of the sweep; report: its scores and eval.md; report_files: eval.json, eval.md and the
  two plots (plots).
- bench_report: calm bench's bench.json and bench.md.
- reporting: what every report shares (machine info, number formats, the atomic JSON + Markdown writer).

May import all of calm (the training package included), never calm.cli.

The names below are imported on first use (they need torch), so the CLI starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from calm.eval.inputs import load_documents
    from calm.eval.summarize import DocumentSummary, summarize_documents
    from calm.eval.sweep import EvalConfig, run_eval

_LAZY = {
    "load_documents": "calm.eval.inputs",
    "DocumentSummary": "calm.eval.summarize",
    "summarize_documents": "calm.eval.summarize",
    "EvalConfig": "calm.eval.sweep",
    "run_eval": "calm.eval.sweep",
}

__all__ = ["DocumentSummary", "EvalConfig", "load_documents", "run_eval", "summarize_documents"]  # the names of _LAZY


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calm.eval' has no attribute {name!r}")
