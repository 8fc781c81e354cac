"""An ExitPolicy from the user's knobs: an explicit threshold λ, or a speed in [0, 1] or a risk
tolerance δ read off the model's calibration table, or (nothing given) the model's default. The
calibrated knobs follow one of CALM's two objectives (`consistency`): textual (the default; the early
output stays within δ of the full model's) or risk (its ROUGE-L against the references is no worse than
the full model's by more than δ).

One λ means one policy: an explicit threshold and the calibrated knob that lands on the same λ build
the same ExitPolicy when they run the same decay schedule τ. The knob runs the schedule the table
was calibrated with (a threshold is certified only for that one); an explicit threshold runs the
`decay_tau` given, else ExitPolicy's default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from calm.calibration.table import CONSISTENCIES, TEXTUAL, CalibrationTable
from calm.engine.decode import ExitPlan, exit_floor
from calm.errors import InputError
from calm.exits.policy import ExitPolicy

if TYPE_CHECKING:
    from calm.engine.decode import Network
    from calm.exits.heads import ExitHeads

logger = logging.getLogger(__name__)
NO_CALIBRATION = "no calibration for this model; run calm calibrate on it, or give a threshold"
DEFAULT_SPEED = 0.5


class CalibratedModel(Protocol):
    """What the knob reads off a model: its network and exit heads, and its calibration table (None: not
    calibrated). CalmModel is one."""

    @property
    def network(self) -> Network: ...

    @property
    def heads(self) -> ExitHeads | None: ...

    @property
    def calibration(self) -> CalibrationTable | None: ...


@dataclass(frozen=True)
class ResolvedPolicy:
    policy: ExitPolicy
    description: str  # e.g. "softmax λ=0.9 (from --speed 0.5 and the calibration)", for the user
    calibrated: bool = False  # the threshold comes from the calibration table (its conditions apply)
    lossless: bool = False  # no certified threshold pays: run the full model's exact output (lossless) instead


@dataclass(frozen=True)
class Knobs:
    """What the user asked for; None everywhere is the model's default."""

    threshold: float | None = None
    speed: float | None = None
    tolerance: float | None = None
    measure: str | None = None
    min_exit_layer: int | None = None
    decay_tau: float | None = None
    consistency: str | None = None  # which calibrated objective speed and tolerance follow (None: textual)

    def __post_init__(self) -> None:
        check_knobs(self.threshold, self.speed, self.tolerance)
        check_consistency_knob(self.consistency, self.threshold)
        _check_number("speed", self.speed, 0.0, 1.0, "in [0, 1]")
        _check_number("tolerance", self.tolerance, 0.0, 1.0, "in (0, 1)", open_interval=True)
        _check_number("threshold", self.threshold, 0.0, math.inf, ">= 0 (1 and above never exit)")
        _check_number("decay_tau", self.decay_tau, 0.0, math.inf, ">= 0")


def check_knobs(
    threshold: float | None = None,
    speed: float | None = None,
    tolerance: float | None = None,
    names: tuple[str, str, str] = ("threshold", "speed", "tolerance"),
) -> None:
    """At most one of threshold, speed and tolerance (the CLI checks this before it loads a model, and names
    them by its flags)."""
    given = [name for name, v in zip(names, (threshold, speed, tolerance)) if v is not None]
    if len(given) > 1:
        raise InputError(f"give only one of {' and '.join(given)}")


