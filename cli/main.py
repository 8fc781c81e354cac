"""The `calm` command line. It only parses arguments and calls library code (calm.eval, calm.bench);
calm's own errors become a one-line message and a non-zero exit status.

torch and transformers are imported inside the commands, never at the top of a cli module, so that
`calm --help` and `calm --version` answer at once; `calm train` is loaded only when it is run."""

from __future__ import annotations

import importlib
import logging
import shlex
from typing import Any

import click

from calm import __version__
from calm.cli.generate import generate, summarize
from calm.cli.options import (
    FiniteFloat,
    decay_tau_option,
    doc_tokens_option,
    engine_option,
    float_list,
    int_list,
    measure_option,
    min_exit_option,
    model_options,
    policy_specs,
    run_options,
    speculative_options,
)
from calm.errors import CalmError
from calm.eval.grids import DEFAULT_GRID, DEFAULT_THRESHOLDS

# Commands whose module is imported only when they run. Their one-line help is repeated here for
# `calm --help`; tests/test_cli_errors.py checks that it matches the command's own.
LAZY_COMMANDS = {
    "train": ("calm.cli.train", "train_command",
              "Train exit heads by self-distillation (or CALM-fine-tune the backbone) and write a calm checkpoint."),
}


class StderrHandler(logging.Handler):
    """calm's log warnings (a cut document, a partial output file) as lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


class CalmGroup(click.Group):
    """Keeps the command line for reports, loads lazy commands on demand, shows calm's warnings on stderr,
    and turns calm's errors into one-line messages."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["calm.command"] = shlex.join(["calm", *args])
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attribute, _ = LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list without importing the lazy commands' modules."""
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [(name, self.commands[name].get_short_help_str(limit) if name in self.commands
                 else LAZY_COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        logger = logging.getLogger("calm")
        handler = StderrHandler(logging.WARNING)
        logger.addHandler(handler)
        try:
            return super().invoke(ctx)
        except CalmError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None
        finally:
            logger.removeHandler(handler)


@click.group(cls=CalmGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="calm")
def cli() -> None:
    """Confident adaptive early-exit decoding (CALM) for Hugging Face language models.

    \b
    Examples:
      calm summarize article.txt --show-exits
      calm generate "Write a haiku about autumn." --threshold 0.9
      calm eval --data test.jsonl --thresholds 1.0,0.9,0.8 --out results/eval
      calm bench --batch-sizes 1,8 --policy softmax:0.9
    """


cli.add_command(summarize)
cli.add_command(generate)


def _load_model(name: str, device: str | None, dtype: str | None) -> Any:
    from transformers.utils import logging as hf_logging

    from calm.model import CalmModel

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return CalmModel.from_pretrained(name, device=device, dtype=dtype)


def _command() -> str:
    return click.get_current_context().meta.get("calm.command", "calm")


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
@model_options
@click.option("--data", required=True, metavar="FILE.jsonl",
              help="JSONL with a document and a reference summary per line.")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option("--field-summary", default="summary", show_default=True,
              help="JSONL field holding the reference summary.")
@click.option("--thresholds", callback=float_list, default=",".join(map(str, DEFAULT_THRESHOLDS)),
              show_default=True, help="Comma-separated thresholds λ in [0, 1] to sweep.")
@measure_option
@min_exit_option
@decay_tau_option
@run_options
@speculative_options
@doc_tokens_option
@click.option("--out", default="results/eval", show_default=True, type=click.Path(file_okay=False),
              help="Directory for eval.json, eval.md, the plots and the resume cache.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse outputs cached in --out by an earlier (interrupted) run, or start over.")
def eval_command(model_name, device, dtype, data, field_document, field_summary, thresholds, measure,
                 min_exit_layer, decay_tau, limit, max_new_tokens, batch_size, mode, lossless, draft_layer, max_draft,
                 max_doc_tokens, out, resume) -> None:
    """Sweep exit thresholds and score quality against speed.

    For the full model, each threshold and transformers' own generate, on the same batches: ROUGE-1/2/L
    against the references, D = 1 - ROUGE-L(early, full), the ROUGE-L change, average layers, and
    wall-clock speedups. Writes eval.json, eval.md, rouge_vs_layers.png and rouge_vs_speedup.png to --out.
    With --mode speculative (or --lossless) each λ controls the drafts of a lossless point instead.
    """
    from calm.data import read_jsonl
    from calm.eval.progress import progress_bar
    from calm.eval.sweep import EvalConfig, eval_device, run_eval

    config = EvalConfig(model=model_name, data=data, thresholds=thresholds, measure=measure,
                        min_exit_layer=min_exit_layer or 1, decay_tau=decay_tau, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, document_field=field_document, summary_field=field_summary,
                        limit=limit, max_doc_tokens=max_doc_tokens, mode="speculative" if lossless else mode,
                        draft_layer=draft_layer, max_draft=max_draft)
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
@model_options
@click.option("--data", required=True, metavar="FILE.jsonl", help="Calibration documents (JSONL). Never the test set.")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option("--delta", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="Tolerance δ on the mean inconsistency D = 1 - ROUGE-L(early, full).")
@click.option("--epsilon", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Allowed probability ε that the certified threshold breaks δ.")
@click.option("--method", type=click.Choice(["hb", "hoeffding"]), default="hb", show_default=True,
              help="p-values: Hoeffding-Bentkus or Hoeffding.")
@click.option("--thresholds", callback=float_list, default=",".join(map(str, DEFAULT_GRID)), show_default=True,
              help="Threshold grid, most conservative (highest) first.")
@measure_option
@min_exit_option
@decay_tau_option
@run_options
@doc_tokens_option
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
    from calm.data import read_jsonl
    from calm.eval.calibrate import CalibrateConfig, calibrate
    from calm.eval.progress import progress_bar
    from calm.eval.sweep import eval_device

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
    model.calibration = run.checkpoint_table(config)
    model.save_pretrained(out, extra={"calibrate_command": _command()})
    click.echo(run.table_markdown())
    click.echo(run.summary)
    click.echo(f"wrote {out}", err=True)


# ---- calm bench --------------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  calm bench
  calm bench --batch-sizes 1,8,32 --new-tokens 32 --policy fixed:15 --policy softmax:0.9
  calm bench --data xsum.jsonl --policy state:0.95,classifier:0.8 --out benchmarks/results
  calm bench --batch-sizes 1 --policy spec:15:4:classifier:0.7 --policy spec:20:2
  calm bench --batch-sizes 1,8 --mode speculative --draft-layer 15 --max-draft 4 --policy classifier:0.5
""")
@model_options
@click.option("--data", default=None, metavar="FILE.jsonl", help="Take prompts from these documents "
                                                                 "(default: a built-in news paragraph).")
@click.option("--field-document", default="document", show_default=True, help="JSONL field holding the document.")
@click.option("--batch-sizes", callback=int_list, default="1,8,32", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated per row (EOS ignored).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per configuration (median reported; one warm-up run before them).")
@click.option("--policy", "policies", multiple=True, callback=policy_specs, metavar="SPEC",
              help="Exit policy to time besides full depth, repeatable or comma-separated: fixed:LAYER, "
                   "softmax:λ, state:λ or classifier:λ (λ on the schedule of --decay-tau); spec:E:K[:MEASURE:λ] "
                   "for speculative decoding.")
@decay_tau_option
@click.option("--transformers/--no-transformers", "with_transformers", default=True, show_default=True,
              help="Also time transformers' own generate on the same prompts.")
@speculative_options
@doc_tokens_option
@engine_option
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Directory for bench.json and bench.md.")
def bench(model_name, device, dtype, data, field_document, batch_sizes, new_tokens, repeats, policies, decay_tau,
          with_transformers, mode, lossless, draft_layer, max_draft, max_doc_tokens, engine, out) -> None:
    """Measure tokens/s and ms/token per batch size.

    Times full depth, each --policy and transformers' generate on the same prompt ids; reports the
    median of --repeats runs after a warm-up, average layers per policy, and the machine. With --mode
    speculative (or --lossless) each --policy MEASURE:λ is the draft controller of a lossless run instead.
    """
    from calm.bench import BenchConfig, bench_prompts, run_bench, speculative_specs
    from calm.data import read_jsonl
    from calm.eval.bench_report import bench_markdown, write_bench
    from calm.eval.progress import progress_bar
    from calm.eval.reporting import machine_info

    documents = None
    if data is not None:
        documents = [r.document for r in read_jsonl(data, document_field=field_document, summary_field=None,
                                                    limit=max(batch_sizes))]
    model = _load_model(model_name, device, dtype)
    policies = speculative_specs(model, policies, mode, lossless, draft_layer, max_draft)
    config = BenchConfig(model=model_name, batch_sizes=batch_sizes, new_tokens=new_tokens, repeats=repeats,
                         policies=policies, transformers=with_transformers, data=data, max_doc_tokens=max_doc_tokens,
                         decay_tau=decay_tau, engine=engine)
    with progress_bar("bench") as update:
        report = run_bench(model, bench_prompts(model, documents, max_doc_tokens, new_tokens), config,
                           machine_info(model.device, _command()), progress=update)
    files = write_bench(report, out)
    click.echo(bench_markdown(report))
    click.echo("wrote " + ", ".join(str(f) for f in files), err=True)


# ---- calm info ---------------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  calm info
  calm info ./my-heads
  calm info HuggingFaceTB/SmolLM2-135M-Instruct
""")
@click.argument("model_name", default="smollm2", metavar="[MODEL]")
def info(model_name) -> None:
    """Show what MODEL is: the backbone and where it comes from, the exit heads, the LoRA adapter
    and the calibration table (threshold, mean D, p-value, certified at δ).

    MODEL is 'smollm2' (default), a .gguf file, a local transformers directory, a calm checkpoint
    directory, or a hub id. The backbone is loaded on the CPU.
    """
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from calm.info import describe, info_tables, info_text

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    described = describe(model_name)
    console = Console()
    if console.is_terminal:
        for table in info_tables(described):
            console.print(table)
    else:
        click.echo(info_text(described))


def main() -> None:
    cli(prog_name="calm")


if __name__ == "__main__":
    main()
