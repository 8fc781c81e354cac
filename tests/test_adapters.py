"""Adapters against transformers: greedy parity, per-row isolation under early exit, state propagation.

Tiny random models (seeded, initialised with large weights so greedy argmaxes are far from ties)
of each supported family: Llama (RoPE, GQA), GPT-2 (learned positions, Conv1D) and T5
(encoder-decoder, relative position bias, cross-attention).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from calm.adapters import adapter_for
from calm.adapters.base import RowAttention, attend, attention_mask, padding_free_mask
from calm.adapters.gpt2 import GPT2Adapter
from calm.adapters.llama import LlamaAdapter, apply_ready_rope, ready_rope
from calm.adapters.t5 import T5Adapter
from calm.engine.decode import ExitPlan, Network, decode_one_token, prefill
from calm.engine.generation import GenerationConfig, PromptBatch, _start, generate_tokens
from calm.errors import UnsupportedModelError
from calm.exits.policy import ExitPolicy

VOCAB, PAD, EOS = 128, 0, 1
MAX_NEW = 10
PAD_LENGTHS = (0, 3, 5, 1)  # left padding of the 4 rows of the batch
PROMPT_LEN = 9
WINDOW = 4  # sliding window, shorter than the prompts
KINDS = ("llama", "mistral-window", "smollm3-window", "gpt2", "t5")


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    decoder = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif kind == "mistral-window":
        model = MistralForCausalLM(MistralConfig(sliding_window=WINDOW, **decoder))
    elif kind == "smollm3-window":
        # layers 1 and 3 without RoPE and with a sliding window (SmolLM3 puts the window on its no-RoPE layers)
        model = SmolLM3ForCausalLM(
            SmolLM3Config(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW, **decoder)
        )
    elif kind == "gpt2":
        cfg = GPT2Config(
            n_layer=4,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            initializer_range=0.2,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=2,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        # an encoder shallower than the decoder, so encoder and decoder layer counts cannot be confused
        cfg = T5Config(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_heads=4,
            num_layers=3,
            num_decoder_layers=4,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=PAD,
            eos_token_id=EOS,
            initializer_factor=5.0,
        )
        model = T5ForConditionalGeneration(cfg)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: build(kind) for kind in KINDS}


def prompts(batch: int = 4, seed: int = 1) -> PromptBatch:
    """Left-padded prompts of distinct real lengths; no EOS or pad inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for b in range(batch):
        mask[b, : PAD_LENGTHS[b % len(PAD_LENGTHS)]] = False
    return PromptBatch(ids.masked_fill(~mask, PAD), mask)


def row(p: PromptBatch, b: int) -> PromptBatch:
    """Row b alone, without its padding."""
    keep = p.mask[b]
    return PromptBatch(p.ids[b : b + 1, keep], p.mask[b : b + 1, keep])


def gen_config(max_new: int = MAX_NEW) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new, eos_token_ids=(EOS,), pad_token_id=PAD)


def trim(tokens: list[int]) -> tuple[int, ...]:
    return tuple(tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens)


def hf_greedy(model: torch.nn.Module, p: PromptBatch, max_new: int) -> tuple[tuple[int, ...], ...]:
    kwargs = {}
    if model.config.is_encoder_decoder:
        # transformers sizes its default cache by the encoder's num_layers, which breaks when the decoder
        # is deeper (IndexError in cache.update); a cache that grows on demand avoids it.
        kwargs["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = model.generate(
            p.ids,
            attention_mask=p.mask.long(),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=PAD,
            eos_token_id=EOS,
            **kwargs,
        )
    new = out[:, 1:] if model.config.is_encoder_decoder else out[:, p.ids.shape[1] :]
    return tuple(trim(r) for r in new.tolist())


def is_decoder_only(model: torch.nn.Module) -> bool:
    return not model.config.is_encoder_decoder


# ------------------------------------------------------------------------------------------------
# adapter selection
# ------------------------------------------------------------------------------------------------


