"""The 4-bit twin (calm.engine.twin): Q4_1 quantization within its bound, a copy of the module tree that shares
every weight but the quantized linears and leaves the model untouched, close logits, and one twin per model
until a weight changes."""

from __future__ import annotations

import pytest
import torch

from calm.adapters import adapter_for
from calm.engine.decode import Network
from calm.engine.quantized import GROUP, QuantizedLinear, native_available
from calm.engine.twin import quantize_q4_1, twin_bytes, twin_model, twin_network, twin_of
from helpers import tiny_llama
from test_adapters import build

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not native_available(), reason="this torch has no CPU int4 kernel"),
]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_q4_1_blocks_dequantise_within_half_a_step(scale):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 4 * GROUP, generator=g) * scale
    w[0, :GROUP] = 0.25 * scale  # a constant group: step 0, exact
    blocks = quantize_q4_1(w)
    assert blocks.kind == "Q4_1" and blocks.codes.dtype == torch.uint8 and int(blocks.codes.max()) <= 15
    step = blocks.scales.float().repeat_interleave(GROUP, dim=1)  # [out, in]
    error = (blocks.dequantize() - w).abs()
    fp16 = 2e-3 * w.abs().amax()  # the float16 scale and minimum round by 2^-11 of the group's range
    assert bool((error <= step / 2 + fp16).all())
    assert torch.allclose(blocks.dequantize()[0, :GROUP], w[0, :GROUP], rtol=1e-3)


def test_the_twin_shares_every_weight_but_its_linears_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = twin_model(model)
    assert twin is not None and twin is not model
    quantized = {n for n, m in twin.named_modules() if isinstance(m, QuantizedLinear)}
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    assert quantized == linears and len(quantized) == 7 * 4  # q, k, v, o, gate, up, down per layer
    ours = dict(model.named_parameters())
    for name, p in twin.named_parameters():  # norms, embedding, the head: the very same tensors
        assert p is ours[name], name
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in linears)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_twins_linears_compute_on_their_blocks_and_its_network_shares_the_head():
    """Each twin linear is the float32 linear of its dequantised Q4_1 weight up to the int4 kernel's bfloat16
    rounding; on a random model, 4-bit weights are 8% off per linear (trained weights far less), so the logits
    are compared on the real model only (test_twin_drafts)."""
    model = tiny_llama()
    net = Network.build(adapter_for(model))
    twin = twin_network(net)
    assert twin is not None and twin.argmax is net.argmax and twin.num_layers == net.num_layers
    g = torch.Generator().manual_seed(1)
    for name, module in twin.adapter.model.named_modules():
        if isinstance(module, QuantizedLinear):
            x = torch.randn(3, module.in_features, generator=g)
            blocks = quantize_q4_1(model.get_submodule(name).weight)
            with torch.inference_mode():
                exact = x @ blocks.dequantize().T
                assert (module(x) - exact).norm() < 0.01 * exact.norm(), name


def test_one_twin_per_model_built_again_when_a_weight_changes():
    net = Network.build(adapter_for(tiny_llama()))
    first = twin_of(net)
    assert first is not None and twin_of(net) is first
    with torch.no_grad():
        net.adapter.model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    assert twin_of(net) is not first


def test_a_model_without_quantizable_linears_has_no_twin():
    assert twin_network(Network.build(adapter_for(build("gpt2")))) is None  # Conv1D projections, the head excluded


def test_twin_bytes_counts_what_the_twin_holds_beyond_its_model():
    model = tiny_llama()
    twin = twin_model(model)
    held = sum(
        b.untyped_storage().nbytes() for m in twin.modules() if isinstance(m, QuantizedLinear) for b in m.buffers()
    )
    assert twin_bytes(model) == held > 0
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is torch.nn.Linear) - 128 * 64 * 4
    assert held < 0.35 * float_bytes  # about 0.75 bytes per weight against 4 (and whole packing blocks of 64 rows)
    assert twin_bytes(build("gpt2")) == twin_bytes(build("t5")) == 0  # no twin: Conv1D; T5 reads its weights


def test_no_twin_is_copied_from_modules_running_a_forward_of_their_own():
    """Inside packed_linears every float linear runs an installed forward bound to the model's own module: a copy
    would carry it (and its packed weight) away, so no twin is built there; generate_speculative builds it before."""
    from calm.engine.kernels import onednn_available, packed_linears

    if not onednn_available():
        pytest.skip("this torch has no oneDNN: nothing is installed")
    model = tiny_llama()
    with torch.inference_mode(), packed_linears(model, "onednn"):
        assert twin_model(model) is None
    assert twin_model(model) is not None


def test_the_models_hooks_stay_with_the_model():
    model = tiny_llama()
    calls = []
    model.model.norm.register_forward_hook(lambda *_: calls.append("model"))
    twin = twin_model(model)
    with torch.inference_mode():
        twin(torch.tensor([[3, 4, 5]]))
    assert calls == []
    twin.model.norm.register_forward_hook(lambda *_: calls.append("twin"))
    with torch.inference_mode():
        model(torch.tensor([[3, 4, 5]]))
    assert calls == ["model"]
