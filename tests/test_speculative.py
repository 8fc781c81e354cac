"""Speculative decoding (calm.speculative.drafting): the full model's output, token for token (greedy) or in
distribution (sampling), whatever the exit layers draft; the draft controller; rollback of rejected slots.

Tiny random models of each family, as in test_adapters: their early layers draft poorly, so most
cycles reject some drafts and accept others (checked), which is what the tests must cover.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from calm import CalmModel
from calm.adapters import adapter_for
from calm.bench import transformers_generate
from calm.engine.decode import Network, prefill
from calm.engine.generation import GenerationConfig, PromptBatch, _start, generate_tokens
from calm.engine.sampling import SamplingConfig, filter_logits
from calm.errors import InputError, PolicyError
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl, summary_prompt, truncate_document
from calm.speculative.drafting import SpeculativeConfig, SpeculativeStats, default_draft_policy, draft, draft_plan
from calm.speculative.loop import generate_speculative
from calm.speculative.tree import Accepted
from calm.speculative.verification import rollback
from test_adapters import EOS, KINDS, build, gen_config, hf_greedy, prompts, row
from test_parity import VARIANTS as PARITY_VARIANTS
from test_parity import build as build_variant
from test_parity import prompts as parity_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

ALWAYS = ExitPolicy(measure="fixed", threshold=0.0)  # draft k tokens every cycle
SETTINGS = [(1, 1), (2, 2), (3, 4), (1, 4)]  # (E, k)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: build(kind) for kind in KINDS}


def speculative(
    net: Network,
    p: PromptBatch,
    e: int,
    k: int,
    policy: ExitPolicy = ALWAYS,
    max_new: int = 12,
    config: GenerationConfig | None = None,
):
    return generate_speculative(net, p, policy, config or gen_config(max_new), SpeculativeConfig(e, k))


# ------------------------------------------------------------------------------------------------
# greedy: exactly the full model's tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_full_depth_calm_and_transformers(models, kind, batch):
    model = models[kind]
    net = Network.build(adapter_for(model))
    p = prompts() if batch == 4 else row(prompts(seed=2), 0)
    full = generate_tokens(net, p, ExitPolicy.never(), gen_config(12))
    assert full.token_ids == hf_greedy(model, p, 12)
    drafted = accepted = 0
    for e, k in SETTINGS:
        out = speculative(net, p, e, k)
        assert out.token_ids == full.token_ids, f"E={e} k={k}"
        assert set(out.exit_layers) == set(full.exit_layers)
        stats = out.speculative
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        assert stats.row_cycles >= stats.cycles >= 1 and stats.draft_s > 0 and stats.verify_s > 0
    assert 0 < accepted < drafted, "the settings must cover both accepted and rejected drafts"


def _upper_layers_as_identity(model: torch.nn.Module, e: int) -> torch.nn.Module:
    """A Llama whose layers e+1..L add nothing to the residual stream: the layer-e draft is the full model."""
    with torch.no_grad():
        for layer in model.model.layers[e:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("k", [1, 3, 4])
def test_a_perfect_draft_is_accepted_whole_with_the_bonus_token(k):
    """Also the budget: with k=4 the last cycle may draft only 1 token, or a row would pass max_new_tokens."""
    model = _upper_layers_as_identity(build("llama"), 2)
    net = Network.build(adapter_for(model))
    p, max_new = prompts(), 13
    out = speculative(net, p, 2, k, max_new=max_new, config=GenerationConfig(max_new_tokens=max_new, pad_token_id=0))
    assert (
        out.token_ids == generate_tokens(net, p, ExitPolicy.never(), GenerationConfig(max_new_tokens=max_new)).token_ids
    )
    stats = out.speculative
    assert stats.acceptance_rate == 1.0
    # every cycle commits k drafts + the bonus token: 12 tokens after the prefill's in ⌈12 / (k + 1)⌉ cycles
    assert stats.cycles == -(-(max_new - 1) // (k + 1))
    assert all(len(r) == max_new for r in out.token_ids)


def test_rows_stop_at_eos_as_full_depth_does(models):
    net = Network.build(adapter_for(models["llama"]))
    p = prompts()
    free = generate_tokens(net, p, ExitPolicy.never(), GenerationConfig(max_new_tokens=10))
    eos = free.token_ids[0][3]
    config = GenerationConfig(max_new_tokens=10, eos_token_ids=(eos, EOS), pad_token_id=0)
    full = generate_tokens(net, p, ExitPolicy.never(), config)
    assert len(full.token_ids[0]) == 4
    for e, k in SETTINGS:
        assert speculative(net, p, e, k, config=config).token_ids == full.token_ids


def test_each_row_gets_what_it_gets_alone(models):
    net = Network.build(adapter_for(models["gpt2"]))
    p = prompts()
    together = speculative(net, p, 2, 3)
    for b in range(4):
        assert speculative(net, row(p, b), 2, 3).token_ids[0] == together.token_ids[b]


# ------------------------------------------------------------------------------------------------
# the draft controller, drafts and rollback
# ------------------------------------------------------------------------------------------------


def _heads_confident_at(layer: int, confident: bool) -> ExitHeads:
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4))
    with torch.no_grad():
        heads.cls_bias.fill_(-10.0)
        heads.cls_bias[layer - 1] = 10.0 if confident else -10.0
    return heads


@pytest.mark.parametrize("confident", [True, False])
def test_the_exit_classifier_controls_the_draft_length(models, confident):
    llama = models["llama"]
    net = Network.build(adapter_for(llama), _heads_confident_at(2, confident))
    p = prompts()
    policy = ExitPolicy(measure="classifier", threshold=0.5)
    out = speculative(net, p, 2, 3, policy=policy)
    assert out.token_ids == generate_tokens(net, p, ExitPolicy.never(), gen_config(12)).token_ids
    stats = out.speculative
    if confident:
        assert stats.drafted > 0 and stats.mean_draft_length > 2
    else:
        assert stats.drafted == 0 and stats.cycles == max(len(r) for r in out.token_ids) - 1


def test_never_policy_drafts_nothing_and_default_controller(models):
    net = Network.build(adapter_for(models["llama"]))
    assert speculative(net, prompts(), 2, 2, policy=ExitPolicy.never()).speculative.drafted == 0
    assert default_draft_policy(net).measure == "fixed"
    with_heads = Network.build(adapter_for(models["llama"]), _heads_confident_at(2, True))
    assert default_draft_policy(with_heads).measure == "classifier"


def test_rows_draft_different_lengths_and_rollback_masks_rejected_slots(models):
    net = Network.build(adapter_for(models["llama"]))
    spec = SpeculativeConfig(2, 4)
    policy = ExitPolicy(measure="softmax", threshold=0.05, decay_tau=0)
    with torch.inference_mode():
        state, first_ids = _start(net, prompts(), 40)
        pending = net.greedy_tokens(prefill(net, first_ids, state).hidden, torch.full((4,), 4))
        live, budget = torch.ones(4, dtype=torch.bool), torch.full((4,), 10)
        start, positions = state.cache.length, state.positions.clone()
        d = draft(net, spec, draft_plan(policy, net, spec), state, pending, live, budget, 0.05, SamplingConfig(), None)
    counts = d.counts.tolist()
    assert len(set(counts)) >= 3 and counts[0] >= 2 and counts[1] >= 1, counts
    width = d.hidden.shape[1]
    assert width == max(counts) + 1 and d.tokens.shape == (4, width - 1)
    for b, c in enumerate(counts):  # a row's drafted slots are real, the rest masked
        assert state.cache.key_mask[b, start : start + width].tolist() == [True] * (c + 1) + [False] * (width - 1 - c)
    accepted = torch.tensor([2, 1, counts[2], 0])
    live = torch.tensor([True, True, True, False])
    with torch.inference_mode():
        rollback(state, d, Accepted(accepted, accepted, accepted), live)
    assert state.cache.length == start + 3  # the longest kept run: row 0's pending + 2
    for b in range(4):
        kept = int(accepted[b]) + 1 if live[b] else 0
        assert state.cache.key_mask[b, start : start + width].tolist() == [True] * kept + [False] * (width - kept)
    assert (state.positions - positions).tolist() == [3, 2, counts[2] + 1, 0]


def test_stats_arithmetic():
    stats = SpeculativeStats(
        draft_layer=2, max_draft=4, cycles=3, row_cycles=6, drafted=12, accepted=3, draft_s=1.0, verify_s=2.0
    )
    assert stats.acceptance_rate == 0.25 and stats.mean_accepted_length == 0.5 and stats.mean_draft_length == 2.0
    assert stats.to_dict()["acceptance_rate"] == 0.25


# ------------------------------------------------------------------------------------------------
# sampling: the full model's distribution
# ------------------------------------------------------------------------------------------------

PROMPT = torch.tensor([[5, 17, 33, 8, 90, 41]])
SAMPLES = 3000


def exact_distribution(model: torch.nn.Module, sampling: SamplingConfig, steps: int, floor: float = 1e-4) -> dict:
    """P(first `steps` tokens) under the full model's (filtered) sampling distribution; sequences below
    `floor` are dropped (their mass goes to the pooled cell of the test)."""
    seqs, probs = torch.zeros(1, 0, dtype=torch.long), torch.ones(1, dtype=torch.float64)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.cat([PROMPT.expand(len(seqs), -1), seqs], 1)).logits[:, -1]
        joint = probs[:, None] * filter_logits(logits, sampling).softmax(-1).double()  # [n, V]
        prefix, token = (joint > floor).nonzero(as_tuple=True)
        seqs, probs = torch.cat([seqs[prefix], token[:, None]], 1), joint[prefix, token]
    return {tuple(s): p for s, p in zip(seqs.tolist(), probs.tolist())}


def chi_square_pvalue(samples: list[tuple[int, ...]], truth: dict, n: int) -> float:
    """Pearson's test of the samples against truth, over the sequences expected >= 5 times plus one pooled cell."""
    counts = Counter(samples)
    cells = [s for s in truth if truth[s] * n >= 5]
    expected = [truth[s] * n for s in cells]
    observed = [counts[s] for s in cells]
    expected.append(n - sum(expected))
    observed.append(n - sum(observed))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = torch.tensor((len(cells)) / 2, dtype=torch.float64)
    assert len(cells) >= 10, "too few cells for a meaningful test"
    return torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize(
    "sampling, policy, k",
    [
        (SamplingConfig(True, temperature=0.7, seed=4), ALWAYS, 3),
        (SamplingConfig(True, top_k=10, seed=5), ExitPolicy(measure="softmax", threshold=0.3, decay_tau=0), 3),
    ],
    ids=["t0.7-always", "topk10-softmax"],
)
def test_sampling_follows_the_full_models_distribution(models, sampling, policy, k):
    """Chi-square on the joint of the first 4 tokens over 3000 independent rows, against the exact
    distribution. The exit layer's own samples (the drafts, unverified) fail the same test."""
    model, steps = models["llama"], 4
    net = Network.build(adapter_for(model))
    truth = exact_distribution(model, sampling, steps)
    batch = PromptBatch(PROMPT.expand(SAMPLES, -1), torch.ones(SAMPLES, PROMPT.shape[1], dtype=torch.bool))
    config = GenerationConfig(max_new_tokens=steps, pad_token_id=0, sampling=sampling)
    out = generate_speculative(net, batch, policy, config, SpeculativeConfig(2, k))
    assert 0.05 < out.speculative.acceptance_rate < 0.95, out.speculative
    assert chi_square_pvalue(list(out.token_ids), truth, SAMPLES) > 1e-3
    drafts_only = generate_tokens(net, batch, ExitPolicy.fixed(2), config)
    assert chi_square_pvalue(list(drafts_only.token_ids), truth, SAMPLES) < 1e-6