def test_adapter_for_picks_the_family(models):
    assert isinstance(adapter_for(models["llama"]), LlamaAdapter)
    assert isinstance(adapter_for(models["gpt2"]), GPT2Adapter)
    t5 = adapter_for(models["t5"])
    assert isinstance(t5, T5Adapter) and t5.is_encoder_decoder
    assert t5.num_layers == 4 and t5.num_kv_heads == 4 and t5.head_dim == 16
    assert t5.decoder_start_ids(3).tolist() == [[0], [0], [0]]
    g = adapter_for(models["gpt2"])
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.hidden_size) == (4, 4, 16, 64)


def test_gpt2_rejects_cross_attention():
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, add_cross_attention=True)
    with pytest.raises(UnsupportedModelError, match="add_cross_attention"):
        adapter_for(GPT2LMHeadModel(cfg))


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)),
        lambda: LlamaModel(
            LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        ),
        lambda: T5EncoderModel(T5Config(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, vocab_size=32)),
    ],
    ids=["GPT2Model", "LlamaModel", "T5EncoderModel"],
)
def test_models_without_an_lm_head_are_refused(make):
    with pytest.raises(UnsupportedModelError, match="LM head"):
        adapter_for(make())


# ------------------------------------------------------------------------------------------------
# (a) parity with transformers' greedy generate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_parity_with_transformers(models, kind, batch):
    model = models[kind]
    p = prompts() if batch == 4 else row(prompts(seed=2), 0)
    res = generate_tokens(Network.build(adapter_for(model)), p, ExitPolicy.never(), gen_config())
    assert res.token_ids == hf_greedy(model, p, MAX_NEW)
    assert all(k == res.num_layers for r in res.exit_layers for k in r)
    assert all(len(r) > 1 for r in res.token_ids)  # the comparison covers decode steps


def _calm_logits(net: Network, p: PromptBatch, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-depth logits [B, steps, V] along calm's own greedy path, and that path [B, steps]."""
    plan = ExitPlan.resolve(ExitPolicy.never(), net)
    with torch.inference_mode():
        state, first_ids = _start(net, p, steps)
        out = prefill(net, first_ids, state)
        logits = [net.token_logits(out.hidden, out.exit_layers)]
        tokens = [logits[-1].argmax(-1)]
        rows = torch.arange(first_ids.shape[0])
        for _ in range(steps - 1):
            out = decode_one_token(net, plan, tokens[-1], state, 2.0, rows)
            logits.append(net.token_logits(out.hidden, out.exit_layers))
            tokens.append(logits[-1].argmax(-1))
    return torch.stack(logits, 1), torch.stack(tokens, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_forward(models, kind):
    """Every step's full-depth logits equal a plain transformers forward over the same sequence."""
    model, p, steps = models[kind], prompts(), 6
    ours, tokens = _calm_logits(Network.build(adapter_for(model)), p, steps)
    with torch.no_grad():
        if is_decoder_only(model):
            ids = torch.cat([p.ids, tokens[:, :-1]], 1)
            mask = torch.cat([p.mask, torch.ones_like(tokens[:, :-1], dtype=torch.bool)], 1)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            ref = model(ids, attention_mask=mask.long(), position_ids=positions).logits[:, PROMPT_LEN - 1 :]
        else:
            dec = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], 1)
            ref = model(input_ids=p.ids, attention_mask=p.mask.long(), decoder_input_ids=dec).logits
    # float32 sums run in another order here than in one forward over the sequence, and by how much that
    # moves a logit depends on the CPU's kernels (up to 4e-4 seen on AVX-512); a real error is far larger
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)


