"""`calm eval` and `calm calibrate`: the threshold sweep scored against references, and the Learn-then-Test
calibration written into a checkpoint. The work is done by calm.eval, imported inside the commands."""

from __future__ import annotations

from typing import Any

import click

from calm.cli.common import command_line, load_model
from calm.cli.mode_options import speculative_options
from calm.cli.options import (
    FiniteFloat,
    calibrated_decay_tau_option,
    calibrated_knob_options,
    decay_tau_option,
    doc_tokens_option,
    float_list,
    measure_option,
    min_exit_option,
    model_options,
    optional_int_list,
    run_options,
)
from calm.eval.grids import DEFAULT_GRID, DEFAULT_THRESHOLDS

# ---- calm eval ---------------------------------------------------------------------------------


@click.command(
    "eval",
    epilog="""\b
Examples:
  calm eval --data test.jsonl --limit 100 --out results/eval
  calm eval --model ./my-checkpoint --data test.jsonl --measure classifier --thresholds 0.9,0.8,0.7
  calm eval --data test.jsonl --limit 100 --static-layers 12,18,24 --out results/eval   # + static baselines
  calm eval --data test.jsonl --tolerance 0.1 --consistency risk       # the knob's threshold only
  accelerate launch --multi_gpu --num_processes 2 -m calm.cli.main eval --data test.jsonl
  torchrun --nproc_per_node 2 -m calm.cli.main eval --data test.jsonl     # several CPU processes
\b
Stop it at any time: run the same command again and it resumes where it stopped. Launched
as several processes, it shards the documents; process 0 writes the report.
""",
)
@model_options
@click.option(
    "--data", required=True, metavar="FILE.jsonl", help="JSONL with a document and a reference summary per line."
)
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option(
    "--field-summary", default="summary", show_default=True, help="JSONL field holding the reference summary."
)
@click.option(
    "--thresholds",
    callback=float_list,
    default=",".join(map(str, DEFAULT_THRESHOLDS)),
    show_default=True,
    help="Comma-separated thresholds λ in [0, 1] to sweep.",
)
@click.option(
    "--static-layers",
    callback=optional_int_list,
    default=None,
    metavar="K,K,...",
    help="Also run static exits: every token after the first leaves at layer K (a baseline at the same depth).",
)
@click.option(
    "--lossless-point/--no-lossless-point",
    default=True,
    show_default=True,
    help="Also run the lossless mode (exactly the full model's output) at its measured speed.",
)
@click.option(
    "--transformers/--no-transformers",
    "with_transformers",
    default=True,
    show_default=True,
    help="Also time transformers' own generate on the same batches (a baseline point).",
)
@calibrated_knob_options
@measure_option
@min_exit_option
@calibrated_decay_tau_option
@run_options
@speculative_options("--thresholds and --measure")
@doc_tokens_option
@click.option(
    "--out",
    default="results/eval",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for eval.json, eval.md, the plots and the resume cache.",
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Reuse outputs cached in --out by an earlier (interrupted) run, or start over.",
)
def eval_command(
    model_name: str, device: str, dtype: str | None, weights: str | None, out: str, resume: bool, **options: Any
) -> None:
    """Sweep exit thresholds and score quality against speed.

    For the full model, each threshold (adaptive exits; the calibration's τ by default), each static exit,
    the lossless mode and transformers' own generate, on the same batches: ROUGE-1/2/L against the
    references, D = 1 - ROUGE-L(early, full), the ROUGE-L change, average layers, prefill and decode time
    and speedups. Writes eval.json, eval.md, rouge_vs_layers.png and rouge_vs_speedup.png to --out.
    With --mode speculative (or --lossless) each λ controls the drafts of a lossless point instead."""
    from calm.eval.progress import progress_bar
    from calm.eval.shard import eval_device
    from calm.eval.sweep import run_eval
    from calm.prompts.documents import read_jsonl

    config = _eval_config(model_name, options)
    records = read_jsonl(
        config.data,
        document_field=config.document_field,
        summary_field=config.summary_field,
        require_summary=True,
        limit=config.limit,
    )
    model = load_model(model_name, eval_device(device), dtype, weights)
    with progress_bar("eval") as update:
        report = run_eval(model, records, config, out, resume=resume, command=command_line(), progress=update)
    if report is not None:
        click.echo(report.to_markdown())
        click.echo(f"wrote {out}/eval.json, eval.md, rouge_vs_layers.png, rouge_vs_speedup.png", err=True)


