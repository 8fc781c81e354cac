"""`calm train`: the command line of calm.training (exit heads by self-distillation, or CALM fine-tuning)."""

from __future__ import annotations

import shlex
from typing import Any

import click
import torch

from calm.cli.options import Device, FiniteFloat, model_name_option
from calm.errors import CalmError
from calm.training import MODES, TrainConfig, train


def _command_line(ctx: click.Context) -> str:
    """The command as run: its path and every option given explicitly (not defaults), shell-quoted."""
    from click.core import ParameterSource

    words = ctx.command_path.split()
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source in (None, ParameterSource.DEFAULT) or not param.opts:
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            words += [flag] if value else []
        elif isinstance(value, (tuple, list)):
            for item in value:
                words += [flag, str(item)]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


@click.command(
    "train",
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="""\b
Examples:
  calm train --data ../shared/data/xsum/train.jsonl --out my-heads
  calm train --data train.jsonl --data wiki.txt --steps 1200 --max-docs 2000 --out my-heads --threads 1
  calm train --data train.jsonl --out my-heads --resume              # continue an interrupted run
  calm train --mode finetune --data train.jsonl --out my-calm-model  # CALM fine-tuning (a GPU helps)
  calm train --mode lora --data train.jsonl --lora-layers 10-29 --out my-lora   # LoRA + exit heads
\b
Then: calm calibrate --model my-heads --data calib.jsonl --out my-heads
""",
)
@click.option(
    "--model",
    default="smollm2",
    metavar="MODEL",
    callback=model_name_option,
    help="Backbone: 'smollm2', a local model dir, .gguf, hub id, or a calm checkpoint.",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Training data: .jsonl (document, optional summary) or .txt files; repeat the option.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output calm checkpoint directory.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="heads",
    help="heads: train exit heads on a frozen backbone; finetune: CALM fine-tuning of the backbone; "
    "lora: CALM fine-tuning with LoRA adapters and the exit heads, distilled from the original model.",
)
@click.option("--steps", type=click.IntRange(min=1), default=TrainConfig.steps, help="Optimizer steps in all.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=TrainConfig.batch_size,
    help="Positions per step (heads) or sequences per step (finetune, lora).",
)
@click.option(
    "--layers-per-step",
    type=click.IntRange(min=1),
    default=TrainConfig.layers_per_step,
    help="Exit layers sampled per position and step (heads), or per step (lora).",
)
@click.option(
    "--lr",
    type=FiniteFloat(min=0.0, min_open=True),
    default=None,
    help="Peak learning rate [default: 3e-3 heads, 2e-5 finetune, 3e-4 lora].",
)
@click.option("--rank", type=click.IntRange(min=1), default=TrainConfig.rank, help="Rank of the low-rank exit maps.")
@click.option(
    "--lora-rank",
    type=click.IntRange(min=1),
    default=TrainConfig.lora_rank,
    help="lora: rank of the backbone's adapters.",
)
@click.option(
    "--lora-layers",
    default=None,
    metavar="FIRST-LAST",
    help="lora: decoder layers to adapt, 'first-last' (0-based) [default: all].",
)
@click.option(
    "--anchor",
    type=FiniteFloat(min=0.0),
    default=TrainConfig.anchor,
    help="lora: weight of the final layer's KL to the original model (keeps full depth in place).",
)
@click.option(
    "--doc-positions",
    type=click.IntRange(min=1),
    default=TrainConfig.doc_positions,
    help="lora: random document positions per sequence that train besides the summary.",
)
@click.option(
    "--min-exit-layer",
    type=click.IntRange(min=1),
    default=TrainConfig.min_exit_layer,
    help="Train heads for exit layers from this one up (lower layers never exit by the classifier).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=TrainConfig.seed,
    help="Seed of the data order, the sampled summaries and the initial heads.",
)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the work dir.")
@click.option(
    "--summaries-per-doc",
    type=click.IntRange(min=1),
    default=TrainConfig.summaries_per_doc,
    help="Own summaries per training document (the first greedy, more sampled).",
)
@click.option(
    "--max-docs",
    type=click.IntRange(min=0),
    default=None,
    help="Use only the first N documents of the JSONL data [default: all].",
)
@click.option(
    "--summary-tokens",
    type=click.IntRange(min=1),
    default=TrainConfig.summary_tokens,
    help="Longest summary the model writes of a training document, in tokens.",
)
@click.option(
    "--max-doc-tokens",
    type=click.IntRange(min=1),
    default=TrainConfig.max_doc_tokens,
    help="Documents are cut to their first N tokens before prompting.",
)
@click.option(
    "--gen-batch-size",
    type=click.IntRange(min=1),
    default=TrainConfig.gen_batch_size,
    help="Documents summarised together while writing the training summaries.",
)
@click.option(
    "--chunk-tokens",
    type=click.IntRange(min=1),
    default=TrainConfig.chunk_tokens,
    help="Length of the chunks the .txt files are split into, in tokens.",
)
@click.option(
    "--max-chunks",
    type=click.IntRange(min=0),
    default=TrainConfig.max_chunks,
    help="Text chunks used (spread over the text files).",
)
@click.option(
    "--positions-per-chunk",
    type=click.IntRange(min=1),
    default=TrainConfig.positions_per_chunk,
    help="Random positions taken from each text chunk as training positions.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=TrainConfig.checkpoint_every,
    help="Write the training state (atomically) every N steps, for --resume.",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    default=TrainConfig.log_every,
    help="Average and report the losses every N steps.",
)
@click.option("--device", type=Device(), default="auto", help="auto (a GPU if there is one), cpu or cuda.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Summary cache and training state [default: OUT/training].",
)
@click.option("--no-classifier", is_flag=True, help="Train the low-rank maps only.")
@click.option("--no-transform", is_flag=True, help="Train the exit classifier only.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch [default: torch's choice]; 1 can be faster on a busy machine.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(
    data: tuple[str, ...], no_classifier: bool, no_transform: bool, threads: int | None, quiet: bool, **options: Any
) -> None:
    """Train exit heads by self-distillation (or CALM-fine-tune the backbone) and write a calm checkpoint."""
    if threads:
        torch.set_num_threads(threads)
    try:
        # every other option is the TrainConfig field of its name, checked there
        config = TrainConfig(data=tuple(data), classifier=not no_classifier, transform=not no_transform, **options)
        result = train(config, command=_command_line(click.get_current_context()), progress=not quiet)
    except CalmError as exc:
        raise click.ClickException(str(exc)) from exc
    t = result.timings
    losses = " ".join(f"{k}={v:.4g}" for k, v in result.final_losses.items() if isinstance(v, float))
    click.echo(f"wrote {result.out} ({result.steps} steps, {result.num_positions} positions; {losses})")
    click.echo(
        f"time: load {t['load']:.1f}s, summaries {t['summaries']:.1f}s ({result.summaries_generated} new, "
        f"{t['per_summary']:.2f}s each), hidden states {t['features']:.1f}s, training {t['train']:.1f}s "
        f"({t['per_step']:.3f}s/step), total {t['total']:.1f}s"
    )
