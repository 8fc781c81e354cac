"""Gemma 1/2/3, Phi-3, OLMo-2, GPT-NeoX, Granite and StableLM against transformers.

The models are test_parity's tiny variants of these families (VARIANTS), built so that each quirk
binds: softcaps below the scores and logits they cap, a sliding window shorter than the prompts,
partial rotary, multipliers != 1, parallel residuals, q/k norms, norm weights not all ones (and
test_each_quirk_changes_the_models_output shows that they bind). test_parity checks their
never-exit generation at batch 3 with ragged prompts and test_speculative their lossless decoding;
here: batch 1, 20 steps of logits, rows under mixed exits, state propagation, the static engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch._dynamo
import transformers as tf
from torch._dynamo.utils import counters

from calm import CalmModel
from calm.adapters import adapter_for
from calm.engine.decode import Network
from calm.engine.generation import PromptBatch, generate_tokens
from calm.errors import UnsupportedModelError
from calm.exits.policy import ExitPolicy
from test_adapters import _calm_logits, _check_propagation, gen_config, row
from test_parity import VARIANTS, build, features, hf_greedy, prompts

FAMILIES = ("gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox", "granite", "stablelm")
NAMES = [name for name, (_, config_class, _, _) in VARIANTS.items() if config_class.model_type in FAMILIES]
# (state, softmax) thresholds at which rows exit at different layers: Gemma 2/3's post-norms keep the state
# close to the embedding's, and softcapped or scaled logits are flatter
MIXED = {
    "gemma2-window-softcap-untied": (0.98, 0.05),
    "gemma2-global-softcap-tied": (0.98, 0.15),
    "gemma3-local-global-two-bases-tied": (0.98, 0.15),
    "gemma3-global-untied": (0.98, 0.1),
    "granite-multipliers-gqa-untied": (0.9, 0.1),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: build(name) for name in NAMES}


def batch(model: torch.nn.Module, max_new: int) -> PromptBatch:
    """test_parity's 3 prompts (5, 9 and 12 tokens), left-padded."""
    return CalmModel.from_model(model).encode_prompts(prompts(), max_new)


def windowed(model: torch.nn.Module) -> bool:
    return "window" in features(model)


def test_every_family_is_covered():
    assert {VARIANTS[name][1].model_type for name in NAMES} == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_never_exit_matches_generate_at_batch_1(models, name):
    model = models[name]
    longest = [prompts()[-1]]  # 12 tokens: past the sliding window
    ours = CalmModel.from_model(model).generate(longest, max_new_tokens=8)
    assert ours.token_ids == hf_greedy(model, longest)
    assert len(ours.token_ids[0]) > 1


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_over_20_steps(models, name):
    """Full-depth logits (softcaps and logits_scaling included) of 20 steps at batch 3, against one
    transformers forward over each row's whole sequence."""
    model, steps = models[name], 20
    p = batch(model, steps)
    ours, tokens = _calm_logits(Network.build(adapter_for(model)), p, steps)
    ids = torch.cat([p.ids, tokens[:, :-1]], 1)
    mask = torch.cat([p.mask, torch.ones_like(tokens[:, :-1], dtype=torch.bool)], 1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask.long(), position_ids=positions).logits[:, p.ids.shape[1] - 1 :]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)


def policies(name: str) -> list[ExitPolicy]:
    state, softmax = MIXED.get(name, (0.9, 0.3))
    return [ExitPolicy(measure="state", threshold=state), ExitPolicy(measure="softmax", threshold=softmax)]


@pytest.mark.parametrize("name", NAMES)
def test_rows_under_mixed_exits_match_their_solo_runs(models, name):
    net = Network.build(adapter_for(models[name]))
    p = batch(models[name], 10)
    for policy in policies(name):
        together = generate_tokens(net, p, policy, gen_config())
        decode_exits = {k for r in together.exit_layers for k in r[1:]}
        assert len(decode_exits) >= 2 and min(decode_exits) < net.num_layers, (policy, decode_exits)
        for b in range(p.ids.shape[0]):
            alone = generate_tokens(net, row(p, b), policy, gen_config())
            assert alone.token_ids[0] == together.token_ids[b], f"{policy.measure}: row {b}"
            assert alone.exit_layers[0] == together.exit_layers[b], f"{policy.measure}: row {b}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_fixed_exit_propagates_kv_of_the_exit_state(models, name, k):
    """Every skipped layer's cache slot holds K/V recomputed from the exit state, through that layer's
    own norms, window and rotary table; also with a finished row left out of the step."""
    net, p = Network.build(adapter_for(models[name])), batch(models[name], 4)
    assert _check_propagation(net, p, ExitPolicy.fixed(k), torch.arange(3)).tolist() == [k] * 3
    _check_propagation(net, p, ExitPolicy.fixed(k), torch.tensor([0, 2]))


@pytest.mark.parametrize("name", NAMES)
def test_mixed_exits_propagate_each_rows_own_state(models, name):
    net, p = Network.build(adapter_for(models[name])), batch(models[name], 4)
    seen: set[int] = set()
    states = [ExitPolicy(measure="state", threshold=t, decay_tau=0) for t in (0.6, 0.7, 0.8, 0.9, 0.95, 0.98)]
    margins = [ExitPolicy(measure="softmax", threshold=t, decay_tau=0) for t in (0.01, 0.03, 0.1, 0.3)]
    for policy in states + margins:
        exits = _check_propagation(net, p, policy, torch.arange(3)).tolist()
        seen |= {len(set(exits))}
    assert max(seen) >= 2, "no step had rows exiting at different layers"