def check_consistency_knob(consistency: str | None, threshold: float | None = None) -> None:
    """A known objective, and not beside an explicit threshold (which no calibration chose)."""
    if consistency is None:
        return
    if consistency not in CONSISTENCIES:
        raise InputError(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {consistency!r}")
    if threshold is not None:
        raise InputError(
            "consistency picks which calibrated objective the speed or tolerance knob follows; an explicit "
            "threshold follows none: drop one of them"
        )


def _check_number(
    name: str, value: float | None, lo: float, hi: float, expected: str, open_interval: bool = False
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InputError(f"{name} must be a number {expected}, got {value!r}")
    inside = lo < value < hi if open_interval else lo <= value <= hi
    if not inside:
        raise InputError(f"{name} must be a number {expected}, got {value!r}")


def default_measure(model: CalibratedModel) -> str:
    """'classifier' when the model has trained exit heads with a classifier, else 'softmax'."""
    heads = model.heads
    return "classifier" if heads is not None and heads.config.classifier else "softmax"


def resolve_policy(
    model: CalibratedModel,
    threshold: float | None = None,
    measure: str | None = None,
    min_exit_layer: int | None = None,
    speed: float | None = None,
    tolerance: float | None = None,
    decay_tau: float | None = None,
    consistency: str | None = None,
) -> ResolvedPolicy:
    """The exit policy the knobs ask for, checked against the model before any generation."""
    knobs = Knobs(threshold, speed, tolerance, measure, min_exit_layer, decay_tau, consistency)
    if knobs.threshold is not None:
        resolved = _explicit_policy(model, knobs.threshold, knobs)
    elif knobs.speed is None and knobs.tolerance is None:
        resolved = _default_policy(model, knobs)
    else:
        resolved = _calibrated_policy(model, knobs)
    ExitPlan.resolve(resolved.policy, model.network)  # layer range and classifier checks, up front
    return resolved


FULL_MODEL_ENGINE = "full model (exact; an engine was named, no exit knob)"


def calm_mode_policy(
    model: CalibratedModel,
    mode_named: bool,
    threshold: float | None = None,
    measure: str | None = None,
    min_exit_layer: int | None = None,
    speed: float | None = None,
    tolerance: float | None = None,
    decay_tau: float | None = None,
    consistency: str | None = None,
) -> ResolvedPolicy:
    """What a run in calm's early-exit mode runs: the knobs' policy (resolve_policy). With no knob at all, the
    model's default (speed DEFAULT_SPEED when it is calibrated, else the full model) where the caller named
    mode "calm"; the full model where the mode only followed from a named engine. The one rule for the
    command line (`--mode calm`, `--engine`) and CalmModel.generate (mode="calm", engine=)."""
    knobs = (threshold, measure, min_exit_layer, speed, tolerance, decay_tau, consistency)
    if not mode_named and all(k is None for k in knobs):
        return ResolvedPolicy(ExitPolicy.never(), FULL_MODEL_ENGINE)
    return resolve_policy(model, *knobs)


def calibration_table(model: CalibratedModel) -> CalibrationTable:
    if model.calibration is None:
        raise InputError(NO_CALIBRATION)
    return model.calibration


def tolerance_to_threshold(table: CalibrationTable, delta: float, consistency: str = TEXTUAL) -> float:
    """The least conservative threshold that Learn-then-Test certifies at tolerance δ for one objective,
    from the table's per-threshold mean losses (fixed-sequence testing at the table's ε, with its method)."""
    table.require(consistency)  # a CalibrationError of its own where the table has no risk rows
    try:
        certified = table.threshold_for_tolerance(delta, consistency)
    except ValueError as exc:
        raise InputError(f"{exc}, so a tolerance cannot be certified; give a speed or a threshold") from exc
    if certified is None:
        raise InputError(
            f"no threshold is certified at tolerance δ={delta:g} for {consistency} consistency "
            f"(ε={table.epsilon:g}, n={table.n}); raise the tolerance or run the full model (no knob)"
        )
    return certified


def calibrated_decay_tau(table: CalibrationTable) -> float:
    """The schedule the table's thresholds were certified under (tables from before τ was stored were
    made with the default decay)."""
    return ExitPolicy.decay_tau if table.decay_tau is None else table.decay_tau


def _explicit_policy(model: CalibratedModel, threshold: float, knobs: Knobs) -> ResolvedPolicy:
    tau = ExitPolicy.decay_tau if knobs.decay_tau is None else knobs.decay_tau
    policy = _policy(model, knobs.measure, threshold, knobs.min_exit_layer, tau)
    return ResolvedPolicy(policy, f"{policy.measure} λ={threshold:g}{_schedule(tau)}")


def _default_policy(model: CalibratedModel, knobs: Knobs) -> ResolvedPolicy:
    if model.calibration is None:
        if knobs.consistency is not None:
            raise InputError(NO_CALIBRATION)
        return ResolvedPolicy(ExitPolicy.never(), "full model (no calibration; pass --threshold to exit early)")
    if model.calibration.certified_index_for(knobs.consistency or TEXTUAL) is None:
        return ResolvedPolicy(ExitPolicy.never(), "full model (the calibration certifies no threshold)")
    return _calibrated_policy(model, knobs)  # no speed given: DEFAULT_SPEED


def _calibrated_policy(model: CalibratedModel, knobs: Knobs) -> ResolvedPolicy:
    speed = DEFAULT_SPEED if knobs.speed is None else knobs.speed
    if knobs.speed == 0:
        return ResolvedPolicy(ExitPolicy.never(), "full model (--speed 0)")
    table = calibration_table(model)
    measure = _calibrated_measure(model, table, knobs.measure)
    tau = calibrated_decay_tau(table)
    if knobs.decay_tau is not None and knobs.decay_tau != tau:
        raise InputError(
            f"the calibration certifies its thresholds under the decay τ={tau:g}, not "
            f"decay_tau={knobs.decay_tau:g}; drop decay_tau or give a threshold"
        )
    consistency = table.require(knobs.consistency or TEXTUAL)
    threshold: float | None
    loosest: float | None = None  # the loosest threshold the knob may run (a tolerance's; None: the certified one)
    if knobs.tolerance is not None:
        loosest = tolerance_to_threshold(table, knobs.tolerance, consistency)
        threshold = table.fastest_paying(loosest, consistency)
        source = f"--tolerance {knobs.tolerance:g}"
    else:
        try:
            threshold = table.speed_to_threshold(speed, consistency)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        source = f"--speed {speed:g}"
    if threshold is None:
        return _nothing_pays(table, consistency, loosest)
    min_exit_layer = knobs.min_exit_layer or _table_floor(model, table)
    return ResolvedPolicy(
        _policy(model, measure, threshold, min_exit_layer, tau),
        f"{measure} λ={threshold:g}{_schedule(tau)} (from {source} and the calibration, {consistency} consistency)",
        calibrated=True,
    )


def _nothing_pays(table: CalibrationTable, consistency: str, loosest: float | None) -> ResolvedPolicy:
    """No certified threshold was measured faster than the full model: say so in one line and run the full
    model's exact output (lossless), which is no slower and loses nothing."""
    fastest = table.fastest_certified(consistency, loosest)
    measured = f" (fastest certified: λ={fastest.threshold:g} at {fastest.speedup:.2f}×)" if fastest else ""
    message = (
        f"no threshold the calibration certifies was measured faster than the full model{measured}; "
        "running the full model's exact output (lossless) instead of early exits"
    )
    logger.warning(message)
    return ResolvedPolicy(ExitPolicy.never(), "lossless (no certified threshold is faster than the full model)",
                          lossless=True)  # fmt: skip


def warn_outside_calibration(
    table: CalibrationTable | None, max_new_tokens: int, document_tokens: Sequence[int] = ()
) -> str | None:
    """One warning line where a run of a calibrated threshold leaves the conditions its table certified:
    a longer budget than its max_new_tokens, or documents longer than its max_doc_tokens (the guarantee
    holds for the distribution it was measured on). -> the line (None: inside them, or not recorded)."""
    if table is None:
        return None
    outside = []
    if table.max_new_tokens is not None and max_new_tokens > table.max_new_tokens:
        outside.append(f"{max_new_tokens} new tokens (certified at up to {table.max_new_tokens})")
    longest = max(document_tokens, default=0)
    if table.max_doc_tokens is not None and longest > table.max_doc_tokens:
        outside.append(f"documents of up to {longest} tokens (certified on documents cut to {table.max_doc_tokens})")
    if not outside:
        return None
    message = (
        f"this run is outside what the calibration certified: {' and '.join(outside)}; "
        "its guarantee was not measured there"
    )
    logger.warning(message)
    return message


def _calibrated_measure(model: CalibratedModel, table: CalibrationTable, measure: str | None) -> str:
    if measure is not None and table.measure is not None and measure != table.measure:
        raise InputError(
            f"the calibration is for the {table.measure!r} measure, not {measure!r}; "
            "drop the measure or give a threshold"
        )
    return measure or table.measure or default_measure(model)


def _schedule(decay_tau: float) -> str:
    return "" if decay_tau == ExitPolicy.decay_tau else f", τ={decay_tau:g}"


def _policy(
    model: CalibratedModel, measure: str | None, threshold: float, min_exit_layer: int | None, decay_tau: float
) -> ExitPolicy:
    return ExitPolicy(
        measure=measure or default_measure(model),
        threshold=float(threshold),
        min_exit_layer=min_exit_layer,
        decay_tau=float(decay_tau),
    )


def _table_floor(model: CalibratedModel, table: CalibrationTable) -> int | None:
    """The calibration's min exit layer, where it is above the model's exit floor (tables made before the
    floor existed say 1; None then stands for the floor)."""
    if table.min_exit_layer is None or table.min_exit_layer < exit_floor(model.network):
        return None
    return table.min_exit_layer