# ------------------------------------------------------------------------------------------------
# the API
# ------------------------------------------------------------------------------------------------


def test_generate_speculative_mode_and_its_errors(models):
    model = CalmModel.from_model(models["llama"])
    ids = prompts().ids[:1]
    full = model.generate(ids, max_new_tokens=8)
    out = model.generate(ids, max_new_tokens=8, mode="speculative", draft_layer=2, max_draft=3)
    assert out.token_ids == full.token_ids and out.speculative.draft_layer == 2 and out.speculative.max_draft == 3
    assert "speculative" in out.to_dict() and "speculative" not in full.to_dict()
    assert model.generate(ids, max_new_tokens=8, mode="speculative").speculative.draft_layer == 2  # L / 2
    with pytest.raises(PolicyError, match="draft layer 4"):
        model.generate(ids, max_new_tokens=8, mode="speculative", draft_layer=4)
    with pytest.raises(PolicyError, match="max_draft"):
        model.generate(ids, max_new_tokens=8, mode="speculative", draft_layer=2, max_draft=0)
    with pytest.raises(InputError, match="mode"):
        model.generate(ids, max_new_tokens=8, mode="lossy")
    with pytest.raises(PolicyError, match="classifier"):
        model.generate(
            ids, max_new_tokens=8, mode="speculative", policy=ExitPolicy(measure="classifier", threshold=0.5)
        )


