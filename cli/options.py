"""Option types and shared options of the `calm` commands. Values are checked here, at parse time, so
that a bad one fails in a line before any model is loaded. Nothing here imports torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from calm.checkpoints.devices import HELP as DEVICE_HELP
from calm.checkpoints.devices import check_device
from calm.errors import CalmError, InputError
from calm.exits.policy import ExitPolicy

F = Callable[..., Any]

MODEL_HELP = (
    "Model: 'smollm2' (the embedded SmolLM2-135M-Instruct), a .gguf file, a local transformers "
    "directory, a calm checkpoint directory, or a hub id"
)


class FiniteFloat(click.FloatRange):
    """A float, optionally in a range, that refuses nan and inf (click's FloatRange lets nan through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid float.", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class Device(click.ParamType):
    """A device name checked against this machine: 'cuda' without a GPU fails here, not in torch."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_device(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


def finite(text: str) -> float:
    """A float from text; ValueError for non-numbers, nan and inf."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text.strip()} is not a finite number")
    return number


def float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(finite(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated finite numbers such as 1.0,0.9,0.8, got {value!r}"
        ) from None


def int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,8,32, got {value!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return values


def optional_int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """int_list for an option that may be left out (nothing: an empty tuple)."""
    return () if value is None else int_list(ctx, param, value)


def policy_specs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from calm.bench import parse_run_spec

    specs = tuple(s.strip() for v in value for s in v.split(",") if s.strip())
    for spec in specs:
        if not all(_finite_or_not_a_number(part) for part in spec.split(":")[1:]):
            raise click.BadParameter(f"bad policy {spec!r}: the threshold must be a finite number")
        try:
            parse_run_spec(spec)
        except CalmError as exc:
            raise click.BadParameter(str(exc)) from None
    return specs


def _finite_or_not_a_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return True  # not a number at all: parse_policy_spec says what is wrong


def output_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A file to write: its directory must exist, and it must not be a directory itself."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise click.BadParameter(f"{value} is a directory; give a file name")
    if not path.resolve().parent.is_dir():
        raise click.BadParameter(f"directory {path.parent} does not exist")
    return value


# ---- shared options ------------------------------------------------------------------------------


DEFAULT_THREADS = 1  # measured: benchmarks/results/threads_cpu.md


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    from calm.checkpoints.devices import set_threads

    set_threads(value)  # imports torch only when a value is given


def threads_option(f: F) -> F:
    """--threads, applied as soon as it is parsed (calm.set_threads). The default is measured: on the shared
    2-core machine of the reports one thread decoded 2-7x faster than two (benchmarks/results/threads_cpu.md)."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=DEFAULT_THREADS,
        show_default=True,
        expose_value=False,
        callback=_set_threads,
        help="CPU threads for torch. 1 decoded 2-7x faster than 2 on a busy 2-core CPU "
        "(benchmarks/results/threads_cpu.md); raise it on an idle machine with more cores.",
    )(f)


def model_name_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--model, refused when empty before anything is loaded (an empty path would name the current directory)."""
    if not value.strip():
        raise click.BadParameter("empty model name: give 'smollm2', a .gguf file, a local directory or a hub id")
    return value


def model_options(f: F) -> F:
    f = threads_option(f)
    f = click.option(
        "--dtype",
        type=click.Choice(["float32", "bfloat16", "float16"]),
        default=None,
        help="Weight dtype (default: float32).",
    )(f)
    f = click.option(
        "--weights",
        type=click.Choice(["auto", "native", "float32", "bfloat16"]),
        default=None,
        help="Weight format (default: auto, the format measured fastest for this checkpoint, else float32). "
        "native: compute on a GGUF file's own 4-bit blocks (docs/weights.md).",
    )(f)
    f = click.option(
        "--device", type=Device(), default="auto", show_default=True, help=f"Torch device: {DEVICE_HELP}."
    )(f)
    return click.option(
        "--model",
        "model_name",
        default="smollm2",
        show_default=True,
        metavar="MODEL",
        callback=model_name_option,
        help=MODEL_HELP + ".",
    )(f)


def measure_option(f: F) -> F:
    return click.option(
        "--measure",
        type=click.Choice(["softmax", "state", "classifier"]),
        default=None,
        help="Confidence measure (default: classifier if the model has trained exit heads, else softmax).",
    )(f)


def min_exit_option(f: F) -> F:
    return click.option(
        "--min-exit-layer",
        type=click.IntRange(min=1),
        default=None,
        help="No token exits below this layer (default: the first layer with a trained exit head, else half "
        "the depth; below that is refused).",
    )(f)


DECAY_HELP = (
    "τ of the threshold schedule λ(t) = 0.9·λ + 0.1·λ·exp(−τ·t/N) over N new tokens: it lowers λ along the "
    "output, to about 0.9·λ at the end, so later tokens exit earlier; 0 keeps λ fixed. λ >= 1 never decays."
)


def decay_tau_option(f: F) -> F:
    """--decay-tau for a sweep of explicit thresholds (CALM's τ=4 unless given)."""
    return click.option(
        "--decay-tau", type=FiniteFloat(min=0.0), default=ExitPolicy.decay_tau, show_default=True, help=DECAY_HELP
    )(f)


def calibrated_decay_tau_option(f: F) -> F:
    """--decay-tau for eval and bench: by default the schedule the model's calibration certified."""
    return click.option(
        "--decay-tau",
        type=FiniteFloat(min=0.0),
        default=None,
        help=DECAY_HELP + f" Default: the calibration's τ where the model has one, else {ExitPolicy.decay_tau:g}.",
    )(f)


def calibrated_knob_options(f: F) -> F:
    """--speed, --tolerance and --consistency for eval and bench: the knob's λ, read off the calibration."""
    f = consistency_option(f)
    f = click.option(
        "--tolerance",
        type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True),
        default=None,
        help="The calibrated knob: the threshold the calibration certifies at tolerance δ (eval: instead of "
        "--thresholds; bench: a row beside the --policy ones).",
    )(f)
    return click.option(
        "--speed",
        type=FiniteFloat(0.0, 1.0, min_open=True),
        default=None,
        help="The calibrated knob: the threshold at this speed, 0 < speed <= 1 (1 = fastest certified; eval: "
        "instead of --thresholds; bench: a row beside the --policy ones).",
    )(f)


CONSISTENCY_HELP = (
    "The calibrated objective --speed and --tolerance follow: textual (the output stays within δ of the full "
    "model's) or risk (its ROUGE-L against the references is no worse than the full model's by more than δ)."
)


def consistency_option(f: F, default: str | None = None) -> F:
    return click.option(
        "--consistency",
        type=click.Choice(["textual", "risk"]),
        default=default,
        show_default=default is not None,
        help=CONSISTENCY_HELP + ("" if default else " Default: textual."),
    )(f)


def knob_options(f: F) -> F:
    """--threshold, --measure, --min-exit-layer, --speed, --tolerance, --consistency and --decay-tau."""
    f = consistency_option(f)
    f = click.option(
        "--decay-tau",
        type=FiniteFloat(min=0.0),
        default=None,
        help=DECAY_HELP + f" Default: {ExitPolicy.decay_tau:g} with --threshold; with --speed and "
        "--tolerance, the schedule the calibration certified (they refuse another).",
    )(f)
    f = click.option(
        "--tolerance",
        type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True),
        default=None,
        help="Risk tolerance δ: the fastest threshold the calibration certifies for it.",
    )(f)
    f = click.option(
        "--speed",
        type=FiniteFloat(0.0, 1.0),
        default=None,
        help="Speed knob from the model's calibration: 0 = most careful, 1 = fastest certified.",
    )(f)
    f = min_exit_option(measure_option(f))
    return click.option(
        "--threshold",
        type=FiniteFloat(0.0, 1.0),
        default=None,
        help="Exit confidence λ in [0, 1]: lower exits earlier (faster, riskier); 1 is the full model (never "
        "exits, whatever --decay-tau).",
    )(f)


