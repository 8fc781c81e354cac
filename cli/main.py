"""The `calm` command line. It only parses arguments and calls library code (calm.eval, calm.bench);
calm's own errors become a one-line message and a non-zero exit status."""

from __future__ import annotations

import shlex

import click
from transformers.utils import logging as hf_logging

from calm import __version__
from calm.bench import BenchConfig, bench_prompts, parse_policy_spec, run_bench, write_bench
from calm.data import read_jsonl
from calm.errors import CalmError
from calm.generation import ENGINE_SPECS
from calm.eval.inputs import load_documents
from calm.eval.knob import check_knobs, resolve_policy
from calm.eval.progress import progress_bar
from calm.eval.render import SummaryPrinter, run_footer
from calm.eval.summarize import summarize_documents
from calm.cli.train import train_command
from calm.eval.calibrate import DEFAULT_GRID, CalibrateConfig, calibrate
from calm.eval.sweep import DEFAULT_THRESHOLDS, EvalConfig, eval_device, run_eval
from calm.model import CalmModel
from calm.policy import ExitPolicy

MODEL_HELP = ("Model: 'smollm2' (the embedded SmolLM2-135M-Instruct), a .gguf file, a local transformers "
              "directory, a calm checkpoint directory, or a hub id")


class CalmGroup(click.Group):
    """Keeps the command line for reports, and turns calm's errors into one-line messages."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["calm.command"] = shlex.join(["calm", *args])
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CalmError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None


@click.group(cls=CalmGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="calm")
def cli() -> None:
    """Confident adaptive early-exit decoding (CALM) for Hugging Face language models.

    \b
    Examples:
      calm summarize article.txt --show-exits
      calm eval --data test.jsonl --thresholds 1.0,0.9,0.8 --out results/eval
      calm bench --batch-sizes 1,8 --policy softmax:0.9
    """


# ---- shared options ----------------------------------------------------------------------------

def _model_options(f):
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Weight dtype (default: float32).")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="Torch device: auto (GPU if any), cpu, cuda, cuda:1, ...")(f)
    return click.option("--model", "model_name", default="smollm2", show_default=True, metavar="MODEL",
                        help=MODEL_HELP + ".")(f)


def _measure_option(f):
    return click.option("--measure", type=click.Choice(["softmax", "state", "classifier"]), default=None,
                        help="Confidence measure (default: classifier if the model has trained exit heads, "
                             "else softmax).")(f)


def _min_exit_option(f):
    return click.option("--min-exit-layer", type=click.IntRange(min=1), default=None,
                        help="No token exits below this layer (default: 1).")(f)


def _decay_tau_option(f):
    return click.option("--decay-tau", type=click.FloatRange(min=0.0), default=ExitPolicy.decay_tau,
                        show_default=True,
                        help="τ of CALM's decaying threshold λ(t) = 0.9·λ + 0.1·λ·exp(−τ·t/N); 0 keeps λ "
                             "fixed.")(f)


def _run_options(f):
    f = click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N documents.")(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Documents generated together.")(f)
    return click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                        help="Longest summary, in tokens.")(f)


def _engine_option(f):
    return click.option("--engine", type=click.Choice(ENGINE_SPECS), default="auto", show_default=True,
                        help="Decode step: dynamic (skips exited rows' work; auto on CPU), static (no host sync "
                             "inside a step; auto on GPU), static+compile (the static step through torch.compile).")(f)


def _doc_tokens_option(f):
    return click.option("--max-doc-tokens", type=click.IntRange(min=1), default=None,
                        help="Cut each document to its first N tokens before prompting (default: whole).")(f)


def _float_list(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 1.0,0.9,0.8, got {value!r}") from None


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,8,32, got {value!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return values


def _policy_specs(ctx, param, value: tuple[str, ...]) -> tuple[str, ...]:
    specs = tuple(s.strip() for v in value for s in v.split(",") if s.strip())
    for spec in specs:
        try:
            parse_policy_spec(spec)
        except CalmError as exc:
            raise click.BadParameter(str(exc)) from None
    return specs


def _load_model(name: str, device: str | None, dtype: str | None):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return CalmModel.from_pretrained(name, device=device, dtype=dtype)


def _command() -> str:
    return click.get_current_context().meta.get("calm.command", "calm")


# ---- calm summarize ----------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  calm summarize article.txt
  calm summarize --text "The council approved a plan ..." --threshold 0.9 --show-exits
  calm summarize xsum.jsonl --limit 20 --json > summaries.jsonl
  cat article.txt | calm summarize - --speed 0.7
""")
@click.argument("file", required=False, metavar="[FILE | -]")
@click.option("--text", default=None, help="Summarise this text instead of a file.")
@_model_options
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Exit confidence λ in [0, 1]: lower exits earlier (faster, riskier).")
@_measure_option
@_min_exit_option
@click.option("--speed", type=click.FloatRange(0.0, 1.0), default=None,
              help="Speed knob from the model's calibration: 0 = most careful, 1 = fastest certified.")