# ------------------------------------------------------------------------------------------------
# the real embedded model
# ------------------------------------------------------------------------------------------------

SMOKE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "xsum" / "smoke.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE.is_file(), reason="../shared/data is not beside the repo")
def test_real_model_speculative_output_is_the_full_models_on_8_documents():
    """SmolLM2 with its shipped heads: 8 smoke documents as one batch (rows of different lengths accept
    different numbers of drafts), two draft settings, against full depth and transformers generate."""
    model = CalmModel.from_pretrained("smollm2", weights="float32")  # exact with transformers: float32 weights
    docs = read_jsonl(SMOKE, limit=8)
    prompts = [summary_prompt(truncate_document(model.tokenizer, d.document, 256)) for d in docs]
    full = model.generate(prompts, max_new_tokens=32)
    assert list(full.token_ids) == transformers_generate(model, model.encode_prompts(prompts, 32), 32)
    for e, k, policy in ((15, 4, None), (20, 2, ExitPolicy(measure="fixed", threshold=0.0))):
        out = model.generate(prompts, max_new_tokens=32, policy=policy, mode="speculative", draft_layer=e, max_draft=k)
        assert out.token_ids == full.token_ids, f"E={e} k={k}"
        stats = out.speculative
        assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("name", sorted(PARITY_VARIANTS))
