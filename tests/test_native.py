"""Native 4-bit weights: GGUF blocks (Q4_0, Q4_1, Q8_0) read, computed on, and loaded with weights="native".

Tolerance of the int4 kernel: it rounds the activations, the block scales and its output to bfloat16, at most
2^-8 + 2^-9 of sum_i |w_i x_i| in all; the tests allow REL_ERROR (0.0125, calm.engine.lm_head) of |w_row| |x|.
Dequantisation, the embedding and the many-row (float32) path are exact up to float32 summation order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from torch.utils._python_dispatch import TorchDispatchMode

from calm import CalmModel
from calm.adapters.base import joint, project
from calm.checkpoints.checkpoint import store_extra
from calm.checkpoints.gguf_blocks import block_cache_path, parse_blocks
from calm.checkpoints.native import WEIGHTS_KEY, choose_weights
from calm.engine.lm_head import REL_ERROR
from calm.engine.quantized import FLOAT_FROM_ROWS, FORMATS, QuantBlocks, QuantizedEmbedding, QuantizedLinear
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from helpers import assert_clean_error, invoke, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {name: GGMLQuantizationType[name] for name in FORMATS}


def _blocks(kind: str, out: int, width: int, seed: int = 0) -> tuple[QuantBlocks, np.ndarray]:
    """Random weights quantized by the gguf package, parsed back: (blocks, gguf's own dequantisation)."""
    rng = np.random.default_rng(seed)
    raw = quantize(rng.normal(0, 0.5, (out, width)).astype(np.float32), KINDS[kind])
    return parse_blocks(kind, raw, width), dequantize(raw, KINDS[kind])


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("shape", [(64, 32), (100, 96), (192, 64)])  # rows not a multiple of 64 are padded
def test_native_matmul_equals_dequantised(kind, shape):
    blocks, reference = _blocks(kind, *shape)
    weight = blocks.dequantize()
    assert torch.equal(weight, torch.from_numpy(reference))  # bit-exact with gguf's dequantisation
    linear = QuantizedLinear(blocks)
    assert torch.equal(linear.dequantize(), weight)
    for rows in (1, 3, 5):
        x = torch.randn(rows, shape[1])
        exact = x @ weight.T
        bound = REL_ERROR * x.norm(dim=1, keepdim=True) * weight.norm(dim=1)
        assert ((linear(x) - exact).abs() <= bound).all()
    x = torch.randn(2, FLOAT_FROM_ROWS, shape[1])  # many rows: float32 on the dequantised weight
    torch.testing.assert_close(linear(x), x @ weight.T, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[0, shape[0] - 1], [33, 63]])
    assert torch.equal(QuantizedEmbedding(linear)(ids), weight[ids])


def test_block_rows_permute_whole():
    blocks, _ = _blocks("Q4_1", 64, 64)
    order = torch.randperm(64)
    assert torch.equal(blocks.permute_rows(order).dequantize(), blocks.dequantize()[order])


def test_blocks_refuse_bad_shapes():
    with pytest.raises(InputError, match="split into 32s"):
        QuantBlocks("Q4_0", torch.zeros(4, 40, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.float16))
    with pytest.raises(InputError, match="unsupported block format"):
        QuantBlocks("Q5_K", torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.float16))


# ---- a tiny GGUF written here ----------------------------------------------------------------------


def _rope_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter's permute), which transformers undoes on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, layers: int = 2, mlp: tuple[str, str, str] = ("Q4_0", "Q4_1", "Q8_0")) -> Path:
    """tiny_llama's weights as a llama GGUF, every format in play: Q8_0 embedding, Q4_0/Q4_1/Q8_0 layers
    (mlp: the gate, up and down projections' formats)."""
    model = tiny_llama(layers=layers)
    cfg, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)

    def add(name: str, array: np.ndarray, kind: str) -> None:
        w.add_tensor(name, quantize(array.astype(np.float32), KINDS[kind]), raw_dtype=KINDS[kind])

    add("token_embd.weight", sd["model.embed_tokens.weight"], "Q8_0")
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _rope_order(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads), "Q4_1")
        add(f"blk.{i}.attn_k.weight", _rope_order(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads), "Q4_0")
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], "Q8_0")
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], "Q4_1")
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], mlp[0])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], mlp[1])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], mlp[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return str(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4.gguf"))


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "calm-cache"))


PROMPT = [[2, 5, 6, 7, 8, 9, 5, 6, 7]]


