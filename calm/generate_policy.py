"""The exit policy CalmModel.generate runs, from what the caller gave: a policy, a knob (speed=, tolerance=), a
lossless run, or calm's mode with none of them (calm.calibration.knob.calm_mode_policy: the command line's rule)."""

from __future__ import annotations

from typing import Any

from calm.calibration.knob import ResolvedPolicy, calm_mode_policy
from calm.engine.decode import ExitPlan
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import NO_CONTROLLER
from calm.speculative.lossless import ModeRun


def knob_for(
    model: Any,
    policy: ExitPolicy | None,
    speed: float | None,
    tolerance: float | None,
    consistency: str | None,
    mode: str | None,
) -> ResolvedPolicy | None:
    """What the calibrated knob resolves to where generate() runs one: speed= or tolerance= in calm's mode,
    or mode="calm" with no policy (calm_mode_policy, the command line's rule); None otherwise."""
    if policy is not None or mode not in (None, "calm") or (mode is None and speed is None and tolerance is None):
        return None
    return calm_mode_policy(model, mode == "calm", speed=speed, tolerance=tolerance, consistency=consistency)


def generation_policy(
    model: Any,
    policy: ExitPolicy | None,
    speed: float | None,
    tolerance: float | None,
    run: ModeRun | None,
    consistency: str | None = None,
    mode_named: bool = False,
) -> ExitPolicy:
    """The policy generate() runs, range-checked up front: the one given, the knob's, or with none in
    calm's mode the rule of calm_mode_policy (mode_named: mode="calm" was given; lossless: its run's
    policy, or the draft controller given)."""
    if consistency is not None and speed is None and tolerance is None:
        raise InputError(
            "consistency= picks the calibrated objective that speed= or tolerance= follows; give one of them"
        )
    if speed is not None or tolerance is not None:
        if policy is not None:
            raise InputError("give either policy= or a knob (speed= or tolerance=), not both")
        if run is not None:
            raise InputError(
                "speed= and tolerance= set calm's early exit; lossless and speculative decoding never exit "
                "early (their policy= is the draft controller)"
            )
        policy = model.policy(speed=speed, tolerance=tolerance, consistency=consistency)
    if run is not None:
        if run.spec is None:
            return run.policy  # the full model: no draft controller to run
        if run.spec.from_context and policy is not None and policy.measure != "fixed":
            raise InputError(NO_CONTROLLER)
        policy = policy or run.policy
    if policy is None:  # calm's mode and no knob: the command line's rule too
        policy = calm_mode_policy(model, mode_named).policy
    ExitPlan.resolve(policy, model.network)  # layer range and exit floor, up front
    return policy