def _eval_config(model_name: str, o: dict[str, Any]) -> Any:
    """The EvalConfig of calm eval's options (renamed where the option and the field differ)."""
    from calm.eval.sweep import EvalConfig

    lossless = o.pop("lossless")
    return EvalConfig(
        model=model_name,
        document_field=o.pop("field_document"),
        summary_field=o.pop("field_summary"),
        with_lossless=o.pop("lossless_point"),
        min_exit_layer=o.pop("min_exit_layer"),
        mode="speculative" if lossless else o.pop("mode"),
        **{k: v for k, v in o.items() if k != "mode"},
    )


# ---- calm calibrate ----------------------------------------------------------------------------


@click.command(
    "calibrate",
    epilog="""\b
Examples:
  calm calibrate --data calib.jsonl --delta 0.1 --epsilon 0.05 --out ./smollm2-calibrated
  calm calibrate --model ./my-heads --data calib.jsonl --measure classifier --thresholds 0.95,0.9,0.8 --out ./my-heads
\b
The checkpoint written to --out holds the exit heads (if any) and the calibration table; load it
with --model and turn the knob: calm summarize --model DIR --speed 0.7 (or --tolerance 0.1).
Stop it at any time: the same command resumes from the outputs cached in --work-dir.
""",
)
@model_options
@click.option("--data", required=True, metavar="FILE.jsonl", help="Calibration documents (JSONL). Never the test set.")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option(
    "--delta",
    type=FiniteFloat(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Tolerance δ on the mean inconsistency D = 1 - ROUGE-L(early, full).",
)
@click.option(
    "--epsilon",
    type=FiniteFloat(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Allowed probability ε that the certified threshold breaks δ.",
)
@click.option(
    "--method",
    type=click.Choice(["hb", "hoeffding"]),
    default="hb",
    show_default=True,
    help="p-values: Hoeffding-Bentkus or Hoeffding.",
)
@click.option(
    "--thresholds",
    callback=float_list,
    default=",".join(map(str, DEFAULT_GRID)),
    show_default=True,
    help="Threshold grid, most conservative (highest) first.",
)
@click.option(
    "--consistency",
    type=click.Choice(["textual", "risk"]),
    default="textual",
    show_default=True,
    help="The objective the summary line reports: textual (D = 1 - ROUGE-L(early, full)) or risk "
    "(max(0, R_full - R_early), R = ROUGE-L against the references). The table always holds both "
    "(risk where every document has a reference summary).",
)
@measure_option
@min_exit_option
@decay_tau_option
@run_options
@doc_tokens_option
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="calm checkpoint directory to write (heads + calibration).",
)
@click.option(
    "--work-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where the per-example outputs are cached (default: OUT/calibration-work).",
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Reuse outputs cached by an earlier (interrupted) run, or start over.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the calibration of a checkpoint that already has one (the shipped one included).",
)
def calibrate_command(
    model_name: str,
    device: str,
    dtype: str | None,
    weights: str | None,
    data: str,
    field_document: str,
    delta: float,
    epsilon: float,
    method: str,
    thresholds: tuple[float, ...],
    consistency: str,
    measure: str | None,
    min_exit_layer: int | None,
    decay_tau: float,
    limit: int | None,
    max_new_tokens: int,
    batch_size: int,
    max_doc_tokens: int | None,
    out: str,
    work_dir: str | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Certify the fastest exit threshold with Learn-then-Test: per document D = 1 - ROUGE-L(early, full) and
    the risk max(0, R_full - R_early) against the references, tested from the most conservative threshold
    down (Hoeffding-Bentkus): mean loss <= δ with probability >= 1 - ε."""
    from calm.eval.calibrate import CalibrateConfig, calibrate, check_target
    from calm.eval.progress import progress_bar
    from calm.eval.shard import eval_device
    from calm.prompts.documents import read_jsonl

    config = CalibrateConfig(
        model=model_name,
        data=data,
        delta=delta,
        epsilon=epsilon,
        method=method,
        thresholds=thresholds,
        measure=measure,
        min_exit_layer=min_exit_layer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        document_field=field_document,
        limit=limit,
        max_doc_tokens=max_doc_tokens,
        decay_tau=decay_tau,
        consistency=consistency,
    )
    check_target(out, overwrite)
    records = read_jsonl(data, document_field=field_document, limit=limit)
    model = load_model(model_name, eval_device(device), dtype, weights)
    with progress_bar("calibrating") as update:
        run = calibrate(model, records, config, work_dir or f"{out}/calibration-work", resume, update)
    if run is None:
        return
    model.calibration = run.checkpoint_table(config)
    model.save_pretrained(out, extra={"calibrate_command": command_line()})
    click.echo(f"{run.table_markdown()}\n{run.summary}")
    click.echo(f"wrote {out}", err=True)