def test_tiny_gguf_loads_native(tiny_gguf):
    model = CalmModel.from_pretrained(tiny_gguf, weights="native")
    assert model.weights.weights == "native"
    layer = model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear) and layer.self_attn.k_proj.kind == "Q4_0"
    assert isinstance(model.model.get_input_embeddings(), QuantizedEmbedding)
    assert block_cache_path(Path(tiny_gguf)).is_file()
    again = CalmModel.from_pretrained(tiny_gguf, weights="native")  # from the block cache
    for a, b in zip(model.model.modules(), again.model.modules()):
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.dequantize(), b.dequantize())


def test_static_engine_picks_greedy_tokens_by_the_certified_argmax_on_a_native_head(tiny_gguf, monkeypatch):
    """A native head's int4 kernel rounds logits to bfloat16; like the dynamic step, the static step picks greedy
    tokens by the float32 argmax of the dequantised head (compiled too: the argmax runs outside the graph)."""
    from calm.engine.lm_head import CertifiedArgmax

    model = CalmModel.from_pretrained(tiny_gguf, weights="native")
    calls = []
    real = CertifiedArgmax.__call__
    monkeypatch.setattr(CertifiedArgmax, "__call__", lambda self, x: calls.append(x.shape[0]) or real(self, x))
    for engine in ({"engine": "static"}, {"engine": "static", "compile": "eager"}):
        calls.clear()
        model.generate(PROMPT, max_new_tokens=6, mode="calm", **engine)
        assert calls == [1] * 6, (engine, calls)  # every token of the one row, the first one included
    assert model.network.argmax is not None and model.network.argmax.native is not None


def test_native_generates_on_every_engine(tiny_gguf):
    model = CalmModel.from_pretrained(tiny_gguf, weights="native")
    full = model.generate(PROMPT, max_new_tokens=10, mode="calm", engine="dynamic").token_ids
    assert model.generate(PROMPT, max_new_tokens=10, mode="calm", engine="static").token_ids == full
    assert model.generate(PROMPT, max_new_tokens=10, mode="calm", engine="static", compile="eager").token_ids == full
    exits = model.generate(PROMPT, max_new_tokens=10, policy=ExitPolicy(measure="softmax", threshold=0.05))
    assert len(exits.token_ids[0]) == 10 and min(exits.exit_layers[0][1:]) < model.num_layers
    for options in ({"draft_layer": 1}, {"draft_layer": 1, "lookup": True}, {"draft_layer": 0}):
        lossless = model.generate(PROMPT, max_new_tokens=10, mode="speculative", max_draft=3, **options)
        assert lossless.token_ids == full, options  # lossless on native weights: the native full model's tokens
    rows = model.generate([PROMPT[0], PROMPT[0][:4]], max_new_tokens=6, mode="calm").token_ids
    assert rows[0] == full[0][:6]


def test_native_agrees_with_float32_on_tiny(tiny_gguf):
    native = CalmModel.from_pretrained(tiny_gguf, weights="native").generate(PROMPT, max_new_tokens=6, mode="calm")
    exact = CalmModel.from_pretrained(tiny_gguf, weights="float32").generate(PROMPT, max_new_tokens=6, mode="calm")
    assert native.token_ids[0][:3] == exact.token_ids[0][:3]  # the LM head's argmax is certified exact


def test_native_refused_on_float_checkpoint(tiny_model):
    with pytest.raises(InputError, match="16/32-bit checkpoint"):
        CalmModel.from_pretrained(tiny_model, weights="native")
    assert_clean_error(invoke("generate", "--model", tiny_model, "--weights", "native", "a cat"), "16/32-bit")


def test_weights_and_dtype_must_agree(tiny_gguf):
    with pytest.raises(InputError, match="disagree"):
        CalmModel.from_pretrained(tiny_gguf, weights="float32", dtype="bfloat16")
    with pytest.raises(InputError, match="unknown weights"):
        CalmModel.from_pretrained(tiny_gguf, weights="int3")
    with pytest.raises(InputError, match="drop dtype"):
        CalmModel.from_pretrained(tiny_gguf, weights="native", dtype="bfloat16")


def _stored(fastest: str) -> dict:
    measured = {"fastest": fastest, "decode_ms": {"float32": 60.0, "native": 25.0}, "report": "r.md"}
    return {WEIGHTS_KEY: {"cpu": measured}}


def test_auto_follows_the_stored_measurement(tiny_gguf, tiny_model):
    assert choose_weights("auto", None, tiny_gguf, None, _stored("native")).weights == "native"
    assert choose_weights(None, None, tiny_gguf, None, _stored("float32")).weights == "float32"
    assert choose_weights("auto", None, tiny_gguf, None, None).weights == "float32"  # nothing stored
    assert choose_weights("auto", None, tiny_model, None, _stored("native")).weights == "float32"  # no blocks
    assert choose_weights("auto", torch.bfloat16, tiny_gguf, None, _stored("native")).weights == "bfloat16"
    with pytest.raises(InputError, match="unreadable"):
        choose_weights("auto", None, tiny_gguf, None, {WEIGHTS_KEY: {"cpu": {"fastest": "native"}}})