@click.option("--tolerance", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Risk tolerance δ: the fastest threshold the calibration certifies for it.")
@_run_options
@click.option("--show-exits", is_flag=True, help="Colour every token by its exit layer (plain [layer] marks "
                                                  "when not on a terminal) and show the average depth.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per document: id, summary, avg_layers, "
                                                      "exit_layers, timings.")
@click.option("--field-document", default="document", show_default=True,
              help="JSONL field holding the document text.")
@_engine_option
def summarize(file, text, model_name, device, dtype, threshold, measure, min_exit_layer, speed, tolerance,
              max_new_tokens, batch_size, limit, show_exits, as_json, field_document, engine) -> None:
    """Summarise documents with early exit.

    FILE is a JSONL file (one {"id": ..., "document": ...} per line) or a plain text file (one
    document); - reads either from stdin. Without --threshold, --speed or --tolerance the model runs
    at full depth, unless it carries a calibration (then --speed 0.5).
    """
    records = load_documents(file, text, document_field=field_document, limit=limit)
    check_knobs(threshold, speed, tolerance)
    model = _load_model(model_name, device, dtype)
    resolved = resolve_policy(model, threshold, measure, min_exit_layer, speed, tolerance)
    printer = SummaryPrinter(model.tokenizer, show_exits=show_exits, as_json=as_json, titled=len(records) > 1)
    docs = []
    with progress_bar("summarizing", total=len(records)) as update:
        for batch in summarize_documents(model, records, resolved.policy, max_new_tokens, batch_size, engine):
            for doc in batch:
                printer.print(doc)
            docs += batch
            update(len(docs), len(records))
    click.echo(run_footer(docs, resolved.description), err=True)


# ---- calm eval ---------------------------------------------------------------------------------

@cli.command("eval", epilog="""\b
Examples:
  calm eval --data test.jsonl --limit 100 --out results/eval
  calm eval --model ./my-checkpoint --data test.jsonl --measure classifier --thresholds 0.9,0.8,0.7
  accelerate launch --multi_gpu --num_processes 2 -m calm.cli.main eval --data test.jsonl
  torchrun --nproc_per_node 2 -m calm.cli.main eval --data test.jsonl     # several CPU processes
\b
Stop it at any time: run the same command again and it resumes where it stopped. Launched
as several processes, it shards the documents; process 0 writes the report.
""")
@_model_options
@click.option("--data", required=True, metavar="FILE.jsonl",
              help="JSONL with a document and a reference summary per line.")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option("--field-summary", default="summary", show_default=True,
              help="JSONL field holding the reference summary.")
@click.option("--thresholds", callback=_float_list, default=",".join(map(str, DEFAULT_THRESHOLDS)),
              show_default=True, help="Comma-separated thresholds λ in [0, 1] to sweep.")
@_measure_option
@_min_exit_option
@_decay_tau_option
@_run_options
@_doc_tokens_option
@click.option("--out", default="results/eval", show_default=True, type=click.Path(file_okay=False),
              help="Directory for eval.json, eval.md, the plots and the resume cache.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse outputs cached in --out by an earlier (interrupted) run, or start over.")
def eval_command(model_name, device, dtype, data, field_document, field_summary, thresholds, measure,
                 min_exit_layer, decay_tau, limit, max_new_tokens, batch_size, max_doc_tokens, out, resume) -> None:
    """Sweep exit thresholds and score quality against speed.

    For the full model, each threshold and transformers' own generate, on the same batches: ROUGE-1/2/L
    against the references, D = 1 - ROUGE-L(early, full), the ROUGE-L change, average layers, and
    wall-clock speedups. Writes eval.json, eval.md, rouge_vs_layers.png and rouge_vs_speedup.png to --out.
    """
    config = EvalConfig(model=model_name, data=data, thresholds=thresholds, measure=measure,
                        min_exit_layer=min_exit_layer or 1, decay_tau=decay_tau, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, document_field=field_document, summary_field=field_summary,
                        limit=limit, max_doc_tokens=max_doc_tokens)
    records = read_jsonl(data, document_field=field_document, summary_field=field_summary, require_summary=True,
                         limit=limit)
    model = _load_model(model_name, eval_device(device), dtype)
    with progress_bar("eval") as update:
        report = run_eval(model, records, config, out, resume=resume, command=_command(), progress=update)
    if report is not None:
        click.echo(report.to_markdown())
        click.echo(f"wrote {out}/eval.json, eval.md, rouge_vs_layers.png, rouge_vs_speedup.png", err=True)


# ---- calm calibrate ----------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  calm calibrate --data calib.jsonl --delta 0.1 --epsilon 0.05 --out ./smollm2-calibrated
  calm calibrate --model ./my-heads --data calib.jsonl --measure classifier --thresholds 0.95,0.9,0.8 --out ./my-heads
\b
The checkpoint written to --out holds the exit heads (if any) and the calibration table; load it
with --model and turn the knob: calm summarize --model DIR --speed 0.7 (or --tolerance 0.1).
Stop it at any time: the same command resumes from the outputs cached in --work-dir.
""")
@_model_options
@click.option("--data", required=True, metavar="FILE.jsonl", help="Calibration documents (JSONL). Never the test set.")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="Tolerance δ on the mean inconsistency D = 1 - ROUGE-L(early, full).")
@click.option("--epsilon", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Allowed probability ε that the certified threshold breaks δ.")
@click.option("--method", type=click.Choice(["hb", "hoeffding"]), default="hb", show_default=True,
              help="p-values: Hoeffding-Bentkus or Hoeffding.")
@click.option("--thresholds", callback=_float_list, default=",".join(map(str, DEFAULT_GRID)), show_default=True,
              help="Threshold grid, most conservative (highest) first.")
@_measure_option
@_min_exit_option
@_decay_tau_option
@_run_options
@_doc_tokens_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="calm checkpoint directory to write (heads + calibration).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Where the per-example outputs are cached (default: OUT/calibration-work).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse outputs cached by an earlier (interrupted) run, or start over.")
def calibrate_command(model_name, device, dtype, data, field_document, delta, epsilon, method, thresholds, measure,
                      min_exit_layer, decay_tau, limit, max_new_tokens, batch_size, max_doc_tokens, out, work_dir, resume) -> None:
    """Certify the fastest exit threshold with Learn-then-Test.

    Runs the full model and every threshold of the grid on the calibration documents, measures per
    example D = 1 - ROUGE-L(early, full), and tests from the most conservative threshold down with
    Hoeffding-Bentkus p-values: the result holds mean D <= δ with probability >= 1 - ε.
    """
    config = CalibrateConfig(model=model_name, data=data, delta=delta, epsilon=epsilon, method=method,
                             thresholds=thresholds, measure=measure, min_exit_layer=min_exit_layer or 1,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, document_field=field_document,
                             limit=limit, max_doc_tokens=max_doc_tokens, decay_tau=decay_tau)
    records = read_jsonl(data, document_field=field_document, limit=limit)
    model = _load_model(model_name, eval_device(device), dtype)
    with progress_bar("calibrating") as update:
        run = calibrate(model, records, config, work_dir or f"{out}/calibration-work", resume, update)
    if run is None:
        return
    model.calibration = run.to_checkpoint_dict(config)
    model.save(out, extra={"calibrate_command": _command()})
    click.echo(run.table_markdown())
    click.echo(run.summary)
    click.echo(f"wrote {out}", err=True)


# ---- calm bench --------------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  calm bench
  calm bench --batch-sizes 1,8,32 --new-tokens 32 --policy fixed:15 --policy softmax:0.9
  calm bench --data xsum.jsonl --policy state:0.95,classifier:0.8 --out benchmarks/results
""")
@_model_options
@click.option("--data", default=None, metavar="FILE.jsonl", help="Take prompts from these documents "
                                                                 "(default: a built-in news paragraph).")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option("--batch-sizes", callback=_int_list, default="1,8,32", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated per row (EOS ignored).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per configuration (median reported; one warm-up run before them).")
@click.option("--policy", "policies", multiple=True, callback=_policy_specs, metavar="SPEC",
              help="Exit policy to time besides full depth, repeatable or comma-separated: fixed:LAYER, "
                   "softmax:λ, state:λ or classifier:λ.")
@click.option("--transformers/--no-transformers", "with_transformers", default=True, show_default=True,
              help="Also time transformers' own generate on the same prompts.")
@_doc_tokens_option
@_engine_option
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Directory for bench.json and bench.md.")
def bench(model_name, device, dtype, data, field_document, batch_sizes, new_tokens, repeats, policies,
          with_transformers, max_doc_tokens, engine, out) -> None:
    """Measure tokens/s and ms/token per batch size.

    Times full depth, each --policy and transformers' generate on the same prompt ids; reports the
    median of --repeats runs after a warm-up, average layers per policy, and the machine.
    """
    documents = None
    if data is not None:
        documents = [r.document for r in read_jsonl(data, document_field=field_document, summary_field=None,
                                                    limit=max(batch_sizes))]
    config = BenchConfig(model=model_name, batch_sizes=batch_sizes, new_tokens=new_tokens, repeats=repeats,
                         policies=policies, transformers=with_transformers, data=data, max_doc_tokens=max_doc_tokens,
                         engine=engine)
    model = _load_model(model_name, device, dtype)
    with progress_bar("bench") as update:
        report = run_bench(model, bench_prompts(documents, model.tokenizer, max_doc_tokens), config,
                           command=_command(), progress=update)
    files = write_bench(report, out)
    click.echo(report.to_markdown())
    click.echo("wrote " + ", ".join(str(f) for f in files), err=True)


cli.add_command(train_command)


def main() -> None:
    cli(prog_name="calm")


if __name__ == "__main__":
    main()
