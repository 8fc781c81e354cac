"""Drafts from the 4-bit twin (calm.speculative.twin_drafts): whatever the twin proposes, every row gets the full
model's tokens, bit for bit at batch 1, alone or in a batch, in the batch loop and in a continuous batch; the
goodput gate weighs twin drafts against looked-up ones and stops them where they do not pay."""

from __future__ import annotations

import pytest
import torch

from calm.adapters import adapter_for
from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.engine.quantized import native_available
from calm.engine.scheduler import Request, Scheduler
from calm.exits.policy import ExitPolicy
from calm.speculative.cycle import LosslessDrafter
from calm.speculative.drafting import ALWAYS_DRAFT, SpeculativeConfig
from calm.speculative.goodput import PLAIN_EVERY, PROBE_EVERY, TWIN, GoodputGate, RowPlan, gate_step
from calm.speculative.loop import generate_speculative
from calm.speculative.twin_drafts import twin_lengths, twin_limits
from helpers import tiny_llama
from test_adapters import build, gen_config, prompts, row
from test_speculative import _layer_outputs

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not native_available(), reason="this torch has no CPU int4 kernel"),
]

TWIN_ONLY = SpeculativeConfig(draft_layer=1, max_draft=3, twin=True)
GATED = SpeculativeConfig(draft_layer=1, max_draft=3, lookup=True, goodput=True, twin=True)


@pytest.mark.parametrize("kind", ["llama", "mistral-window", "smollm3-window"])
@pytest.mark.parametrize("spec", [TWIN_ONLY, GATED], ids=["always", "gated"])
def test_twin_drafts_give_the_full_models_tokens(kind, spec):
    net = Network.build(adapter_for(build(kind)))
    p = prompts()
    full = generate_tokens(net, p, ExitPolicy.never(), gen_config(16))
    out = generate_speculative(net, p, ExitPolicy.never(), gen_config(16), spec)
    assert out.token_ids == full.token_ids
    stats = out.speculative
    assert 0 < stats.accepted < stats.drafted and stats.context_drafted <= stats.drafted
    for b in range(2):  # each row alone gets what it gets in the batch
        alone = generate_speculative(net, row(p, b), ExitPolicy.never(), gen_config(16), spec)
        assert alone.token_ids[0] == out.token_ids[b]


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_a_model_without_a_twin_drafts_as_it_would_without_one(kind):
    """T5's feed-forward reads its projections' weights, GPT-2's are Conv1D: no twin, and layer E drafts."""
    net = Network.build(adapter_for(build(kind)))
    p = prompts()
    out = generate_speculative(net, p, ALWAYS_DRAFT, gen_config(12), TWIN_ONLY)
    plain = generate_speculative(net, p, ALWAYS_DRAFT, gen_config(12), SpeculativeConfig(1, 3))
    assert out.token_ids == plain.token_ids == generate_tokens(net, p, ExitPolicy.never(), gen_config(12)).token_ids
    assert out.speculative.drafted == plain.speculative.drafted > 0


def test_every_layer_output_at_batch_1_is_the_full_models_bit_for_bit():
    """The twin writes K/V into the columns it drafts at; verification must overwrite all of them."""
    net = Network.build(adapter_for(tiny_llama(layers=2)))
    prompt = PromptBatch(torch.tensor([[2, 5, 6, 7, 5, 6, 7, 5]]), torch.ones(1, 8, dtype=torch.bool))
    config = GenerationConfig(max_new_tokens=40, eos_token_ids=(), pad_token_id=0)
    full = _layer_outputs(net, lambda: generate_tokens(net, prompt, ExitPolicy.never(), config))
    runs = {}
    out = _layer_outputs(
        net, lambda: runs.setdefault("twin", generate_speculative(net, prompt, ExitPolicy.never(), config, TWIN_ONLY))
    )
    assert runs["twin"].speculative.drafted > 0
    assert full.keys() <= out.keys()
    assert all(torch.equal(full[key], out[key]) for key in full)


def test_a_continuous_batch_drafting_with_the_twin_keeps_every_request_exact():
    net = Network.build(adapter_for(build("llama")))
    g = torch.Generator().manual_seed(3)
    requests = [
        Request(tuple(torch.randint(3, 100, (n,), generator=g).tolist()), m)
        for n, m in ((5, 9), (9, 4), (7, 12), (3, 6))
    ]
    drafter = LosslessDrafter(net, GATED, ALWAYS_DRAFT, slots=2, most_rows=2)
    scheduler = Scheduler(net, max_batch=2, eos_token_ids=(), drafter=drafter)
    together = {f.request_id: f.token_ids for f in scheduler.run(requests)}
    assert drafter.stats().drafted > drafter.stats().context_drafted
    assert any(kind == TWIN for kind, _ in drafter.gate.seconds)
    for i, r in enumerate(requests):
        ids = PromptBatch(torch.tensor([r.ids]), torch.ones(1, len(r.ids), dtype=torch.bool))
        config = GenerationConfig(max_new_tokens=r.max_new_tokens, eos_token_ids=(), pad_token_id=0)
        assert together[i] == generate_tokens(net, ids, ExitPolicy.never(), config).token_ids[0], f"request {i}"