def test_auto_on_a_checkpoint_with_a_stored_measurement(tiny_gguf, tmp_path):
    CalmModel.from_pretrained(tiny_gguf, weights="float32").save_pretrained(tmp_path / "ckpt")
    assert CalmModel.from_pretrained(tmp_path / "ckpt").weights.weights == "float32"
    store_extra(tmp_path / "ckpt", WEIGHTS_KEY, _stored("native")[WEIGHTS_KEY])
    model = CalmModel.from_pretrained(tmp_path / "ckpt")
    assert model.weights.weights == "native" and "stored choice" in model.weights.reason
    assert isinstance(model.model.model.layers[0].mlp.up_proj, QuantizedLinear)


def test_info_reports_resident_weights(tiny_gguf):
    result = invoke("info", tiny_gguf)
    assert result.exit_code == 0, result.output
    assert "weights resident: float32" in result.output and ", native " in result.output
    assert "peak resident memory while loading" in result.output


# ---- the embedded model ---------------------------------------------------------------------------------

SMOKE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "xsum" / "smoke.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE.is_file(), reason="../shared/data is not beside the repo")
def test_smollm2_native_blocks_are_its_float32_weights_and_lossless_stays_exact():
    """Every Q4_1 / Q8_0 block of the shipped GGUF dequantises to the float32 weight transformers loads (bit
    for bit: checked in to_native, cached after); speculative decoding on native weights gives native full depth's
    tokens on these two documents, and lossless (which does not draft on native weights) does too."""
    from calm.prompts.documents import read_jsonl
    from calm.prompts.templates import summary_prompt, truncate_document

    float32 = CalmModel.from_pretrained("smollm2", weights="float32")
    native = CalmModel.from_pretrained("smollm2", weights="native")
    modules = native.model.named_modules(remove_duplicate=False)  # the LM head is also the embedding's table
    swapped = {n: m for n, m in modules if isinstance(m, QuantizedLinear)}
    assert len({id(m) for m in swapped.values()}) == 30 * 7 + 1 and swapped["lm_head"].kind == "Q8_0"
    assert native.model.get_input_embeddings().table is swapped["lm_head"]
    weights = dict(float32.model.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.self_attn.k_proj", "lm_head"):
        assert torch.equal(swapped[name].dequantize(), weights[name].weight)
    docs = read_jsonl(SMOKE, limit=2)
    prompts = [summary_prompt(truncate_document(native.tokenizer, d.document, 256)) for d in docs]
    for prompt in prompts:
        full = native.generate([prompt], max_new_tokens=24, mode="calm")
        drafted = native.generate([prompt], max_new_tokens=24, mode="speculative")  # exact here, not always
        assert drafted.speculative is not None and drafted.token_ids == full.token_ids
        lossless = native.generate([prompt], max_new_tokens=24)  # lossless does not draft on native weights
        assert lossless.speculative is None and "native weights" in lossless.decoding
        assert lossless.token_ids == full.token_ids


def test_float32_measurements_say_so_on_other_weights():
    from calm.checkpoints.native import format_note

    assert format_note("float32", knob=True, stored_setting=True) == ""
    assert "calibration was measured on float32" in format_note("native", knob=True, stored_setting=False)
    assert "speculative setting" in format_note("native", knob=False, stored_setting=True)
    assert format_note("native", knob=False, stored_setting=False) == ""


class _KernelCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._weight_int4pack_mm_for_cpu.default
        return func(*args, **(kwargs or {}))


def test_projections_of_one_input_run_as_one_kernel_call_with_the_weights_held_once():
    members = tuple(QuantizedLinear(_blocks("Q4_1", out, 96, seed)[0]) for seed, out in enumerate((128, 64, 64)))
    xs = [torch.randn(rows, 96) for rows in (1, 3, FLOAT_FROM_ROWS)]
    alone = [[m(x) for m in members] for x in xs]  # before they stack
    run = joint(members)
    assert run is not None and joint(members) is run  # stacked once
    for x, outputs in zip(xs, alone):
        assert all(torch.equal(a, b) for a, b in zip(run(x), outputs))  # bit for bit
        assert all(torch.equal(m(x), a) for m, a in zip(members, outputs))  # and each member alone still
    assert len({m.packed.untyped_storage().data_ptr() for m in members}) == 1  # views of the stack's codes
    with _KernelCalls() as kernel:
        run(xs[0])
    assert kernel.calls == 1


def test_projections_that_do_not_stack_run_one_by_one():
    q4_1, q4_0 = (QuantizedLinear(_blocks(kind, 64, 64)[0]) for kind in ("Q4_1", "Q4_0"))
    odd = QuantizedLinear(_blocks("Q4_1", 96, 64)[0])  # rows not whole packing blocks
    biased = QuantizedLinear(_blocks("Q4_1", 64, 64, seed=1)[0], bias=torch.randn(64))
    plain = torch.nn.Linear(64, 64)
    x = torch.randn(2, 64)
    for members in ((q4_1, q4_0), (q4_1, odd), (q4_1, biased), (q4_1, plain), (plain, q4_1)):
        assert joint(members) is None
        assert all(torch.equal(y, m(x)) for y, m in zip(project(members, x), members))


def test_a_native_decode_step_runs_k_v_and_gate_up_jointly_and_keeps_its_tokens(tmp_path, monkeypatch):
    gguf = str(write_tiny_gguf(tmp_path / "same-mlp.Q4.gguf", mlp=("Q4_1", "Q4_1", "Q8_0")))
    joint_tokens = CalmModel.from_pretrained(gguf, weights="native")
    with _KernelCalls() as two, torch.inference_mode():
        short = joint_tokens.generate(PROMPT, max_new_tokens=2, mode="calm").token_ids
    with _KernelCalls() as three, torch.inference_mode():
        longer = joint_tokens.generate(PROMPT, max_new_tokens=3, mode="calm").token_ids
    assert three.calls - two.calls == 2 * 6  # per layer q, k, v, o, gate|up, down (the head scores on its int8 copy)
    monkeypatch.setattr(QuantizedLinear, "joint", lambda self, members: None)
    alone = CalmModel.from_pretrained(gguf, weights="native")
    assert alone.generate(PROMPT, max_new_tokens=3, mode="calm").token_ids == longer and longer[0][:2] == short[0]


def _q4_1_llama(layers: int = 2) -> torch.nn.Module:
    """A tiny Llama whose every layer linear computes on Q4_1 blocks of its weight, K and V 64 rows each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    raw = quantize(child.weight.detach().numpy(), KINDS["Q4_1"])
                    setattr(parent, name, QuantizedLinear(parse_blocks("Q4_1", raw, child.in_features)))
    return model


def test_queries_keys_and_values_of_a_step_come_from_one_kernel_call():
    from calm.adapters import adapter_for
    from calm.engine.decode import Network
    from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens

    prompt = PromptBatch(torch.tensor([[2, 5, 6, 7, 8]]), torch.ones(1, 5, dtype=torch.bool))

    def run(model: torch.nn.Module, steps: int) -> tuple[list[int], int]:
        config = GenerationConfig(max_new_tokens=steps, eos_token_ids=(), pad_token_id=0)
        with _KernelCalls() as kernel, torch.inference_mode():
            out = generate_tokens(Network.build(adapter_for(model)), prompt, ExitPolicy.never(), config)
        return list(out.token_ids[0]), kernel.calls

    tokens, calls = run(_q4_1_llama(), 4)
    assert calls - run(_q4_1_llama(), 3)[1] == 2 * 4  # per layer: q|k|v, o, gate|up, down
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(QuantizedLinear, "joint", lambda self, members: None)
        alone, alone_calls = run(_q4_1_llama(), 4)
    assert alone == tokens and alone_calls > calls  # the same tokens, bit for bit, in more calls


def test_stacked_weights_compile_stay_single_and_outlive_inference_mode():
    """The static step compiles with the members one by one (stacks are built eagerly, never under
    torch.compile); a member joins one stack only, so K and V are held once; stacks built inside inference
    mode leave normal tensors behind (the weights still load), and a copy does not share its original's stack."""
    import copy

    from calm.adapters import adapter_for
    from calm.engine.decode import Network
    from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens

    model = _q4_1_llama()
    net = Network.build(adapter_for(model))
    prompt = PromptBatch(torch.tensor([[2, 5, 6, 7, 8]]), torch.ones(1, 5, dtype=torch.bool))
    outputs = {}
    for engine in ({}, {"engine": "static", "compile": "eager"}):
        config = GenerationConfig(max_new_tokens=5, eos_token_ids=(), pad_token_id=0, **engine)
        with torch.inference_mode():
            outputs[bool(engine)] = generate_tokens(net, prompt, ExitPolicy.never(), config).token_ids
    assert outputs[True] == outputs[False]
    attn = model.model.layers[0].self_attn
    assert joint((attn.q_proj, attn.k_proj, attn.v_proj)) is not None and joint((attn.k_proj, attn.v_proj)) is None
    assert not attn.k_proj.packed.is_inference()
    model.load_state_dict(model.state_dict())
    clone = copy.deepcopy(model)
    assert "_joint" not in clone.model.layers[0].self_attn.q_proj.__dict__
