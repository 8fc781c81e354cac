"""calm.speculative.goodput: each row drafts only what its own recent acceptance and the measured step costs
say pays, stops where it does not, and starts again when its lookups match (issue 29, item 1); lossless output
stays the full model's, token for token."""

from __future__ import annotations

import pytest

from calm import CalmModel, ExitPolicy
from calm.checkpoints.checkpoint import store_extra
from calm.speculative.goodput import (
    ALPHA_PRIOR,
    CONTEXT,
    LAYER,
    PLAIN,
    PROBE_EVERY,
    GoodputGate,
    RowPlan,
    gate_step,
    gate_verified,
)
from calm.speculative.lossless import STORE_KEY, MeasuredSetting

pytestmark = pytest.mark.usefixtures("one_thread")


def _measured(gate: GoodputGate) -> GoodputGate:
    """Step costs as timed: a plain step 0.1 s, each extra verified position 5% more."""
    gate.timed(PLAIN, 1, 0.10)
    for width in (2, 3, 4):
        gate.timed(CONTEXT, width, 0.10 * (1 + 0.05 * (width - 1)))
    return gate


def test_a_row_that_keeps_its_drafts_drafts_all_it_found_and_one_that_does_not_stops():
    gate = _measured(GoodputGate(2, draft_fraction=0.4))
    assert gate.alpha == [ALPHA_PRIOR, ALPHA_PRIOR] and gate.context_length(0, 3) == 2  # 1.56 / 1.10 is the best
    for _ in range(20):
        gate.verified(0, 3, 3)  # every draft kept
        gate.verified(1, 3, 0)  # every first draft rejected
    assert gate.alpha[0] > 0.9 and gate.alpha[1] < 0.01
    assert gate.context_length(0, 3) == 3 and gate.context_length(1, 3) == 0
    assert gate.plan(1, [3], layer_source=False) == RowPlan(shadow=True) and gate.off == 1


def test_the_measured_cost_of_a_wide_step_decides_against_drafting():
    gate = GoodputGate(1, draft_fraction=0.4)
    gate.alpha[0] = 0.3  # expected tokens: 1.3 with one draft, 1.39 with two
    gate.timed(PLAIN, 1, 0.10)
    gate.timed(CONTEXT, 2, 0.12)
    gate.timed(CONTEXT, 3, 0.16)
    assert gate.cost(CONTEXT, 2) == pytest.approx(1.2) and gate.cost(CONTEXT, 3) == pytest.approx(1.6)
    assert gate.context_length(0, 2) == 1  # 1.3 / 1.2 beats 1, and 1.39 / 1.6 does not
    gate.timed(CONTEXT, 2, 0.20)  # a moving average: 0.12 -> 0.136
    assert gate.cost(CONTEXT, 2) == pytest.approx(1.36)
    assert gate.context_length(0, 2) == 0  # below break-even: a plain step
    unmeasured = GoodputGate(1, draft_fraction=0.4)
    assert unmeasured.cost(CONTEXT, 4) == pytest.approx(1.15) and unmeasured.cost(LAYER) == pytest.approx(1.45)
    unmeasured.timed(CONTEXT, 4, 0.23)  # the plain step estimated through the prior: 0.2
    assert unmeasured.cost(CONTEXT, 4) == pytest.approx(1.15) and unmeasured.cost(LAYER) == pytest.approx(1.45)


def test_a_row_that_stopped_drafts_again_when_its_lookups_match():
    gate = _measured(GoodputGate(1, draft_fraction=0.4))
    for _ in range(20):
        gate.verified(0, 3, 0)
    looked_up = [[[7, 8, 9]]]
    guesses, plans = gate_step(gate, looked_up, [True], layer_source=False)
    assert guesses == [[]] and plans == [RowPlan(shadow=True)]
    steps = 0
    while not gate_step(gate, looked_up, [True], layer_source=False)[0][0]:
        gate_verified(gate, [RowPlan(shadow=True)], looked_up, [0], [0], [7], PLAIN)  # the lookup named it
        steps += 1
        assert steps < 20
    assert 1 <= steps <= 10 and gate_step(gate, looked_up, [True], False)[0][0][0][0] == 7