def sampling_options(f: F) -> F:
    f = click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=None,
        help="Seed of the sampling generator (with --do-sample), for repeatable samples.",
    )(f)
    f = click.option(
        "--top-k",
        type=click.IntRange(min=0),
        default=None,
        help="Sample from the k likeliest tokens only (with --do-sample; 0: no limit).",
    )(f)
    f = click.option(
        "--top-p",
        type=FiniteFloat(0.0, 1.0, min_open=True),
        default=None,
        help="Nucleus sampling: the likeliest tokens up to probability p (with --do-sample).",
    )(f)
    f = click.option(
        "--temperature",
        type=FiniteFloat(min=0.0, min_open=True),
        default=None,
        help="Sampling temperature > 0 (with --do-sample; default 1).",
    )(f)
    return click.option("--do-sample", is_flag=True, help="Sample tokens instead of greedy decoding.")(f)


def run_options(f: F) -> F:
    f = click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N documents.")(f)
    f = click.option(
        "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Documents generated together."
    )(f)
    return click.option(
        "--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Longest output, in tokens."
    )(f)


def doc_tokens_option(f: F) -> F:
    return click.option(
        "--max-doc-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="Cut each document to its first N tokens before prompting (default: as much as fits the context).",
    )(f)


def output_options(f: F) -> F:
    f = click.option(
        "--output",
        "output",
        callback=output_file,
        metavar="FILE.jsonl",
        default=None,
        help="Also write one JSON object per line (as --json) to FILE, atomically: it appears "
        "whole, in input order, when the run ends; an interrupted run leaves its rows in FILE.partial, and the same "
        "command resumes from them. Under accelerate launch each process runs its share and process 0 writes FILE.",
    )(f)
    f = click.option(
        "--resume/--no-resume",
        default=True,
        show_default=True,
        help="Keep the rows an interrupted run left in --output's FILE.partial and run only the rest.",
    )(f)
    f = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON object per line: id, summary (generate: text), finish_reason ('length' where the "
        "output hit --max-new-tokens, 'stop' where the model ended it), exit_layers, avg_layers, truncated, timings.",
    )(f)
    return click.option(
        "--show-exits",
        is_flag=True,
        help="Colour every token by its exit layer (plain [layer] marks when not on a colour "
        "terminal) and show the average depth.",
    )(f)
