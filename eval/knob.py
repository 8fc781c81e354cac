"""An ExitPolicy from the user's knobs: an explicit threshold λ, or a speed in [0, 1] or a risk
tolerance δ read off the model's calibration table, or (nothing given) the model's default."""

from __future__ import annotations

from dataclasses import dataclass, field

from calm.calibration import CalibrationTable
from calm.decode import ExitPlan
from calm.errors import InputError
from calm.lossless import resolve_mode
from calm.model import CalmModel
from calm.policy import ExitPolicy

NO_CALIBRATION = "no calibration for this model; run calm calibrate or use --threshold"
DEFAULT_SPEED = 0.5


@dataclass(frozen=True)
class ResolvedPolicy:
    policy: ExitPolicy
    description: str          # e.g. "softmax λ=0.9 (from --speed 0.5)", for the user and reports
    generate_kwargs: dict = field(default_factory=dict)   # CalmModel.generate's mode arguments (speculative)


def default_measure(model: CalmModel) -> str:
    """'classifier' when the model has trained exit heads with a classifier, else 'softmax'."""
    heads = model.heads
    return "classifier" if heads is not None and heads.config.classifier else "softmax"


def resolve_policy(model: CalmModel, threshold: float | None = None, measure: str | None = None,
                   min_exit_layer: int | None = None, speed: float | None = None,
                   tolerance: float | None = None) -> ResolvedPolicy:
    """The exit policy the knobs ask for, checked against the model before any generation."""
    check_knobs(threshold, speed, tolerance)
    if threshold is None and speed is None and tolerance is None:
        resolved = _default_policy(model, measure, min_exit_layer)
    elif threshold is not None:
        resolved = ResolvedPolicy(_policy(model, measure, threshold, min_exit_layer),
                                  f"{measure or default_measure(model)} λ={threshold:g}")
    else:
        resolved = _calibrated_policy(model, measure, min_exit_layer, speed, tolerance)
    ExitPlan.resolve(resolved.policy, model.network)          # layer range and classifier checks, up front
    return resolved


def resolve_run(model: CalmModel, threshold: float | None = None, measure: str | None = None,
                min_exit_layer: int | None = None, speed: float | None = None, tolerance: float | None = None,
                mode: str = "calm", lossless: bool = False, draft_layer: int | None = None,
                max_draft: int | None = None) -> ResolvedPolicy:
    """resolve_policy, or the lossless run that --mode speculative / --lossless ask for (calm.lossless),
    where --measure and --threshold set the draft controller."""
    run = resolve_mode(model, mode, lossless, draft_layer, max_draft, measure, threshold)
    if run is None:
        return resolve_policy(model, threshold, measure, min_exit_layer, speed, tolerance)
    if speed is not None or tolerance is not None:
        raise InputError("--speed and --tolerance set calm's early-exit threshold; lossless decoding never exits "
                         "early (use --threshold for its draft controller)")
    ExitPlan.resolve(run.policy, model.network)
    return ResolvedPolicy(run.policy, run.description, run.generate_kwargs())


def check_knobs(threshold: float | None = None, speed: float | None = None, tolerance: float | None = None) -> None:
    """At most one of threshold, speed and tolerance (checked before a model is loaded)."""
    given = [name for name, v in (("--threshold", threshold), ("--speed", speed), ("--tolerance", tolerance))
             if v is not None]
    if len(given) > 1:
        raise InputError(f"give only one of {', '.join(given)}")


def calibration_table(model: CalmModel) -> CalibrationTable:
    if model.calibration is None:
        raise InputError(NO_CALIBRATION)
    try:
        return CalibrationTable.from_dict(model.calibration)
    except (ValueError, TypeError) as exc:
        raise InputError(f"this model's calibration table is unreadable ({exc}); run calm calibrate again") from exc


def tolerance_to_threshold(table: CalibrationTable, delta: float) -> float:
    """The least conservative threshold that Learn-then-Test certifies at risk tolerance δ, from the
    table's per-threshold mean losses (fixed-sequence testing at the table's ε, with its method)."""
    try:
        certified = table.threshold_for_tolerance(delta)
    except ValueError as exc:
        raise InputError(f"{exc}, so --tolerance cannot be certified; use --speed or --threshold") from exc
    if certified is None:
        raise InputError(f"no threshold is certified at tolerance δ={delta:g} (ε={table.epsilon:g}, "
                         f"n={table.n}); raise --tolerance or run the full model (no knob)")
    return certified


def _default_policy(model: CalmModel, measure: str | None, min_exit_layer: int | None) -> ResolvedPolicy:
    if model.calibration is None:
        return ResolvedPolicy(ExitPolicy.never(), "full model (no calibration; pass --threshold to exit early)")
    try:
        return _calibrated_policy(model, measure, min_exit_layer, DEFAULT_SPEED, None)
    except InputError:
        return ResolvedPolicy(ExitPolicy.never(), "full model (the calibration certifies no threshold)")


def _calibrated_policy(model: CalmModel, measure: str | None, min_exit_layer: int | None,
                       speed: float | None, tolerance: float | None) -> ResolvedPolicy:
    if speed == 0 and tolerance is None:
        return ResolvedPolicy(ExitPolicy.never(), "full model (--speed 0)")
    table = calibration_table(model)
    calibrated_measure = model.calibration.get("measure")
    if measure is not None and calibrated_measure is not None and measure != calibrated_measure:
        raise InputError(f"the calibration is for the {calibrated_measure!r} measure, not {measure!r}; "
                         "drop --measure or use --threshold")
    measure = measure or calibrated_measure or default_measure(model)
    if tolerance is not None:
        threshold, source = tolerance_to_threshold(table, tolerance), f"--tolerance {tolerance:g}"
    else:
        try:
            threshold = table.speed_to_threshold(speed)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        source = f"--speed {speed:g}"
    min_exit_layer = min_exit_layer or model.calibration.get("min_exit_layer")
    # The threshold is certified for the schedule it was calibrated with; tables before decay_tau was
    # stored were made with the default decay.
    decay_tau = model.calibration.get("decay_tau", ExitPolicy.decay_tau)
    schedule = "" if decay_tau == ExitPolicy.decay_tau else f", τ={decay_tau:g}"
    return ResolvedPolicy(_policy(model, measure, threshold, min_exit_layer, decay_tau),
                          f"{measure} λ={threshold:g}{schedule} (from {source} and the calibration)")


def _policy(model: CalmModel, measure: str | None, threshold: float, min_exit_layer: int | None,
            decay_tau: float = ExitPolicy.decay_tau) -> ExitPolicy:
    return ExitPolicy(measure=measure or default_measure(model), threshold=float(threshold),
                      min_exit_layer=min_exit_layer or 1, decay_tau=float(decay_tau))
