"""calm bench's report: bench.json (every run's times, the machine, the command) and bench.md (the table)."""

from __future__ import annotations

import math
from pathlib import Path

from calm.bench import BenchReport, BenchRow
from calm.eval.reporting import format_number, format_speedup, json_safe, machine_markdown, write_json_markdown

HEADER = (
    "| batch | config | tokens/s | ms/token | decode ms/token | prefill share | avg layers | speedup vs full | "
    "speedup vs transformers |"
)
NOTE = (
    "tokens/s: batch × new tokens / median wall time (prefill included). ms/token: median wall time / new "
    "tokens, the per-step latency each sequence sees. decode ms/token: one decode step, prefill excluded "
    "(calm's own timer). prefill share: the prompt's forward (full depth in every configuration) over the "
    "whole run, which bounds what any decode speed-up can buy. Speedups compare whole runs (prefill included)."
)


def bench_markdown(report: BenchReport) -> str:
    """The report as Markdown: the settings, one table row per batch size and configuration, the machine."""
    c = report.config
    speculative = any(not math.isnan(r.acceptance_rate) for r in report.rows)
    header, rule = HEADER, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    if speculative:
        header, rule = header + " acceptance | accepted per step |", rule + "---:|---:|"
    lines = [
        f"# calm bench: {c.model}",
        "",
        f"{c.new_tokens} new tokens per row (EOS ignored), median of {c.repeats} runs after a warm-up, "
        f"{report.num_layers} layers, prompts from {c.data or 'a built-in news paragraph'}, engine {c.engine}.",
        "",
        header,
        rule,
    ]
    lines += [_row_markdown(r, speculative) for r in report.rows]
    lines += ["", NOTE, ""]
    return "\n".join(lines + machine_markdown(report.machine))


def _row_markdown(r: BenchRow, speculative: bool) -> str:
    line = (
        f"| {r.batch_size} | {r.name} | {r.tokens_per_s:.1f} | {r.ms_per_token:.2f} | "
        f"{format_number(r.decode_ms_per_token)} | {_percent(r.prefill_share)} | {r.avg_layers:.2f} | "
        f"{format_speedup(r.speedup_vs_full)} | {format_speedup(r.speedup_vs_transformers)} |"
    )
    if speculative:
        line += f" {format_number(r.acceptance_rate)} | {format_number(r.mean_accepted_length)} |"
    return line


def _percent(share: float) -> str:
    return "–" if math.isnan(share) else f"{100 * share:.0f}%"


def write_bench(report: BenchReport, out_dir: str | Path) -> list[Path]:
    """bench.json and bench.md in out_dir, each written atomically (NaN, not measured, as null)."""
    return write_json_markdown(out_dir, "bench", json_safe(report.to_dict()), bench_markdown(report))