def test_every_accepted_architecture_variant_decodes_losslessly(name):
    """test_parity's models (sliding windows, no-RoPE layers, T5 decoders deeper and shallower than their
    encoders, ...): speculative decoding of a batch of 3 rows of different lengths gives full depth's tokens."""
    model = build_variant(name)
    net = Network.build(adapter_for(model))
    p = CalmModel.from_model(model).encode_prompts(parity_prompts(), 8)
    full = generate_tokens(net, p, ExitPolicy.never(), gen_config(8))
    for e, k in ((1, 3), (net.num_layers - 1, 2)):
        assert speculative(net, p, e, k, max_new=8).token_ids == full.token_ids, f"E={e} k={k}"


def _layer_outputs(net: Network, run) -> dict[tuple[int, int], torch.Tensor]:
    """Every layer's output per (layer, position) over a generation: the last computed wins (a rejected
    draft's slot is computed again for the token that replaced it)."""
    seen: dict[tuple[int, int], torch.Tensor] = {}
    finish = net.adapter.finish_layer

    def spy(layer, h, x, k, v, ctx, rows=None, q=None):
        out = finish(layer, h, x, k, v, ctx, rows, q)
        positions = ctx.positions if rows is None else ctx.positions.index_select(0, rows)
        for t, position in enumerate(positions[0].tolist()):
            seen[(layer, position)] = out[0, t].clone()
        return out

    net.adapter.finish_layer = spy  # type: ignore[method-assign]
    try:
        run()
    finally:
        del net.adapter.finish_layer
    return seen


def test_a_batch_1_chain_is_verified_bit_for_bit_as_the_full_models_steps():
    """Verifying a chain attends query by query (calm.adapters.base.attend's ends): one masked call over all
    drafted slots rounds differently where the keys' count crosses a vector width, which native weights'
    bfloat16 activations amplify into different tokens. 40 tokens cross three multiples of 16 keys."""
    from helpers import tiny_llama

    net = Network.build(adapter_for(tiny_llama(layers=2)))
    prompt = PromptBatch(torch.tensor([[2, 5, 6, 7, 5, 6, 7, 5]]), torch.ones(1, 8, dtype=torch.bool))
    config = GenerationConfig(max_new_tokens=40, eos_token_ids=(), pad_token_id=0)
    spec = SpeculativeConfig(draft_layer=1, max_draft=3, lookup=True)
    full = _layer_outputs(net, lambda: generate_tokens(net, prompt, ExitPolicy.never(), config))
    lossless = _layer_outputs(net, lambda: generate_speculative(net, prompt, ExitPolicy.never(), config, spec))
    assert full.keys() <= lossless.keys()
    assert all(torch.equal(full[key], lossless[key]) for key in full)
