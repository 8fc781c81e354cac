"""The files of an eval report: eval.json, eval.md and the two plots (calm.eval.plots) of calm.eval.report."""

from __future__ import annotations

import json
from pathlib import Path

from calm.checkpoints.checkpoint import write_atomic
from calm.eval.report import FILES, EvalReport


def write_report(report: EvalReport, out_dir: str | Path) -> list[Path]:
    """eval.json, eval.md and the two plots, each written atomically."""
    from calm.eval.plots import plot_rouge_vs_layers, plot_rouge_vs_speedup

    out = Path(out_dir)
    contents = (
        json.dumps(report.to_dict(), indent=2).encode(),
        report.to_markdown().encode(),
        plot_rouge_vs_layers(report),
        plot_rouge_vs_speedup(report),
    )
    for name, data in zip(FILES, contents):
        write_atomic(out / name, data)
    return [out / name for name in FILES]
