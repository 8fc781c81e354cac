"""calm.calibration.knob and the knob in the Python API: CalmModel.policy() and generate(speed=, tolerance=)."""

from dataclasses import replace

import pytest

from calm import CalmModel, ExitPolicy
from calm.calibration.knob import default_measure, resolve_policy, tolerance_to_threshold
from calm.calibration.table import CalibrationRow, CalibrationTable
from calm.errors import InputError, PolicyError

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["the cat sat on the mat", "the council said a new plan for the city school"]


def make_table(**settings) -> CalibrationTable:
    rows = tuple(
        CalibrationRow(
            threshold=t, mean_loss=loss, q50=loss, q90=loss, q95=loss, avg_layers=layers, speedup=4 / layers, pvalue=0.0
        )
        for t, loss, layers in ((0.9, 0.01, 4.0), (0.5, 0.05, 3.0), (0.0, 0.6, 1.0))
    )
    return CalibrationTable(rows, certified_index=1, delta=0.1, epsilon=0.1, n=200, method="hb", **settings)


@pytest.fixture(scope="module")
def plain(tiny_model) -> CalmModel:
    return CalmModel.from_pretrained(tiny_model)


@pytest.fixture
def calibrated(tiny_model) -> CalmModel:
    model = CalmModel.from_pretrained(tiny_model)
    model.calibration = make_table(measure="state", decay_tau=0.0)
    return model


def test_an_uncalibrated_model(plain):
    assert default_measure(plain) == "softmax"
    assert resolve_policy(plain).policy == ExitPolicy.never() == plain.policy()
    assert plain.policy(threshold=0.8, measure="state", min_exit_layer=2) == ExitPolicy(
        measure="state", threshold=0.8, min_exit_layer=2
    )
    with pytest.raises(
        InputError, match="no calibration for this model; run calm calibrate on it, or give a threshold"
    ):
        plain.policy(speed=0.5)
    with pytest.raises(InputError, match="no calibration"):
        plain.generate(PROMPTS, 4, tolerance=0.1)


def test_the_knob_reads_the_table(calibrated):
    assert calibrated.policy(speed=1) == ExitPolicy(measure="state", threshold=0.5, decay_tau=0.0)
    assert calibrated.policy(tolerance=0.2).threshold == 0.5
    assert calibrated.policy(tolerance=0.05) == ExitPolicy.never()  # certifies 0.9 only, measured at 1.0×
    assert calibrated.policy() == calibrated.policy(speed=0.5)  # the default of a calibrated model
    assert calibrated.policy(speed=0) == ExitPolicy.never()
    assert calibrated.policy(speed=1, min_exit_layer=2).min_exit_layer == 2


def test_an_explicit_threshold_and_the_knob_are_one_policy_under_one_schedule(calibrated):
    knob = calibrated.policy(speed=1)
    assert calibrated.policy(threshold=0.5, measure="state", decay_tau=0) == knob
    assert calibrated.policy(threshold=0.5, measure="state") == replace(knob, decay_tau=ExitPolicy.decay_tau)
    assert calibrated.policy(speed=1, decay_tau=0) == knob  # the table's own τ may be given
    with pytest.raises(InputError, match="certifies its thresholds under the decay τ=0"):
        calibrated.policy(speed=1, decay_tau=4)


def test_a_table_without_a_schedule_was_made_with_the_default_decay(calibrated):
    calibrated.calibration = replace(calibrated.calibration, decay_tau=None)
    assert calibrated.policy(speed=1).decay_tau == ExitPolicy.decay_tau


