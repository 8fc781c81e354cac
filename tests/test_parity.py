"""Full-depth greedy parity with transformers `generate` for every model_type that adapter_for accepts.

One tiny random model per variant of each family (tied and untied heads, grouped-query attention,
sliding-window attention with a window shorter than the context, SmolLM3's no-RoPE layers, a T5
decoder shallower or deeper than its encoder, ...), a batch of 3 prompts of different lengths,
calm's never-exit generation against transformers' greedy `generate`: identical tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers as tf
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from calm import CalmModel
from calm.adapters import ADAPTERS, Adapter, adapter_for
from helpers import TEST_DEVICE

VOCAB, PAD, EOS = 128, 0, 1
MAX_NEW = 8
PROMPT_LENGTHS = (5, 9, 12)
WINDOW = 4  # sliding window, well below the 12 + 8 tokens of the longest row
IDS = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
    **IDS,
)
GPT2 = dict(n_layer=4, n_embd=64, n_head=4, n_positions=128, initializer_range=0.2, **IDS)
T5 = dict(
    d_model=64,
    d_ff=128,
    d_kv=16,
    num_heads=4,
    vocab_size=VOCAB,
    decoder_start_token_id=PAD,
    pad_token_id=PAD,
    eos_token_id=EOS,
    initializer_factor=5.0,
)


def _untie(model: torch.nn.Module) -> torch.nn.Module:
    """Give a model whose transformers class always ties (T5 in transformers 5) its own LM head."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * head.weight.std())
    return model


def jitter_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm weights and biases (transformers initialises them to ones or, for Gemma's (1 + w), zeros):
    the weight then matters, in each family's own parametrisation, and per-head norms differ."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return model


SOFTCAP = dict(attn_logit_softcapping=1.5, final_logit_softcapping=6.0)  # both bind on these tiny models
# larger weights: logits that reach past the softcap, and peaked distributions under it
GEMMA = dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, initializer_range=0.4)
LOCAL_GLOBAL = ["sliding_attention", "full_attention"] * 2
GLOBAL = ["full_attention"] * 4
TWO_BASES = {  # Gemma 3: local and global layers rotate with their own bases
    "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
    "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
}


def granite(embedding: float, residual: float, attention: float, logits: float) -> dict:
    """Granite's four multipliers (logits: the logits are divided by it)."""
    return dict(
        embedding_multiplier=embedding,
        residual_multiplier=residual,
        attention_multiplier=attention,
        logits_scaling=logits,
    )


