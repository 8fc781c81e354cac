"""Per-layer agreement with the final layer, before vs after training exit heads.

For the model's own greedy summaries of the first N documents of a JSONL file (the test split by
default), the fraction of positions where argmax of layer k's next-token prediction equals the
final layer's argmax: through the backbone's plain final norm + LM head ("before"), and through
the checkpoint's trained low-rank map ("after"); plus the exit classifier's AUC against the
"after" label. Writes JSON and Markdown to benchmarks/results/.

    python benchmarks/agreement.py calm/assets/smollm2 --docs 100
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from calm.errors import CalmError
from calm.eval.reporting import write_json_markdown
from calm.training import agreement_markdown, agreement_report

RESULTS = Path(__file__).resolve().parent / "results"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default="../shared/data/xsum/test.jsonl", help="JSONL documents (never the training split).")
@click.option("--docs", "num_docs", type=int, default=100, help="Documents to summarise.")
@click.option("--summary-tokens", type=int, default=48)
@click.option("--max-doc-tokens", type=int, default=256)
@click.option("--gen-batch-size", type=int, default=16)
@click.option("--device", default=None, help="cpu or cuda [default: cuda if available].")
@click.option("--name", default=None, help="Output file stem [default: agreement_<checkpoint dir name>].")
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS))
@click.option(
    "--cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSONL keeping the generated summaries between reports (they do not depend on the heads).",
)
def main(checkpoint, data, num_docs, summary_tokens, max_doc_tokens, gen_batch_size, device, name, out_dir, cache):
    try:
        report = agreement_report(
            checkpoint,
            data,
            num_docs,
            summary_tokens=summary_tokens,
            max_doc_tokens=max_doc_tokens,
            gen_batch_size=gen_batch_size,
            device=device,
            cache=cache,
        )
    except CalmError as exc:
        raise click.ClickException(str(exc)) from exc
    report["command"] = " ".join(["python", *sys.argv])
    stem = name or f"agreement_{Path(checkpoint).resolve().name}"
    files = write_json_markdown(out_dir, stem, report, agreement_markdown(report))
    click.echo(agreement_markdown(report))
    click.echo(f"wrote {files[0]} and {files[1]}")


if __name__ == "__main__":
    main()