def test_generate_with_a_knob_is_generate_with_its_policy(calibrated):
    for knob in ({"speed": 1.0}, {"tolerance": 0.2}):
        policy = calibrated.policy(**knob)
        by_knob, by_policy = calibrated.generate(PROMPTS, 6, **knob), calibrated.generate(PROMPTS, 6, policy)
        assert by_knob.token_ids == by_policy.token_ids and by_knob.exit_layers == by_policy.exit_layers
    fast = calibrated.generate(PROMPTS, 6, speed=1)
    assert fast.avg_layers < calibrated.generate(PROMPTS, 6).avg_layers == 4  # state λ=0.5 exits early here


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"speed": 1.5}, "speed must be a number in \\[0, 1\\]"),
        ({"speed": float("nan")}, "speed"),
        ({"tolerance": 0.0}, "tolerance must be a number in \\(0, 1\\)"),
        ({"tolerance": float("inf")}, "tolerance"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"decay_tau": -1.0, "threshold": 0.5}, "decay_tau"),
        ({"speed": "fast"}, "speed"),
        ({"speed": 0.5, "tolerance": 0.1}, "give only one of speed and tolerance"),
        ({"threshold": 0.5, "speed": 0.5}, "give only one of threshold and speed"),
        ({"speed": 1, "measure": "softmax"}, "calibration is for the 'state' measure"),
        ({"measure": "softmax"}, "calibration is for the 'state' measure"),  # the default knob too, not silently full
        ({"tolerance": 0.001}, "no threshold is certified at tolerance"),
    ],
)
def test_bad_knobs_are_clear_errors(calibrated, kwargs, message):
    with pytest.raises(InputError, match=message):
        calibrated.policy(**kwargs)


def test_policy_and_a_knob_together_are_an_error(calibrated):
    with pytest.raises(InputError, match="either policy= or a knob"):
        calibrated.generate(PROMPTS, 4, ExitPolicy(measure="state", threshold=0.5), speed=0.5)


def test_the_policy_is_checked_against_the_model(calibrated):
    with pytest.raises(PolicyError, match="classifier"):
        calibrated.policy(threshold=0.5, measure="classifier")
    with pytest.raises(PolicyError, match="min_exit_layer 9"):
        calibrated.policy(speed=1, min_exit_layer=9)


def test_nothing_certified_runs_the_full_model_by_default(calibrated):
    calibrated.calibration = replace(calibrated.calibration, certified_index=None)
    assert calibrated.policy() == ExitPolicy.never()
    with pytest.raises(InputError, match="no threshold is certified"):
        calibrated.policy(speed=0.5)


def test_tolerance_to_threshold():
    rows = tuple(
        CalibrationRow(t, loss, loss, loss, loss, layers, 1.0, 0.0)
        for t, loss, layers in ((0.9, 0.0, 4.0), (0.7, 0.02, 3.0), (0.5, 0.1, 2.0), (0.3, 0.5, 1.0))
    )
    table = CalibrationTable(rows, certified_index=1, delta=0.05, epsilon=0.1, n=500, method="hb")
    assert tolerance_to_threshold(table, 0.05) == 0.7
    assert tolerance_to_threshold(table, 0.2) == 0.5
    with pytest.raises(InputError, match="no threshold is certified"):
        tolerance_to_threshold(table, 1e-4)


def test_mode_calm_without_a_knob_runs_one_rule_in_the_api_and_on_the_command_line(calibrated, tmp_path):
    # issue 29, item 5: `--mode calm` ran the knob at speed 0.5 while generate(mode="calm") ran the full model
    from calm.calibration.knob import FULL_MODEL_ENGINE, calm_mode_policy
    from helpers import invoke

    default = calibrated.policy()  # speed 0.5 on the calibration
    assert not default.never_exits
    assert calm_mode_policy(calibrated, mode_named=True).policy == default
    assert calm_mode_policy(calibrated, mode_named=False) == calm_mode_policy(calibrated, False)
    assert calm_mode_policy(calibrated, mode_named=False).description == FULL_MODEL_ENGINE
    api = calibrated.generate(PROMPTS, 6, mode="calm")
    assert api.token_ids == calibrated.generate(PROMPTS, 6, default).token_ids
    assert api.exit_layers == calibrated.generate(PROMPTS, 6, default).exit_layers
    assert api.decoding.startswith(default.describe()) and api.avg_layers < 4
    assert calibrated.generate(PROMPTS, 6, engine="dynamic").avg_layers == 4  # an engine alone: the full model
    calibrated.save_pretrained(tmp_path / "ckpt")
    result = invoke("generate", "--model", tmp_path / "ckpt", "--no-chat", "--mode", "calm", "--json",
                    "--max-new-tokens", 6, PROMPTS[0])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "default (speed 0.5 on the calibration" in result.stderr
    row = __import__("json").loads(result.stdout.splitlines()[0])
    solo = calibrated.generate(PROMPTS[:1], 6, mode="calm", chat=False)
    assert tuple(row["exit_layers"]) == solo.exit_layers[0]


