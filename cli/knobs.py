"""The exit-policy and sampling options of `calm summarize` and `calm generate`, checked before a model
is loaded, and turned into an ExitPolicy (by calm.calibration.knob) and a SamplingConfig after."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from calm.errors import InputError, PolicyError
from calm.exits.policy import ExitPolicy

if TYPE_CHECKING:
    from calm.calibration.knob import ResolvedPolicy
    from calm.engine.sampling import SamplingConfig
    from calm.model import CalmModel


@dataclass(frozen=True)
class Knobs:
    """--threshold, --measure, --min-exit-layer, --speed, --tolerance, --decay-tau, --consistency as given
    (None: not given)."""

    threshold: float | None = None
    measure: str | None = None
    min_exit_layer: int | None = None
    speed: float | None = None
    tolerance: float | None = None
    decay_tau: float | None = None
    consistency: str | None = None  # counts only beside --speed or --tolerance (check() refuses it alone)

    @property
    def asks_for_exits(self) -> bool:
        """Whether any of these options sets calm's early exit (the run is then not lossless by default)."""
        return any(
            v is not None
            for v in (self.threshold, self.measure, self.min_exit_layer, self.speed, self.tolerance, self.decay_tau)
        )

    def check(self) -> None:
        """What can be checked without the model: at most one of threshold, speed and tolerance, and
        --consistency only beside --speed or --tolerance."""
        from calm.calibration.knob import check_knobs

        check_knobs(self.threshold, self.speed, self.tolerance, names=("--threshold", "--speed", "--tolerance"))
        if self.consistency is not None and self.speed is None and self.tolerance is None:
            raise InputError(
                "--consistency picks the calibrated objective that --speed or --tolerance follows; "
                "give one of them too (without a knob the run is lossless; --threshold follows no calibration)"
            )

    def resolve(self, model: CalmModel, mode_named: bool = True) -> ResolvedPolicy:
        """The policy these knobs ask for on this model, its description where it came from, for the footer
        (and whether it is the calibration's, or lossless because no certified threshold pays). An explicit
        threshold runs --decay-tau (CALM's τ=4 if not given); a calibrated one the schedule it was certified
        with, and another --decay-tau there is refused rather than run untested. No knob: the rule of
        calm.calibration.knob.calm_mode_policy (mode_named: --mode calm was given, not only --engine)."""
        from calm.calibration.knob import FULL_MODEL_ENGINE, calm_mode_policy

        if (
            self.decay_tau is not None
            and self.threshold is None
            and self.speed is None
            and self.tolerance is None
            and model.calibration is None
        ):
            raise InputError(
                "--decay-tau sets the schedule of an exit threshold, and this run has none (full "
                "model); give --threshold too"
            )
        try:
            resolved = calm_mode_policy(
                model,
                mode_named,
                self.threshold,
                self.measure,
                self.min_exit_layer,
                self.speed,
                self.tolerance,
                self.decay_tau,
                self.consistency,
            )
        except (InputError, PolicyError) as exc:
            raise type(exc)(flag_names(str(exc))) from None
        if resolved.description == FULL_MODEL_ENGINE or resolved.lossless:
            return resolved
        return replace(resolved, description=self._source(model, resolved.policy))

    def _source(self, model: CalmModel, policy: ExitPolicy) -> str:
        from calm.calibration.knob import DEFAULT_SPEED

        if self.threshold is not None:
            return "from --threshold"
        objective = f", {self.consistency or 'textual'} consistency"
        if self.speed is not None:
            return f"from --speed {self.speed:g} and the calibration{objective}"
        if self.tolerance is not None:
            return f"from --tolerance {self.tolerance:g} and the calibration{objective}"
        if model.calibration is None:
            return "default (no calibration; pass --threshold to exit early)"
        if policy.never_exits:
            return "default (the calibration certifies no threshold)"
        return f"default (speed {DEFAULT_SPEED:g} on the calibration, textual consistency)"


# The library's names of the knobs (its keyword arguments) and the flags a command-line user typed.
FLAGS = {"decay_tau": "--decay-tau", "min_exit_layer": "--min-exit-layer", "the measure": "--measure"}


def flag_names(message: str) -> str:
    """A library error message with the knobs named by their command-line flags."""
    for name, flag in FLAGS.items():
        message = re.sub(rf"(?<![\w-]){name}\b", flag, message)
    return message


def sampling_config(
    do_sample: bool, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None
) -> SamplingConfig:
    """The sampling settings; an error for a sampling option given without --do-sample, which would
    otherwise be ignored without a word."""
    from calm.engine.sampling import SamplingConfig

    given = [
        name
        for name, value in (("--temperature", temperature), ("--top-p", top_p), ("--top-k", top_k), ("--seed", seed))
        if value is not None
    ]
    if given and not do_sample:
        raise InputError(
            f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when sampling; "
            "add --do-sample (decoding is greedy without it)"
        )
    return SamplingConfig(
        do_sample=do_sample,
        temperature=1.0 if temperature is None else temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
    )