def test_layer_drafts_start_off_are_probed_and_stop_below_break_even():
    gate = GoodputGate(1, draft_fraction=0.4)
    gate.timed(PLAIN, 1, 0.10)
    gate.timed(LAYER, 2, 0.11)
    assert not gate.layer_pays(0)  # no layer-E step measured yet: off
    for _ in range(PROBE_EVERY):
        gate.plain_step(0)
    assert gate.layer_pays(0)  # a probe
    gate.layer_step(0, 3)  # it kept two drafts: 1.4 tokens per step on average now, at 1.1 steps' cost
    assert gate.layer_pays(0)
    for _ in range(10):
        gate.layer_step(0, 1)  # nothing kept: one token for 1.1 steps' cost
    assert not gate.layer_pays(0)


def _stored(model: CalmModel, checkpoint, setting: MeasuredSetting) -> CalmModel:
    store_extra(checkpoint, STORE_KEY, setting.to_dict())
    return CalmModel.from_pretrained(str(checkpoint))


@pytest.fixture
def hybrid(tiny_model, tmp_path) -> CalmModel:
    """A tiny model whose stored lossless setting drafts from the context first, else from layer 2."""
    model = CalmModel.from_pretrained(tiny_model)
    model.save_pretrained(tmp_path / "ckpt")
    setting = MeasuredSetting(2, 3, "fixed", 0.0, 1.3, 0.3, "test", lookup=True)
    return _stored(model, tmp_path / "ckpt", setting)


PROMPTS = ["the cat sat on the mat and the cat", "a council plan for the city school", "one two three"]


def test_lossless_with_the_goodput_rule_is_the_full_models_output_and_drafts_less(hybrid):
    """One prompt at a time, through generate_speculative (several prompts run a continuous batch, whose drafter
    runs the same rule per slot: tests/test_scheduler.py)."""
    offs, drafted = [], []
    for prompt in PROMPTS:
        full = hybrid.generate([prompt], 24, ExitPolicy.never(), chat=False)
        gated = hybrid.generate([prompt], 24, chat=False)  # the lossless default: goodput on
        always = hybrid.generate([prompt], 24, chat=False, mode="speculative")  # always drafts
        assert gated.token_ids == full.token_ids == always.token_ids
        g, a = gated.speculative, always.speculative
        offs.append((g.drafting_off, a.drafting_off))
        drafted.append((g.drafted, a.drafted))
        assert "drafting stops per row where it does not pay" in gated.decoding
        assert f"this run: {g.tokens_per_step:.2f} tokens per step" in gated.decoding
        assert f"drafting off in {g.drafting_off} of {g.row_cycles} steps" in gated.decoding
        assert "drafting off" not in always.decoding and "this run:" in always.decoding
    assert sum(o[0] for o in offs) > 0 and sum(o[1] for o in offs) == 0  # random weights: drafting stops
    assert sum(d[0] for d in drafted) < sum(d[1] for d in drafted)


def test_steps_where_no_row_drafts_run_the_full_models_decode_step(hybrid, monkeypatch):
    """A step the goodput rule leaves without drafts costs a plain decode step, not a verification of one slot."""
    import calm.speculative.loop as loop

    plain, real = [], loop.decode_one_token
    monkeypatch.setattr(loop, "decode_one_token", lambda *args: plain.append(1) or real(*args))
    for prompt in PROMPTS:
        full = hybrid.generate([prompt], 24, ExitPolicy.never(), chat=False)
        count = len(plain)
        gated = hybrid.generate([prompt], 24, chat=False)
        assert gated.token_ids == full.token_ids
        assert len(plain) - count <= gated.speculative.drafting_off
    assert len(plain) > 0


def test_the_footer_reports_this_runs_drafts(hybrid, tmp_path):
    from helpers import invoke

    result = invoke("generate", "--model", tmp_path / "ckpt", "--no-chat", "--max-new-tokens", 16, *PROMPTS[:2],
                    "--batch-size", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    footer = result.stderr.strip().splitlines()[-1]
    assert "speculative (lossless)" in footer and "; this run: " in footer and " tokens per step, " in footer