def test_where_no_certified_threshold_pays_the_knob_says_so_once_and_runs_lossless(calibrated, tmp_path, caplog):
    # issue 29, item 2: the knob ran a certified threshold measured slower than the full model
    from helpers import invoke

    slow = tuple(replace(r, speedup=s) for r, s in zip(calibrated.calibration.rows, (1.0, 0.9, 1.5)))
    calibrated.calibration = replace(calibrated.calibration, rows=slow)
    caplog.set_level("WARNING", logger="calm")
    out = calibrated.generate(PROMPTS, 6, speed=1)
    full = calibrated.generate(PROMPTS, 6, ExitPolicy.never())
    assert out.token_ids == full.token_ids and out.avg_layers == 4  # exact: the full model's tokens
    assert out.decoding.startswith("full model (lossless")  # the lossless run (nothing stored: the full model)
    warnings = [r.getMessage() for r in caplog.records if "faster than the full model" in r.getMessage()]
    assert warnings == [
        "no threshold the calibration certifies was measured faster than the full model (fastest certified: "
        "λ=0.9 at 1.00×); running the full model's exact output (lossless) instead of early exits"
    ]
    calibrated.save_pretrained(tmp_path / "ckpt")
    for knob in (["--speed", 1], ["--tolerance", 0.2]):
        result = invoke("generate", "--model", tmp_path / "ckpt", "--no-chat", "--max-new-tokens", 6, PROMPTS[0], *knob)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(lines) == 1 and "measured faster than the full model" in lines[0], result.stderr
        assert "lossless" in result.stderr.splitlines()[-1]


def test_the_knob_warns_once_where_the_run_leaves_the_certified_conditions(calibrated, tmp_path, caplog):
    # issue 29, item 3: summarize --speed ran at 64 tokens on whole documents, certified at 32 on 256-token cuts
    from calm.calibration.knob import warn_outside_calibration
    from helpers import invoke, write_jsonl

    table = replace(calibrated.calibration, max_new_tokens=4, max_doc_tokens=20)
    assert warn_outside_calibration(table, 4, [20, 3]) is None
    assert warn_outside_calibration(replace(table, max_new_tokens=None, max_doc_tokens=None), 99, [999]) is None
    line = warn_outside_calibration(table, 6, [30, 3])
    assert line == (
        "this run is outside what the calibration certified: 6 new tokens (certified at up to 4) and documents "
        "of up to 30 tokens (certified on documents cut to 20); its guarantee was not measured there"
    )
    calibrated.calibration = table
    caplog.set_level("WARNING", logger="calm")
    caplog.clear()
    calibrated.generate(PROMPTS, 4, speed=1)
    calibrated.generate(PROMPTS, 6, ExitPolicy(measure="state", threshold=0.5))
    assert not [r for r in caplog.records if "outside" in r.getMessage()]  # inside, or no calibrated knob
    calibrated.generate(PROMPTS, 6, speed=1)
    assert len([r for r in caplog.records if "outside" in r.getMessage()]) == 1
    calibrated.save_pretrained(tmp_path / "ckpt")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "document": " ".join(["the cat sat"] * 20)}])
    base = ("summarize", "--model", tmp_path / "ckpt", docs, "--max-new-tokens")
    result = invoke(*base, 4, "--speed", 1)
    warned = [line for line in result.stderr.splitlines() if "outside what the calibration certified" in line]
    assert result.exit_code == 0 and len(warned) == 1 and "documents of up to" in warned[0], result.output
    assert "new tokens" not in warned[0]
    quiet = invoke(*base, 4, "--threshold", 0.5, "--measure", "state")
    assert quiet.exit_code == 0 and "outside what the calibration" not in quiet.stderr