def test_twin_limits_follow_the_budget_and_looked_up_rows_keep_their_drafts():
    assert twin_limits(4, [True, True, False, True], [10, 3, 10, 1]) == [4, 2, 0, 0]
    assert twin_lengths([3, 3, 0], [[[7, 8]], [], []]) == [0, 3, 0]
    assert twin_lengths([2, 1], []) == [2, 1]


def test_the_gate_takes_the_source_of_higher_goodput_and_stops_twin_drafts_that_do_not_pay():
    gate = GoodputGate(2, draft_fraction=0.5)
    gate.seconds = {("plain", 1): 1.0, ("context", 4): 1.1, (TWIN, 4): 2.2, (TWIN, 2): 1.45}
    gate.alpha = [0.3, 0.9]
    gate.twin_alpha = [0.95, 0.95]
    _, plans = gate_step(gate, [[[5, 6, 7]], [[5, 6, 7]]], [True, True], False, [3, 3])
    assert plans[0] == RowPlan(twin=3, shadow=True)  # 3.71 / 2.2 beats looked-up 1.42 / 1.1
    assert plans[1] == RowPlan(context=3)  # 3.44 / 1.1 beats the twin's
    for _ in range(8):
        gate.twin_verified(0, 3, 0)  # nothing kept: the twin's acceptance falls
    assert gate.plan(0, [], False, 3) == RowPlan() and gate.off == 1
    for _ in range(PROBE_EVERY):
        gate.plain_step(0)
    assert gate.plan(0, [], False, 3) == RowPlan(twin=3)  # tried again
    gate.twin_verified(0, 3, 3)
    assert gate.twin_idle[0] == 0


@pytest.mark.slow
def test_the_real_models_twin_drafts_are_mostly_kept_and_its_output_is_the_full_models():
    """SmolLM2's twin on two open prompts (nothing to copy): the float model's tokens, most twin drafts kept."""
    from calm import CalmModel
    from calm.speculative.options import SpeculativeOptions

    model = CalmModel.from_pretrained("smollm2", weights="float32")
    for prompt in ("Why do cats purr?", "Explain in two sentences why the sky is blue."):
        full = model.generate(prompt, max_new_tokens=24, mode="calm", policy=ExitPolicy.never())
        out = model.generate(prompt, max_new_tokens=24, speculative=SpeculativeOptions(mode="lossless", twin=True))
        assert out.token_ids == full.token_ids
        stats = out.speculative
        assert stats.drafted - stats.context_drafted >= 6 and stats.acceptance_rate > 0.7
        assert "4-bit twin" in out.decoding


def test_a_twin_slower_than_it_pays_is_measured_and_stopped_without_a_plain_step_timed():
    """The plain step is the unit of cost; while none is timed it is estimated from the twin step's verification,
    timed as the context step of its width (GoodputGate.timed_step): a twin token costing 1.2 plain steps stops
    drafting."""
    gate = GoodputGate(1, draft_fraction=0.5)
    gate.twin_alpha = [0.95]
    drafted = []
    for _ in range(30):
        _, (plan,) = gate_step(gate, [], [True], False, [3])
        drafted.append(plan.twin)
        if plan.twin:
            width = plan.twin + 1
            verify = 1.0 + 0.05 * plan.twin
            gate.timed_step(TWIN, width, 1.2 * plan.twin + verify, verify)
            gate.twin_verified(0, plan.twin, plan.twin)  # every draft kept: only its cost stops it
        else:
            gate.timed("plain", 1, 1.0)
            gate.plain_step(0)
    twin_steps = [i for i, d in enumerate(drafted) if d]
    assert twin_steps[:3] == [0, 1, 2]  # each width once, at its prior cost, then measured: too slow
    assert twin_steps[3:] == [2 + PROBE_EVERY + 1]  # tried again once, after 24 plain steps


def test_a_plain_step_is_timed_again_every_plain_every_steps():
    gate = GoodputGate(2, draft_fraction=0.5)
    gate.seconds = {("plain", 1): 1.0, (TWIN, 4): 2.0}
    gate.twin_alpha = [1.0, 1.0]
    for step in range(1, PLAIN_EVERY + 2):
        guesses, plans = gate_step(gate, [[[4, 5]], []], [True, True], False, [3, 3])
        if step != PLAIN_EVERY:
            assert plans[1].twin == 3
        else:
            assert guesses == [[], []] and plans == [RowPlan(shadow=True), RowPlan()]  # everyone plain
            gate.timed("plain", 1, 1.0)
    assert not gate.plain_due()


def test_the_command_line_asks_for_the_twin_or_leaves_it_out(tiny_model):
    """--twin drafts with it (the tiny model stores no setting: an explicit ask), --no-twin does not; the output is
    the full model's either way and the footer says what drafted."""
    from helpers import invoke

    runs = {flag: invoke("generate", "--model", tiny_model, "a b c a b", "--max-new-tokens", 6, flag)
            for flag in ("--twin", "--no-twin")}  # fmt: skip
    assert all(r.exit_code == 0 for r in runs.values()), runs
    assert "4-bit twin" in runs["--twin"].output and "4-bit twin" not in runs["--no-twin"].output
    full = invoke("generate", "--model", tiny_model, "a b c a b", "--max-new-tokens", 6, "--mode", "calm")
    first = full.output.splitlines()[0]
    assert all(r.output.splitlines()[0] == first for r in runs.values())
