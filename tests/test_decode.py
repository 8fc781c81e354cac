import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from calm.adapters import adapter_for
from calm.engine.decode import ExitPlan, Network
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.errors import PolicyError
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.exits.policy import ExitPolicy
from helpers import tiny_llama


def batch(seed=1, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, t), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1:, :2] = False
    return PromptBatch(ids.masked_fill(~mask, 0), mask)


CONFIG = GenerationConfig(max_new_tokens=10, eos_token_ids=(1,), pad_token_id=0)


def test_never_exit_uses_every_layer(llama):
    res = generate_tokens(Network.build(adapter_for(llama)), batch(), ExitPolicy.never(), CONFIG)
    assert all(k == 4 for row in res.exit_layers for k in row)
    assert res.avg_layers == 4.0
    assert res.timings.new_tokens == sum(len(r) for r in res.token_ids)


def test_timings_separate_prefill_from_decode(llama):
    res = generate_tokens(Network.build(adapter_for(llama)), batch(), ExitPolicy.never(), CONFIG)
    t = res.timings
    assert t.decode_tokens == sum(len(r) - 1 for r in res.token_ids) > 0  # each row's first token is prefill's
    assert t.prefill_s > 0 and t.decode_s > 0
    assert t.decode_tokens_per_s == pytest.approx(t.decode_tokens / t.decode_s)
    assert t.tokens_per_s == pytest.approx(t.new_tokens / (t.prefill_s + t.decode_s))
    timings = res.to_dict()["timings"]
    assert {"prefill_s", "decode_s", "new_tokens", "tokens_per_s", "decode_tokens", "decode_tokens_per_s"} <= set(
        timings
    )


def test_fixed_exit_takes_the_token_from_that_layer(llama):
    res = generate_tokens(Network.build(adapter_for(llama)), batch(), ExitPolicy.fixed(2), CONFIG)
    assert all(row[0] == 4 and set(row[1:]) == {2} for row in res.exit_layers)  # first token comes from prefill
    # Layers 1-2 never see a propagated state, so from the second token on, the output is what the
    # model cut to its first 2 layers predicts (teacher-forced on the same tokens).
    short_cfg = llama.config.__class__(**{**llama.config.to_dict(), "num_hidden_layers": 2})
    short = type(llama)(short_cfg).eval()
    short.load_state_dict(llama.state_dict(), strict=False)
    prompts = batch()
    for row, tokens in enumerate(res.token_ids):
        ids = torch.cat([prompts.ids[row][prompts.mask[row]], torch.tensor(tokens)])[None]
        with torch.no_grad():
            predicted = short(ids).logits[0].argmax(-1)
        n = prompts.mask[row].sum()
        assert predicted[n : n + len(tokens) - 1].tolist() == list(tokens[1:])


def test_softmax_exit_token_is_the_argmax_at_its_exit_layer(llama):
    net = Network.build(adapter_for(llama))
    policy = ExitPolicy(measure="softmax", threshold=0.2, decay_tau=0)
    res = generate_tokens(net, batch(), policy, CONFIG)
    assert any(k < 4 for row in res.exit_layers for k in row)
    assert len({k for row in res.exit_layers for k in row}) >= 2


def test_classifier_measure_needs_heads(llama):
    with pytest.raises(PolicyError, match="classifier"):
        ExitPlan.resolve(ExitPolicy(measure="classifier", threshold=0.5), Network.build(adapter_for(llama)))


def test_classifier_measure_with_heads_exits_where_the_classifier_says(llama):
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4))
    with torch.no_grad():
        heads.cls_bias.copy_(torch.tensor([-10.0, 10.0, -10.0]))  # only layer 2 is confident
    res = generate_tokens(
        Network.build(adapter_for(llama), heads), batch(), ExitPolicy(measure="classifier", threshold=0.5), CONFIG
    )
    assert {k for row in res.exit_layers for k in row[1:]} == {2}


def test_rows_stop_at_eos_and_pad_afterwards(llama):
    net = Network.build(adapter_for(llama))
    free = generate_tokens(net, batch(), ExitPolicy.never(), GenerationConfig(max_new_tokens=6))
    eos = free.token_ids[0][2]
    res = generate_tokens(net, batch(), ExitPolicy.never(), GenerationConfig(max_new_tokens=6, eos_token_ids=(eos,)))
    assert res.token_ids[0] == free.token_ids[0][:3]
    assert len(res.exit_layers[0]) == 3


def test_fused_kv_of_remaining_layers_matches_layer_by_layer(llama):
    from calm.adapters.base import Adapter

    adapter = adapter_for(llama)
    h = torch.randn(2, 1, 64)
    positions = torch.tensor([[5], [3]])
    ctx = adapter.context(positions, torch.ones(2, 6, dtype=torch.bool), 5)
    fused_k, fused_v = adapter.kv_layers(1, h, ctx)
    loop_k, loop_v = Adapter.kv_layers(adapter, 1, h, ctx)
    assert fused_k.shape == (3, 2, 2, 1, 16)
    assert torch.allclose(fused_k, loop_k, atol=1e-5) and torch.allclose(fused_v, loop_v, atol=1e-5)


