"""How long the embedded model's one-sentence summaries are: the evidence behind `calm summarize`'s default
--max-new-tokens.

The first N documents of the XSum calib split, whole (cut only to what the context holds, as `calm summarize`
does), summarised with the command line's prompt, greedy and lossless (the full model's tokens) with a budget
generous enough that almost every summary ends with the model's own EOS. Reports each summary's length in
tokens, the EOS counted (the budget a summary needs to finish with finish_reason "stop"), and the quantiles.

    python benchmarks/summary_length.py --docs 40 --max-new-tokens 160
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

import click
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.9, 0.95, 0.99)
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")  # an end mark, closing quotes or brackets, then a space or newline


def first_sentence_tokens(tokenizer, ids: tuple[int, ...], eos: set[int]) -> int | None:
    """How many of the output tokens the first sentence takes: up to the token holding its end mark, where
    the token after it starts with a space (so "£1.5m" and "U.K" do not end it), or up to and with EOS.
    None: no sentence ended within the output."""
    for n in range(1, len(ids) + 1):
        if ids[n - 1] in eos:
            return n
        if SENTENCE_END.search(tokenizer.decode(list(ids[:n]), skip_special_tokens=True)):
            return n - 1
    return None


BUDGETS = (32, 48, 64, 80, 96, 112, 128, 160)


def first_sentence_from_text(tokenizer, row: dict) -> int | None:
    """first_sentence_tokens for a report row that kept only the text: the first sentence's text (an end mark
    followed by a space or newline, or the end of an output the model ended) re-encoded; a one-sentence output
    the model ended takes its whole length with EOS. None: no sentence ended within the output."""
    text = row["summary"]
    match = re.search(r"[.!?][\"')\]]*(\s|$)", text)
    if match is None:
        return row["tokens"] if row["finish_reason"] == "stop" else None
    if match.end() == len(text) and row["finish_reason"] == "stop":
        return row["tokens"]
    return len(tokenizer.encode(text[: match.start(1)], add_special_tokens=False))


def recompute(report: dict, model_name: str) -> dict:
    """A report from before first-sentence lengths were measured, with them (re-encoded from its texts)."""
    from calm.cli.common import load_model

    tokenizer = load_model(model_name, "cpu", None).tokenizer
    rows = [{**r, "first_sentence_tokens": first_sentence_from_text(tokenizer, r)} for r in report["rows"]]
    budget = report["max_new_tokens"]
    first = np.array([r["first_sentence_tokens"] or budget + 1 for r in rows])
    return {
        **report,
        "rows": rows,
        "first_sentence_quantiles": _quantiles(first),
        "first_sentence_covered_at": {str(n): float((first <= n).mean()) for n in BUDGETS if n <= budget},
        "first_sentence_note": "first-sentence lengths re-encoded from the stored texts: "
        + " ".join(["python", *sys.argv]),
    }


def length_report(model_name: str, data: str, docs: int, max_new_tokens: int, batch_size: int) -> dict:
    import calm
    from calm.cli.common import load_model
    from calm.eval.inputs import load_documents
    from calm.eval.reporting import machine_info
    from calm.eval.summarize import document_prompts, summarize_documents

    calm.set_threads(1)
    model = load_model(model_name, "cpu", None)
    records = load_documents(data, None, limit=docs)
    prompts = document_prompts(model, records, max_new_tokens)
    t0 = time.perf_counter()
    eos = set(model.eos_token_ids)
    rows = []
    for batch in summarize_documents(model, records, None, max_new_tokens, batch_size, prompts):  # type: ignore[arg-type]
        for doc in batch:
            rows.append(
                {
                    "id": doc.id,
                    "tokens": len(doc.token_ids),
                    "first_sentence_tokens": first_sentence_tokens(model.tokenizer, doc.token_ids, eos),
                    "finish_reason": doc.finish_reason,
                    "document_tokens": doc.document_tokens,
                    "kept_tokens": doc.kept_tokens,
                    "summary": doc.summary,
                }
            )
        click.echo(f"{len(rows)}/{len(records)} documents", err=True)
    lengths = np.array([r["tokens"] for r in rows])
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    # a summary cut at the budget needs more than the budget: it counts as max_new_tokens + 1
    needed = np.array([r["tokens"] if r["finish_reason"] == "stop" else max_new_tokens + 1 for r in rows])
    quantiles = _quantiles(needed)
    # the first sentence: its tokens, or budget + 1 where none ended within the budget
    first = np.array(
        [max_new_tokens + 1 if r["first_sentence_tokens"] is None else r["first_sentence_tokens"] for r in rows]
    )
    return {
        "machine": machine_info("cpu", " ".join(["python", *sys.argv])),
        "model": model_name,
        "data": data,
        "docs": len(rows),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "wall_s": time.perf_counter() - t0,
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other jobs shared the CPU
        "stopped": len(stopped),
        "mean_tokens": float(lengths.mean()),
        "max_tokens_stopped": max((r["tokens"] for r in stopped), default=0),
        "needed_quantiles": quantiles,
        "first_sentence_quantiles": _quantiles(first),
        "first_sentence_covered_at": {str(n): float((first <= n).mean()) for n in BUDGETS if n <= max_new_tokens},
        "covered_at": {str(n): float((needed <= n).mean()) for n in BUDGETS if n <= max_new_tokens},
        "rows": rows,
    }


def _quantiles(values: np.ndarray) -> dict[str, int]:
    """For each q, the smallest budget that holds at least the share q of them."""
    ordered = np.sort(values)
    return {f"q{round(q * 100)}": int(ordered[math.ceil(q * len(ordered)) - 1]) for q in QUANTILES}


def length_markdown(report: dict) -> str:
    from calm.eval.reporting import machine_markdown

    q, f = report["needed_quantiles"], report["first_sentence_quantiles"]
    lines = [
        "# Summary lengths of the embedded model (XSum calib)",
        "",
        *machine_markdown(report["machine"]),
        f"{report['docs']} documents of `{report['data']}`, whole (cut only to what the context holds, as "
        f"`calm summarize` does), the command line's one-sentence prompt, greedy lossless decoding (the full "
        f"model's tokens), batch {report['batch_size']}, budget {report['max_new_tokens']} new tokens. "
        f'Length: the summary\'s tokens with its EOS (the budget it needs to end with finish_reason "stop"); '
        f"a summary still going at the budget counts as budget + 1.",
        "",
        f"Load average at the end: {', '.join(map(str, report['load_average']))} (the CPU is shared).",
        "",
        *([f"Note: {report['first_sentence_note']}.", ""] if report.get("first_sentence_note") else []),
        f"- {report['stopped']} of {report['docs']} ended with EOS within {report['max_new_tokens']} tokens; "
        f"mean length {report['mean_tokens']:.1f} tokens, longest that ended {report['max_tokens_stopped']}.",
        f"- Budget the whole output needs to end with EOS: median {q['q50']}, 90% {q['q90']}, 95% {q['q95']}, "
        f"99% {q['q99']} tokens (budget + 1 = not ended within the budget).",
        f"- Budget the first sentence needs (its tokens up to its end mark, or up to EOS): median {f['q50']}, "
        f"90% {f['q90']}, **95% {f['q95']}**, 99% {f['q99']} tokens (each: the smallest budget that holds that "
        "share). `calm summarize`'s default --max-new-tokens 64 holds "
        f"{report['first_sentence_covered_at'].get('64', float('nan')):.0%} of the first sentences; most outputs go "
        "on past their first sentence, and those stop at the budget whatever it is.",
        "",
        "| budget (--max-new-tokens) | outputs that end with EOS within it | first sentences that end within it |",
        "|---:|---:|---:|",
        *(
            f"| {n} | {share:.0%} | {report['first_sentence_covered_at'][n]:.0%} |"
            for n, share in report["covered_at"].items()
        ),
        "",
        "| id | tokens | first sentence | finish | document tokens | summary |",
        "|---|---:|---:|---|---:|---|",
        *(
            f"| {r['id']} | {r['tokens']} | {r['first_sentence_tokens'] or '–'} | {r['finish_reason']} | "
            f"{r['document_tokens']} | "
            f"{r['summary'].replace('|', '/').replace(chr(10), ' ')} |"
            for r in report["rows"]
        ),
        "",
    ]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", "model_name", default="smollm2")
@click.option("--data", default="../shared/data/xsum/calib.jsonl", help="JSONL documents (the calib split).")
@click.option("--docs", type=click.IntRange(min=1), default=40)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=160)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="As calm summarize's default.")
@click.option("--name", default="summary_length_smollm2")
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS))
@click.option("--from-json", "from_json", default=None, help="Add first-sentence lengths to an older report's JSON.")
def main(
    model_name: str, data: str, docs: int, max_new_tokens: int, batch_size: int, name: str, out_dir: str, from_json
) -> None:
    import json

    from calm.eval.reporting import json_safe, write_json_markdown

    if from_json:
        report = recompute(json.loads(Path(from_json).read_text()), model_name)
    else:
        report = length_report(model_name, data, docs, max_new_tokens, batch_size)
    markdown = length_markdown(report)
    files = write_json_markdown(out_dir, name, json_safe(report), markdown)
    click.echo(markdown)
    click.echo(f"wrote {files[0]} and {files[1]}")


if __name__ == "__main__":
    main()