@pytest.mark.parametrize("name", NAMES)
def test_static_engine_gives_the_dynamic_tokens_or_refuses(models, name):
    model = models[name]
    calm, p = CalmModel.from_model(model), batch(model, 8)
    if windowed(model):
        with pytest.raises(UnsupportedModelError, match="sliding-window"):
            calm.generate(p.ids, attention_mask=p.mask, max_new_tokens=3, engine="static")
        return
    net = Network.build(adapter_for(model))
    for policy in [ExitPolicy.never(), ExitPolicy.fixed(2), *policies(name)]:
        dynamic, static = (
            generate_tokens(net, p, policy, replace(gen_config(8), engine=engine)) for engine in ("dynamic", "static")
        )
        assert static.token_ids == dynamic.token_ids, policy
        assert static.exit_layers == dynamic.exit_layers, policy
    assert calm.generate(prompts(), max_new_tokens=8, engine="static").token_ids == hf_greedy(model, prompts())


@pytest.mark.parametrize(
    "name", ["gemma2-global-softcap-tied", "gemma3-global-untied", "gpt_neox-parallel-partial-rotary-untied"]
)
def test_compiled_static_step_is_one_graph(models, name):
    """torch.compile(fullgraph=True) captures the step of a family with capped attention scores, of one with
    per-layer rotary tables and of one with a fused, reordered q|k|v: the dynamic path's tokens, no graph break."""
    torch._dynamo.reset()
    counters.clear()
    try:
        net, policy = Network.build(adapter_for(models[name])), policies(name)[0]
        p = batch(models[name], 6)
        dynamic, compiled = (
            generate_tokens(net, p, policy, replace(gen_config(6), **c))
            for c in ({"engine": "dynamic"}, {"engine": "static", "compile": "eager"})
        )
        assert compiled.token_ids == dynamic.token_ids and compiled.exit_layers == dynamic.exit_layers
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_gpt_neox_follows_in_place_weight_updates():
    """calm's reordered copy of GPT-NeoX's query_key_value is rebuilt when the weight changes in place."""
    model = build("gpt_neox-sequential-tied")
    calm, rows = CalmModel.from_model(model), prompts()
    assert calm.generate(rows, max_new_tokens=8).token_ids == hf_greedy(model, rows)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(-1.5)
    assert calm.generate(rows, max_new_tokens=8).token_ids == hf_greedy(model, rows)


# ---- the quirks bind -----------------------------------------------------------------------------


def _layers(model: torch.nn.Module) -> list:
    return list(model.model.layers)


def _no_multipliers(model: torch.nn.Module) -> None:
    model.config.logits_scaling = 1.0
    model.model.embedding_multiplier = 1.0
    for layer in _layers(model):
        layer.residual_multiplier = 1.0
        layer.self_attn.scaling = layer.self_attn.head_dim**-0.5


# feature (test_parity.features) -> how to switch it off in a copy of the transformers model
SWITCH_OFF: dict[str, Callable[[torch.nn.Module], None]] = {
    "logit-softcap": lambda m: setattr(m.config, "final_logit_softcapping", None),
    "attn-softcap": lambda m: [setattr(layer.self_attn, "attn_logit_softcapping", None) for layer in _layers(m)],
    "window": lambda m: setattr(m.config, "sliding_window", 10**6),
    "multipliers": _no_multipliers,
}


@pytest.mark.parametrize("name", NAMES)
def test_each_quirk_changes_the_models_output(models, name):
    """Switched off in transformers' own model, each softcap, window and multiplier moves the logits."""
    model = models[name]
    p = batch(model, 1)
    with torch.no_grad():
        ref = model(p.ids, attention_mask=p.mask.long()).logits
        for feature in sorted(features(model) & set(SWITCH_OFF)):
            plain = copy.deepcopy(model)
            SWITCH_OFF[feature](plain)
            moved = (plain(p.ids, attention_mask=p.mask.long()).logits - ref).abs().max().item()
            assert moved > 0.1, f"{feature} barely matters: {moved}"


# ---- refused -------------------------------------------------------------------------------------

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=8, use_bidirectional_attention=True, **SMALL)),
        lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, use_bidirectional_attention=True, **SMALL)),
        lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, use_bidirectional_attention=True, **SMALL)),
    ],
    ids=["gemma", "gemma2", "gemma3_text"],
)
def test_bidirectional_gemma_is_refused(make):
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        adapter_for(make())


@pytest.mark.parametrize(
    "make",
    [
        lambda: tf.GPTNeoXModel(tf.GPTNeoXConfig(**SMALL)),
        lambda: tf.Gemma2Model(tf.Gemma2Config(head_dim=8, **SMALL)),
        lambda: tf.Phi3Model(tf.Phi3Config(pad_token_id=0, **SMALL)),
    ],
    ids=["GPTNeoXModel", "Gemma2Model", "Phi3Model"],
)
def test_models_without_an_lm_head_are_refused(make):
    with pytest.raises(UnsupportedModelError, match="LM head"):
        adapter_for(make())
