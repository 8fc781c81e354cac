import math

import pytest

from calm.errors import PolicyError
from calm.exits.policy import ExitPolicy


def test_threshold_decays_from_lambda_to_nine_tenths():
    p = ExitPolicy(threshold=0.8, decay_tau=4.0)
    assert p.threshold_at(0, 32) == pytest.approx(0.8)
    assert p.threshold_at(32, 32) == pytest.approx(0.9 * 0.8 + 0.1 * 0.8 * math.exp(-4))
    values = [p.threshold_at(t, 32) for t in range(33)]
    assert values == sorted(values, reverse=True)


def test_no_decay_when_tau_is_zero():
    assert ExitPolicy(threshold=0.7, decay_tau=0).threshold_at(10, 16) == 0.7


def test_threshold_above_one_never_exits():
    assert ExitPolicy(threshold=1.01).allowed_layers(30) == ()
    assert ExitPolicy.never().allowed_layers(30) == ()


def test_allowed_layers_respect_min_layer_and_explicit_set():
    assert ExitPolicy(threshold=0.5, min_exit_layer=27).allowed_layers(30) == (27, 28, 29)
    assert ExitPolicy(threshold=0.5, exit_layers=(20, 10, 10)).allowed_layers(30) == (10, 20)
    assert ExitPolicy.fixed(15).allowed_layers(30) == (15,)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(threshold=-0.1),
        dict(threshold=float("nan")),
        dict(measure="entropy"),
        dict(min_exit_layer=0),
        dict(decay_tau=-1),
    ],
)
def test_bad_policies_are_rejected(kwargs):
    with pytest.raises(PolicyError):
        ExitPolicy(**kwargs)


@pytest.mark.parametrize("layer", [0, 30, 31])
def test_exit_layer_out_of_range_is_rejected(layer):
    with pytest.raises(PolicyError, match="out of range"):
        ExitPolicy.fixed(layer).allowed_layers(30)
