"""The `calm` command line: the command group and `calm info`; the other commands live in calm.cli.generate,
evaluate, bench and train. It only parses arguments and calls library code (calm.eval, calm.bench);
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
from calm.cli.bench import bench_command
from calm.cli.evaluate import calibrate_command, eval_command
from calm.cli.generate import generate, summarize
from calm.cli.options import model_name_option, threads_option
from calm.errors import CalmError

# Commands whose module is imported only when they run. Their one-line help is repeated here for
# `calm --help`; tests/test_cli_errors.py checks that it matches the command's own.
LAZY_COMMANDS = {
    "serve": ("calm.cli.serve", "serve_command", "Serve MODEL over the OpenAI API with continuous batching."),
    "train": (
        "calm.cli.train",
        "train_command",
        "Train exit heads by self-distillation (or CALM-fine-tune the backbone) and write a calm checkpoint.",
    ),
}


INTERRUPTED = 130  # 128 + SIGINT


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
        rows = [
            (name, self.commands[name].get_short_help_str(limit) if name in self.commands else LAZY_COMMANDS[name][2])
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        logger = logging.getLogger("calm")
        handler = StderrHandler(logging.WARNING)
        logger.addHandler(handler)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT, not click's 1 and "Aborted!"
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
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


for command in (summarize, generate, eval_command, calibrate_command, bench_command):
    cli.add_command(command)


# ---- calm info ---------------------------------------------------------------------------------


@cli.command(
    epilog="""\b
Examples:
  calm info
  calm info ./my-heads
  calm info HuggingFaceTB/SmolLM2-135M-Instruct
"""
)
@click.argument("model_name", default="smollm2", metavar="[MODEL]", callback=model_name_option)
@threads_option
def info(model_name: str) -> None:
    """Show what MODEL is: the backbone and where it comes from, the exit heads, the LoRA adapter
    and the calibration table (threshold, mean D, p-value, certified at δ).

    MODEL is 'smollm2' (default), a .gguf file, a local transformers directory, a calm checkpoint
    directory, or a hub id. The backbone is loaded on the CPU.
    """
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from calm.cli.info import describe, info_tables, info_text

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