def test_mt5_gated_unscaled_matches_transformers():
    """mT5 / T5 v1.1: gated-GELU feed-forward and no d_model**-0.5 scaling before the LM head."""
    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(
        MT5Config(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=3,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=PAD,
            eos_token_id=EOS,
            initializer_factor=5.0,
        )
    ).eval()
    net = Network.build(adapter_for(model))
    assert isinstance(net.adapter, T5Adapter) and net.adapter.output_scale is None
    p = prompts()
    assert generate_tokens(net, p, ExitPolicy.never(), gen_config()).token_ids == hf_greedy(model, p, MAX_NEW)
    ours, tokens = _calm_logits(net, p, 6)
    with torch.no_grad():
        dec = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], 1)
        ref = model(input_ids=p.ids, attention_mask=p.mask.long(), decoder_input_ids=dec).logits
    # unscaled logits reach the hundreds: compare relative to their scale
    torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# (b) isolation: a row's tokens and exits do not depend on the rest of the batch
# ------------------------------------------------------------------------------------------------

ISOLATION_POLICIES = {
    "llama": [ExitPolicy(measure="state", threshold=0.9), ExitPolicy(measure="softmax", threshold=0.3)],
    "mistral-window": [ExitPolicy(measure="state", threshold=0.9), ExitPolicy(measure="softmax", threshold=0.3)],
    "smollm3-window": [ExitPolicy(measure="state", threshold=0.9), ExitPolicy(measure="softmax", threshold=0.3)],
    "gpt2": [ExitPolicy(measure="state", threshold=0.9), ExitPolicy(measure="softmax", threshold=0.3)],
    "t5": [ExitPolicy(measure="state", threshold=0.9), ExitPolicy(measure="softmax", threshold=0.9)],
}


@pytest.mark.parametrize(
    "kind,policy",
    [(k, pol) for k in KINDS for pol in ISOLATION_POLICIES[k]],
    ids=lambda v: v if isinstance(v, str) else f"{v.measure}{v.threshold}",
)
def test_rows_are_isolated_under_mixed_exits(models, kind, policy):
    net = Network.build(adapter_for(models[kind]))
    p = prompts()
    together = generate_tokens(net, p, policy, gen_config())
    decode_exits = {k for r in together.exit_layers for k in r[1:]}
    assert len(decode_exits) >= 2 and min(decode_exits) < net.num_layers, decode_exits
    for b in range(p.ids.shape[0]):
        alone = generate_tokens(net, row(p, b), policy, gen_config())
        assert alone.token_ids[0] == together.token_ids[b], f"row {b}"
        assert alone.exit_layers[0] == together.exit_layers[b], f"row {b}"


# ------------------------------------------------------------------------------------------------
# (c) state propagation: a skipped layer's cache holds K/V of the exit hidden state
# ------------------------------------------------------------------------------------------------


def _check_propagation(net: Network, p: PromptBatch, policy: ExitPolicy, rows: torch.Tensor) -> torch.Tensor:
    """One decode step under `policy` after two full-depth ones; checks the step's cache slot for `rows`
    layer by layer against K/V computed directly from each row's own hidden states. Returns the exits."""
    a = net.adapter
    never = ExitPlan.resolve(ExitPolicy.never(), net)
    with torch.inference_mode():
        state, first_ids = _start(net, p, 4)
        out = prefill(net, first_ids, state)
        tokens = net.greedy_tokens(out.hidden, out.exit_layers)
        every = torch.arange(tokens.shape[0])
        for _ in range(2):
            out = decode_one_token(net, never, tokens, state, 2.0, every)
            tokens = net.greedy_tokens(out.hidden, out.exit_layers)
        slot, positions = state.cache.length, state.positions.clone()[:, None]
        out = decode_one_token(net, ExitPlan.resolve(policy, net), tokens, state, policy.threshold, rows)
        cache = state.cache
        assert cache.length == slot + 1

        ctx = a.context(positions, cache.key_mask, slot, state.encoder)
        h = a.embed(tokens[:, None], positions)
        states = [h]  # states[i]: hidden state after i layers
        for i in range(a.num_layers):
            x = a.attn_input(i, h)
            kc, vc = cache.keys_values(i, slot + 1)
            h = a.finish_layer(i, h, x, kc, vc, ctx)
            states.append(h)
        for b in rows.tolist():
            e = int(out.exit_layers[b])
            for j in range(a.num_layers):
                src = states[min(j, e)]  # below the exit: its own state; above: the exit state
                k, v = (t[b : b + 1] for t in a.kv(j, a.attn_input(j, src), ctx))
                for name, got, want in (("K", cache.k, k), ("V", cache.v, v)):
                    # 1e-5 relative to the tensor's scale: the step ran on other row subsets (other matmul
                    # shapes), and T5's large-init hidden states reach the hundreds
                    tol = 1e-5 * max(1.0, want.abs().max().item())
                    where = f"{name} of row {b}, layer {j}, exit {e}"
                    torch.testing.assert_close(
                        got[j, b : b + 1, :, slot : slot + 1],
                        want,
                        atol=tol,
                        rtol=1e-5,
                        msg=lambda m, where=where: f"{where}: {m}",
                    )
    return out.exit_layers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2])