def test_compacted_batches_give_each_row_what_it_gets_alone(llama):
    from calm.engine.decode import COMPACT_MIN_ROWS

    net = Network.build(adapter_for(llama))
    prompts = batch(seed=5, b=COMPACT_MIN_ROWS, t=6)
    policy = ExitPolicy(measure="softmax", threshold=0.2, decay_tau=0)
    together = generate_tokens(net, prompts, policy, CONFIG)
    assert len({k for row in together.exit_layers for k in row[1:]}) >= 2
    for row in range(COMPACT_MIN_ROWS):
        alone = generate_tokens(
            net,
            PromptBatch(prompts.ids[row : row + 1, prompts.mask[row]], prompts.mask[row : row + 1, prompts.mask[row]]),
            policy,
            CONFIG,
        )
        assert alone.token_ids[0] == together.token_ids[row]
        assert alone.exit_layers[0] == together.exit_layers[row]


# ---- issue 20, item 1: no exit below the first trained layer, whatever the measure ----------------------


@pytest.mark.parametrize("measure", ["softmax", "state", "classifier"])
def test_no_token_exits_below_the_first_layer_with_a_trained_head(llama, measure):
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4, min_layer=3))
    with torch.no_grad():
        heads.cls_bias.fill_(10.0)  # the classifier is sure everywhere; below layer 3 it is untrained
    net = Network.build(adapter_for(llama), heads)
    res = generate_tokens(net, batch(), ExitPolicy(measure=measure, threshold=0.0, decay_tau=0), CONFIG)
    assert {k for row in res.exit_layers for k in row[1:]} == {3}


def test_without_heads_the_exit_floor_is_half_the_depth(llama):
    from calm.engine.decode import exit_floor

    net = Network.build(adapter_for(llama))
    assert exit_floor(net) == 2
    res = generate_tokens(net, batch(), ExitPolicy(measure="softmax", threshold=0.0, decay_tau=0), CONFIG)
    assert {k for row in res.exit_layers for k in row[1:]} == {2}


def test_a_min_exit_layer_below_the_floor_is_refused_in_one_line(llama):
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4, min_layer=3))
    net = Network.build(adapter_for(llama), heads)
    with pytest.raises(PolicyError, match="--min-exit-layer 2 is below layer 3") as info:
        ExitPlan.resolve(ExitPolicy(measure="softmax", threshold=0.5, min_exit_layer=2), net)
    assert "\n" not in str(info.value)
    assert ExitPlan.resolve(ExitPolicy(measure="softmax", threshold=0.5, min_exit_layer=3), net).allowed == {3}


# ---- issue 20, item 3: λ >= 1 never exits, under any decay ----------------------------------------------


@pytest.mark.parametrize("measure", ["softmax", "state"])
@pytest.mark.parametrize("tau", [0.0, 4.0, 50.0])
def test_threshold_one_is_the_full_model_under_any_decay(llama, measure, tau):
    net = Network.build(adapter_for(llama))
    policy = ExitPolicy(measure=measure, threshold=1.0, decay_tau=tau)
    assert policy.never_exits
    res = generate_tokens(net, batch(), policy, CONFIG)
    assert all(k == 4 for row in res.exit_layers for k in row)


class _OpCount(TorchDispatchMode):
    """Counts the torch ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


MAX_OPS_PER_LAYER = 56  # Llama at full depth, batch 1 (was 71.5 before the rotary and cache views; now 52.5)


def _ops_per_step(layers: int) -> int:
    net = Network.build(adapter_for(tiny_llama(layers=layers)))
    prompt = PromptBatch(torch.tensor([[2, 5, 6, 7]]), torch.ones(1, 4, dtype=torch.bool))
    counts = []
    for steps in (2, 3):
        config = GenerationConfig(max_new_tokens=steps, eos_token_ids=(), pad_token_id=0)
        with torch.inference_mode(), _OpCount() as count:
            generate_tokens(net, prompt, ExitPolicy.never(), config)
        counts.append(count.ops)
    return counts[1] - counts[0]


def test_a_decode_step_dispatches_few_torch_ops_per_layer():
    """On a CPU each dispatched op costs microseconds whatever its size, and SmolLM2 runs 30 layers a token:
    the op count per layer is the decode step's fixed overhead, counted here where timing would be noise."""
    per_layer = (_ops_per_step(4) - _ops_per_step(2)) / 2
    assert per_layer <= MAX_OPS_PER_LAYER, per_layer