# name -> (model class, config class, config kwargs, post-build step)
VARIANTS: dict[str, tuple[type, type, dict, Callable | None]] = {
    "llama-mha-tied": (
        tf.LlamaForCausalLM,
        tf.LlamaConfig,
        dict(num_key_value_heads=4, tie_word_embeddings=True),
        None,
    ),
    "llama-gqa-untied-bias-rope-scaled": (
        tf.LlamaForCausalLM,
        tf.LlamaConfig,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            head_dim=32,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        None,
    ),
    "llama-llama3-rope": (
        tf.LlamaForCausalLM,
        tf.LlamaConfig,
        dict(
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 500000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        None,
    ),
    "mistral-gqa-window-untied": (
        tf.MistralForCausalLM,
        tf.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=WINDOW, tie_word_embeddings=False),
        None,
    ),
    "mistral-no-window-tied": (
        tf.MistralForCausalLM,
        tf.MistralConfig,
        dict(num_key_value_heads=4, sliding_window=None, tie_word_embeddings=True),
        None,
    ),
    "qwen2-gqa-window-tied": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
        None,
    ),
    "qwen2-window-off-untied": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(  # sliding_window set, not used
            num_key_value_heads=4, use_sliding_window=False, sliding_window=WINDOW, tie_word_embeddings=False
        ),
        None,
    ),
    "qwen2-yarn-rope-untied": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 32,
            },
        ),
        None,
    ),
    "qwen3-gqa-window-untied": (
        tf.Qwen3ForCausalLM,
        tf.Qwen3Config,
        dict(
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=2,
            tie_word_embeddings=False,
            head_dim=24,
        ),
        None,
    ),
    "qwen3-mha-tied": (
        tf.Qwen3ForCausalLM,
        tf.Qwen3Config,
        dict(num_key_value_heads=4, tie_word_embeddings=True),
        None,
    ),
    "smollm3-no-rope-gqa-tied": (
        tf.SmolLM3ForCausalLM,
        tf.SmolLM3Config,
        dict(num_key_value_heads=2, no_rope_layer_interval=2, tie_word_embeddings=True),
        None,
    ),
    "smollm3-no-rope-window-untied": (
        tf.SmolLM3ForCausalLM,
        tf.SmolLM3Config,
        dict(
            num_key_value_heads=2,
            no_rope_layers=[1, 0, 1, 0],
            use_sliding_window=True,
            sliding_window=WINDOW,
            tie_word_embeddings=False,
        ),
        None,
    ),
    "gemma-gqa-tied": (tf.GemmaForCausalLM, tf.GemmaConfig, dict(GEMMA), jitter_norms),
    "gemma2-window-softcap-untied": (
        tf.Gemma2ForCausalLM,
        tf.Gemma2Config,
        dict(GEMMA, layer_types=LOCAL_GLOBAL, sliding_window=WINDOW, tie_word_embeddings=False, **SOFTCAP),
        jitter_norms,
    ),
    "gemma2-global-softcap-tied": (
        tf.Gemma2ForCausalLM,
        tf.Gemma2Config,
        dict(GEMMA, layer_types=GLOBAL, **SOFTCAP),
        jitter_norms,
    ),
    "gemma3-local-global-two-bases-tied": (
        tf.Gemma3ForCausalLM,
        tf.Gemma3TextConfig,
        dict(
            GEMMA,
            layer_types=LOCAL_GLOBAL,
            sliding_window=WINDOW,
            rope_parameters=TWO_BASES,
            final_logit_softcapping=6.0,
        ),
        jitter_norms,
    ),
    "gemma3-global-untied": (
        tf.Gemma3ForCausalLM,
        tf.Gemma3TextConfig,
        dict(GEMMA, layer_types=GLOBAL, tie_word_embeddings=False, final_logit_softcapping=6.0),
        jitter_norms,
    ),
    "phi3-gqa-partial-rotary-untied": (
        tf.Phi3ForCausalLM,
        tf.Phi3Config,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        jitter_norms,
    ),
    "phi3-window-tied": (
        tf.Phi3ForCausalLM,
        tf.Phi3Config,
        dict(num_key_value_heads=4, sliding_window=WINDOW, tie_word_embeddings=True),
        jitter_norms,
    ),
    "olmo2-gqa-untied": (
        tf.Olmo2ForCausalLM,
        tf.Olmo2Config,
        dict(num_key_value_heads=2, tie_word_embeddings=False),
        jitter_norms,
    ),
    "olmo2-mha-tied": (tf.Olmo2ForCausalLM, tf.Olmo2Config, dict(tie_word_embeddings=True), jitter_norms),
    "gpt_neox-parallel-partial-rotary-untied": (
        tf.GPTNeoXForCausalLM,
        tf.GPTNeoXConfig,
        dict(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False),
        jitter_norms,
    ),
    "gpt_neox-sequential-tied": (
        tf.GPTNeoXForCausalLM,
        tf.GPTNeoXConfig,
        dict(rotary_pct=0.5, use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True),
        jitter_norms,
    ),
    "granite-multipliers-gqa-untied": (
        tf.GraniteForCausalLM,
        tf.GraniteConfig,
        dict(num_key_value_heads=2, tie_word_embeddings=False, **granite(4.0, 0.5, 0.1, 1.5)),
        jitter_norms,
    ),
    "granite-multipliers-tied": (
        tf.GraniteForCausalLM,
        tf.GraniteConfig,
        dict(tie_word_embeddings=True, **granite(2.0, 1.5, 0.5, 0.5)),
        jitter_norms,
    ),
    "stablelm-parallel-qk-norm-gqa-untied": (
        tf.StableLmForCausalLM,
        tf.StableLmConfig,
        dict(
            num_key_value_heads=2,
            partial_rotary_factor=0.25,
            use_parallel_residual=True,
            qk_layernorm=True,
            tie_word_embeddings=False,
        ),
        jitter_norms,
    ),
    "stablelm-sequential-qkv-bias-tied": (
        tf.StableLmForCausalLM,
        tf.StableLmConfig,
        dict(num_key_value_heads=4, partial_rotary_factor=0.5, use_qkv_bias=True, tie_word_embeddings=True),
        jitter_norms,
    ),
    "gpt2-tied": (tf.GPT2LMHeadModel, tf.GPT2Config, dict(), None),
    "gpt2-untied-layer-scaled-upcast": (
        tf.GPT2LMHeadModel,
        tf.GPT2Config,
        dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
        None,
    ),
    "t5-deeper-decoder-tied": (
        tf.T5ForConditionalGeneration,
        tf.T5Config,
        dict(num_layers=3, num_decoder_layers=4),
        None,
    ),
    "t5-shallower-decoder-gated-untied": (
        tf.T5ForConditionalGeneration,
        tf.T5Config,
        dict(
            num_layers=4,
            num_decoder_layers=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        ),
        _untie,
    ),
    "mt5-shallower-decoder-tied": (
        tf.MT5ForConditionalGeneration,
        tf.MT5Config,
        dict(num_layers=3, num_decoder_layers=2),
        None,
    ),
    "mt5-untied-narrow-heads": (
        tf.MT5ForConditionalGeneration,
        tf.MT5Config,
        dict(  # heads * d_kv < d_model
            num_layers=2, num_decoder_layers=3, d_kv=8
        ),
        _untie,
    ),
}


def build(name: str) -> torch.nn.Module:
    model_class, config_class, kwargs, post = VARIANTS[name]
    base = (
        T5
        if model_class.__name__.endswith("ConditionalGeneration")
        else GPT2
        if "GPT2" in model_class.__name__
        else DECODER
    )
    torch.manual_seed(0)
    model = model_class(config_class(**{**base, **kwargs})).eval()
    return post(model) if post else model