def test_state_propagation_fills_skipped_layers(models, kind, k):
    net = Network.build(adapter_for(models[kind]))
    every = torch.arange(4)
    exits = _check_propagation(net, prompts(), ExitPolicy.fixed(k), every)
    assert exits.tolist() == [k] * 4
    # with a finished row left out of the step
    _check_propagation(net, prompts(), ExitPolicy.fixed(k), torch.tensor([0, 2, 3]))


@pytest.mark.parametrize("kind", KINDS)
def test_state_propagation_with_mixed_exits(models, kind):
    """Rows exiting at different layers: each one's skipped layers hold its own exit state's K/V."""
    net = Network.build(adapter_for(models[kind]))
    mixed = False
    for threshold in (0.7, 0.8):
        exits = _check_propagation(
            net, prompts(), ExitPolicy(measure="state", threshold=threshold, decay_tau=0), torch.arange(4)
        )
        mixed |= len(set(exits.tolist())) >= 2
    assert mixed, "no step had rows exiting at different layers"


@pytest.mark.parametrize(
    "kv_heads,with_bias,window", [(2, False, None), (4, False, None), (4, True, None), (2, False, 3), (4, False, 6)]
)
def test_per_row_attention_matches_batched_masked_attention(kv_heads, with_bias, window):
    """Per-row attention over cache views (left padding sliced away; with a sliding window, only its
    last `window` slots) equals batched attention under the padding (and window) mask for the listed
    rows, and leaves the others zero."""
    torch.manual_seed(0)
    batch, heads, slots, dim = 4, 4, 9, 8
    starts = (0, 3, 5, 1)
    key_mask = torch.arange(slots)[None, :] >= torch.tensor(starts)[:, None]  # [B, S]
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    bias = torch.randn(1, heads, 1, slots) if with_bias else None
    mask = attention_mask(key_mask, slots - 1, 1, window)
    full = attend(q, k, v, mask, 0.5, bias=bias)  # [B, 1, H*D]
    live = (1, 2)
    per_row = RowAttention(queries=live, rows=live, starts=tuple(starts[r] for r in live))
    out = attend(q, k, v, mask, 0.5, bias=bias, per_row=per_row, window=window)
    torch.testing.assert_close(out[list(live)], full[list(live)])
    assert torch.count_nonzero(out[[0, 3]]) == 0
    # compacted queries: query j reads cache row rows[j]
    compact = RowAttention(queries=(0, 1), rows=(2, 3), starts=(starts[2], starts[3]))
    out = attend(q[[2, 3]], k, v, None, 0.5, bias=bias, per_row=compact, window=window)
    torch.testing.assert_close(out, full[[2, 3]])
    if window is not None:  # the window matters here
        assert not torch.allclose(full, attend(q, k, v, attention_mask(key_mask, slots - 1, 1), 0.5, bias=bias))


