"""`calm bench`: tokens/s and ms/token per batch size (calm.bench times, calm.eval.bench_report writes)."""

from __future__ import annotations

import click

from calm.cli.common import command_line, load_model
from calm.cli.mode_options import engine_option, speculative_options
from calm.cli.options import (
    calibrated_decay_tau_option,
    calibrated_knob_options,
    doc_tokens_option,
    int_list,
    model_options,
    policy_specs,
)

# ---- calm bench --------------------------------------------------------------------------------


@click.command(
    "bench",
    epilog="""\b
Examples:
  calm bench
  calm bench --batch-sizes 1,8,32 --new-tokens 32 --policy fixed:15 --policy softmax:0.9
  calm bench --data xsum.jsonl --policy state:0.95,classifier:0.8 --out build/bench-xsum
  calm bench --batch-sizes 1 --policy spec:15:4:classifier:0.7 --policy spec:20:2
  calm bench --batch-sizes 1,8 --mode speculative --draft-layer 15 --max-draft 4 --policy classifier:0.5
  calm bench --batch-sizes 1,8 --tolerance 0.1 --consistency risk     # the calibrated knob's policy
""",
)
@model_options
@click.option(
    "--data",
    default=None,
    metavar="FILE.jsonl",
    help="Take prompts from these documents (default: a built-in news paragraph).",
)
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option(
    "--batch-sizes", callback=int_list, default="1,8,32", show_default=True, help="Comma-separated batch sizes."
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tokens generated per row (EOS ignored).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Timed runs per configuration (median reported; one warm-up run before them).",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    callback=policy_specs,
    metavar="SPEC",
    help="Exit policy to time besides full depth, repeatable or comma-separated: fixed:LAYER, "
    "softmax:λ, state:λ or classifier:λ (λ on the schedule of --decay-tau); spec:E:K[:MEASURE:λ] "
    "for speculative decoding.",
)
@calibrated_knob_options
@calibrated_decay_tau_option
@click.option(
    "--transformers/--no-transformers",
    "with_transformers",
    default=True,
    show_default=True,
    help="Also time transformers' own generate on the same prompts.",
)
@speculative_options("--policy MEASURE:λ specs")
@doc_tokens_option
@engine_option
@click.option(
    "--out",
    default="build/bench",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for bench.json and bench.md (a scratch directory by default; the committed reports in "
    "benchmarks/results are written by make reports).",
)
def bench_command(  # long: one parameter per option of calm bench
    model_name: str,
    device: str,
    dtype: str | None,
    weights: str | None,
    data: str | None,
    field_document: str,
    batch_sizes: tuple[int, ...],
    new_tokens: int,
    repeats: int,
    policies: tuple[str, ...],
    decay_tau: float | None,
    with_transformers: bool,
    mode: str,
    lossless: bool,
    draft_layer: int | None,
    max_draft: int | None,
    lookup: bool,
    max_doc_tokens: int | None,
    engine: str,
    out: str,
    **knob: float | str | None,  # --speed, --tolerance, --consistency
) -> None:
    """Measure tokens/s and ms/token per batch size.

    Times full depth, each --policy and transformers' generate on the same prompt ids; reports the
    median of --repeats runs after a warm-up, average layers per policy, and the machine. With --mode
    speculative (or --lossless) each --policy MEASURE:λ is the draft controller of a lossless run instead.
    """
    from calm.bench import BenchConfig, bench_prompts, knob_specs, run_bench, speculative_specs
    from calm.eval.bench_report import bench_markdown, write_bench
    from calm.eval.progress import progress_bar
    from calm.eval.reporting import machine_info

    documents = _documents(data, field_document, max(batch_sizes))
    model = load_model(model_name, device, dtype, weights)
    policies, decay_tau = knob_specs(model, policies, decay_tau, **knob)  # type: ignore[arg-type]
    policies = speculative_specs(model, policies, mode, lossless, draft_layer, max_draft, lookup)
    config = BenchConfig(
        model=model_name,
        batch_sizes=batch_sizes,
        new_tokens=new_tokens,
        repeats=repeats,
        policies=policies,
        transformers=with_transformers,
        data=data,
        max_doc_tokens=max_doc_tokens,
        decay_tau=decay_tau,
        engine=engine,
    )
    with progress_bar("bench") as update:
        report = run_bench(
            model,
            bench_prompts(model, documents, max_doc_tokens, new_tokens),
            config,
            machine_info(model.device, command_line()),
            progress=update,
        )
    files = write_bench(report, out)
    click.echo(bench_markdown(report))
    click.echo("wrote " + ", ".join(str(f) for f in files), err=True)


def _documents(data: str | None, field_document: str, limit: int) -> list[str] | None:
    """The first `limit` documents of the --data file; None without one (the built-in paragraph)."""
    from calm.prompts.documents import read_jsonl

    if data is None:
        return None
    return [r.document for r in read_jsonl(data, document_field=field_document, summary_field=None, limit=limit)]