def features(model: torch.nn.Module) -> set[str]:
    """What a built variant really exercises, read from the model and calm's adapter."""
    cfg, adapter = model.config, adapter_for(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    found = {"tied" if tied else "untied"}
    if adapter.num_kv_heads < getattr(cfg, "num_attention_heads", adapter.num_kv_heads):
        found.add("gqa")
    if any(w is not None and w < max(PROMPT_LENGTHS) + MAX_NEW for w in getattr(adapter, "windows", ())):
        found.add("window")
    if not all(getattr(adapter, "rope_layers", (True,))):
        found.add("no-rope")
    if cfg.is_encoder_decoder:
        found.add("shallower-decoder" if cfg.num_decoder_layers < cfg.num_layers else "deeper-decoder")
    return found | llama_like_features(model, adapter)


def llama_like_features(model: torch.nn.Module, adapter: Adapter) -> set[str]:
    """The quirks of the Llama-like families (calm.adapters.llama.Traits and the adapters' hooks) a variant has."""
    traits = getattr(adapter, "traits", None)
    if traits is None:
        return set()
    found = {
        name
        for name, on in (
            ("attn-softcap", traits.attn_softcap is not None),
            ("logit-softcap", traits.logit_softcap is not None),
            ("post-norms", traits.post_norms),
            ("parallel", getattr(adapter, "parallel", False)),
            (
                "multipliers",
                (traits.embedding_multiplier, traits.residual_multiplier, traits.logits_divisor) != (1, 1, 1),
            ),
        )
        if on
    }
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found |= {"qk-norm"} if names & {"q_norm", "q_layernorm"} else set()
    found |= {"fused-qkv"} if names & {"qkv_proj", "query_key_value"} else set()
    ctx = adapter.context(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), 0)
    found |= {"partial-rotary"} if ctx.rope is not None and ctx.rope[0].shape[-1] < adapter.head_dim else set()
    found |= {"two-rope-bases"} if len(ctx.extras.get("rope", {})) == 2 else set()
    return found


REQUIRED = {
    "llama": {"tied", "untied", "gqa"},
    "mistral": {"tied", "untied", "gqa", "window"},
    "qwen2": {"tied", "untied", "gqa", "window"},
    "qwen3": {"tied", "untied", "gqa", "window"},
    "smollm3": {"tied", "untied", "gqa", "window", "no-rope"},
    "gemma": {"tied", "gqa"},
    "gemma2": {"tied", "untied", "gqa", "window", "attn-softcap", "logit-softcap", "post-norms"},
    "gemma3_text": {"tied", "untied", "gqa", "window", "logit-softcap", "post-norms", "qk-norm", "two-rope-bases"},
    "phi3": {"tied", "untied", "gqa", "window", "partial-rotary", "fused-qkv"},
    "olmo2": {"tied", "untied", "gqa", "post-norms", "qk-norm"},
    "gpt_neox": {"tied", "untied", "partial-rotary", "parallel", "fused-qkv"},
    "granite": {"tied", "untied", "gqa", "multipliers"},
    "stablelm": {"tied", "untied", "gqa", "partial-rotary", "parallel", "qk-norm"},
    "gpt2": {"tied", "untied"},
    "t5": {"tied", "untied", "shallower-decoder", "deeper-decoder"},
    "mt5": {"tied", "untied", "shallower-decoder"},
}


def test_variants_cover_every_accepted_model_type_and_its_features():
    accepted = {t for cls in ADAPTERS for t in cls.model_types}
    covered: dict[str, set[str]] = {}
    for name in VARIANTS:
        model = build(name)
        covered.setdefault(model.config.model_type, set()).update(features(model))
    assert set(covered) == accepted
    assert set(REQUIRED) == accepted
    for model_type, needed in REQUIRED.items():
        assert needed <= covered[model_type], f"{model_type}: missing {needed - covered[model_type]}"


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model: torch.nn.Module, rows: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    """transformers' greedy generate on the left-padded batch, each row cut after its EOS."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    kwargs = {}
    if model.config.is_encoder_decoder:
        # transformers sizes its default cache by the encoder's depth; a deeper decoder needs one that grows
        kwargs["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=PAD,
            eos_token_id=EOS,
            **kwargs,
        )
    new = out[:, 1:] if model.config.is_encoder_decoder else out[:, width:]
    return tuple(tuple(r[: r.index(EOS) + 1] if EOS in r else r) for r in new.tolist())


@pytest.mark.parametrize("name", VARIANTS)
def test_never_exit_matches_transformers_generate(name, one_thread):
    model = build(name).to(TEST_DEVICE)  # CALM_TEST_DEVICE=cuda: benchmarks/device_check.sh
    rows = prompts()
    ours = CalmModel.from_model(model).generate(rows, max_new_tokens=MAX_NEW)
    assert ours.token_ids == hf_greedy(model, rows)
    assert sum(len(r) for r in ours.token_ids) > len(rows)  # the comparison covers decode steps
