"""The decoding options of calm's commands: --engine, and the lossless and speculative switches (--mode,
--lossless, --draft-layer, --max-draft, --lookup; calm.speculative.lossless decides what they run)."""

from __future__ import annotations

from collections.abc import Callable

import click

from calm.cli.options import F

# calm.engine.generation.ENGINE_SPECS, without importing torch
ENGINES = ("auto", "dynamic", "static", "static+compile")


def engine_option(f: F) -> F:
    return click.option(
        "--engine",
        type=click.Choice(ENGINES),
        default="auto",
        show_default=True,
        help="Decode step: dynamic (skips exited rows' work; auto on CPU), static (no host sync "
        "inside a step; auto on GPU), static+compile (the static step through torch.compile).",
    )(f)


def speculative_options(controller: str) -> Callable[[F], F]:
    """--mode, --lossless, --draft-layer, --max-draft, --lookup (calm.speculative.drafting and .lossless);
    `controller` names the options of this command that set the draft controller (they differ: --threshold,
    --thresholds, --policy)."""
    return lambda f: _speculative_options(f, controller, lossless_default=False)


def generation_mode_options(f: F) -> F:
    """speculative_options for summarize and generate, where a run with no exit knob is lossless."""
    return _speculative_options(f, "--threshold and --measure", lossless_default=True)


def _speculative_options(f: F, controller: str, lossless_default: bool) -> F:
    f = click.option(
        "--max-draft",
        type=click.IntRange(min=1),
        default=None,
        help="Speculative: most tokens drafted per step (default: the stored measurement, else 4).",
    )(f)
    f = click.option(
        "--draft-layer",
        type=click.IntRange(min=0),
        default=None,
        help="Speculative: layers 1..E draft; 0: drafts are looked up in the context (n-grams of the "
        "prompt and output), and every layer verifies (default: the stored measurement, else half the layers).",
    )(f)
    f = click.option(
        "--lookup",
        is_flag=True,
        help="Speculative: draft tokens looked up in the context (n-grams of the prompt and output) "
        "first; a step where none is found drafts from layer E.",
    )(f)
    f = click.option(
        "--lossless",
        is_flag=True,
        help="Exactly the full model's output: speculative decoding where this checkpoint measured it "
        "faster, else the full model (with a note).",
    )(f)
    if lossless_default:
        f = click.option(
            "--twin/--no-twin",
            default=None,
            help="Lossless: the model's 4-bit twin drafts where the context offers nothing to copy (default: as the "
            "checkpoint's stored measurement). Needs about 0.75 bytes per weight more memory.",
        )(f)
        return click.option(
            "--mode",
            type=click.Choice(["calm", "speculative", "lossless"]),
            default=None,
            help="lossless (the default unless --speed, --tolerance, --threshold, --measure, --min-exit-layer "
            "or --decay-tau is given): exactly the full model's output, as fast as this checkpoint measured. "
            "calm: early exit (approximate). speculative: early exits draft, the remaining layers verify "
            f"(lossless; {controller} control the draft length).",
        )(f)
    return click.option(
        "--mode",
        type=click.Choice(["calm", "speculative"]),
        default="calm",
        show_default=True,
        help="calm: early exit. speculative: early exits draft, the remaining layers verify "
        f"(lossless; {controller} control the draft length).",
    )(f)