def test_sliding_window_mask_matches_transformers():
    """attention_mask's window: a query sees the keys less than `window` slots before it, as
    transformers' sliding_window_overlay (kv_idx > q_idx - window) on top of the causal mask."""
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    window, slots = 3, 7
    ours = attention_mask(torch.ones(1, slots, dtype=torch.bool), 0, slots, window)[0, 0]
    theirs = and_masks(causal_mask_function, sliding_window_overlay(window))
    expected = torch.tensor(
        [[bool(theirs(0, 0, torch.tensor(q), torch.tensor(k))) for k in range(slots)] for q in range(slots)]
    )
    assert torch.equal(ours, expected)
    assert padding_free_mask(torch.ones(1, slots, dtype=torch.bool), 0, window, window) is None
    assert padding_free_mask(torch.ones(1, slots, dtype=torch.bool), 0, window + 1, window) is not None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layer_types=["full_attention", "chunked_attention"]), "chunked_attention"),
        (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=None), "sliding_window"),
    ],
)
def test_llama_family_refuses_attention_layouts_it_does_not_implement(kwargs, message):
    cfg = Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, **kwargs
    )
    with pytest.raises(UnsupportedModelError, match=message):
        adapter_for(Qwen2ForCausalLM(cfg))


@pytest.mark.parametrize("queries", [1, 3, 8, 9])
@pytest.mark.parametrize("per_query", [True, False])
def test_grouped_query_attention_over_a_few_masked_queries_is_sdpas(queries, per_query):
    """A few queries per row under a padding-and-holes mask (verifying drafts), one mask row per query or
    one broadcast over them: folding each group's query heads into query rows over their shared K/V gives
    what SDPA's own grouped-query attention gives."""
    torch.manual_seed(0)
    batch, heads, kv_heads, slots, dim = 3, 6, 2, 12, 8
    q = torch.randn(batch, heads, queries, dim)
    k, v = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    key_mask = torch.rand(batch, slots) > 0.3
    key_mask[:, 0] = True
    mask = attention_mask(key_mask, slots - queries, queries) if per_query else key_mask[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True)
    expected = expected.transpose(1, 2).reshape(batch, queries, heads * dim)
    torch.testing.assert_close(attend(q, k, v, mask, 0.5), expected)


def test_rotary_from_ready_tables_is_transformers_rotary_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    positions = torch.arange(3, 10)[None].repeat(2, 1)  # [B, T]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.empty(0), positions)  # [B, T, D]
    q, k = torch.randn(2, 4, 7, 16) * 30, torch.randn(2, 2, 7, 16) * 30
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    ready = ready_rope(cos, sin)
    assert torch.equal(apply_ready_rope(q, *ready), q_ref) and torch.equal(apply_ready_rope(k, *ready), k_ref)


def test_queries_with_ends_attend_as_one_token_steps_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    cache_k, cache_v = torch.randn(1, 3, 200, 64, generator=g), torch.randn(1, 3, 200, 64, generator=g)
    q = torch.randn(1, 4, 9, 64, generator=g).transpose(1, 2)  # [1, H, T, D], as a projection gives it
    masked_differs = False
    for end in range(20, 140):  # the T = 4 new slots end..end+3 cross multiples of 16 keys
        ends = tuple(range(end - 3, end + 1))
        k, v = cache_k[:, :, :end], cache_v[:, :, :end]
        alone = [attend(q[:, :, t : t + 1], k[:, :, :e], v[:, :, :e], None, 0.125) for t, e in enumerate(ends)]
        assert torch.equal(attend(q, k, v, None, 0.125, ends=ends), torch.cat(alone, dim=1))
        mask = attention_mask(torch.ones(1, end, dtype=torch.bool), end - 4, 4)
        masked_differs |= not torch.equal(attend(q, k, v, mask, 0.125), torch.cat(alone, dim=1))
    assert masked_differs  # what ends is for: one masked call is not bit for bit one-token steps
