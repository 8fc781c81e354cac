"""calm.engine.kernels: the packed oneDNN linear is the same function as nn.Linear (to float rounding), is on only
inside a generation, follows weight changes, and leaves generation's tokens unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from calm.adapters import adapter_for
from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, generate_tokens
from calm.engine.kernels import onednn_available, only_slots, packed_linears, uses_onednn
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import SpeculativeConfig
from calm.speculative.loop import generate_speculative
from test_adapters import KINDS, build, prompts

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN: kernels='auto' is torch's"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))


def test_packed_linear_computes_what_nn_linear_does_and_only_inside_the_block():
    model, x = _model(), torch.randn(3, 5, 16)
    with torch.inference_mode():
        _inside_the_block(model, x)


def _inside_the_block(model: torch.nn.Module, x: torch.Tensor) -> None:
    expected = model(x)
    with packed_linears(model):
        assert all("forward" in vars(m) for m in model if isinstance(m, torch.nn.Linear))
        for rows in (1, 2, 3, 4, 7):
            torch.testing.assert_close(model(x[:, :rows]), expected[:, :rows], rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model)
    with packed_linears(model, "torch"):
        assert not any("forward" in vars(m) for m in model)


def test_autograd_and_bad_names_keep_torchs_kernels():
    model = _model()
    with packed_linears(model):  # grad enabled: the packed op has no backward
        assert not any("forward" in vars(m) for m in model)
    assert uses_onednn("auto") is False  # grad enabled here
    with pytest.raises(InputError, match="unknown kernels"):
        uses_onednn("fast")
    with pytest.raises(InputError, match="unknown kernels"):
        GenerationConfig(kernels="fast")


def test_a_changed_weight_is_packed_again_and_a_used_model_still_copies():
    model, x = _model(), torch.randn(4, 16)
    with torch.inference_mode(), packed_linears(model):
        model(x)
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: same storage, new version
    with torch.inference_mode():
        with packed_linears(model):
            packed = model(x)
        torch.testing.assert_close(packed, model(x), rtol=1e-5, atol=1e-5)  # the doubled weight, not the old one
    copy.deepcopy(model)  # nothing opaque is left on the modules


@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_packed_kernels_gives_torchs_tokens(kind):
    net = Network.build(adapter_for(build(kind)))
    p = prompts()
    config = GenerationConfig(max_new_tokens=12, pad_token_id=0)
    torch_kernels = generate_tokens(net, p, ExitPolicy.never(), GenerationConfig(12, pad_token_id=0, kernels="torch"))
    assert generate_tokens(net, p, ExitPolicy.never(), config).token_ids == torch_kernels.token_ids
    spec = generate_speculative(net, p, ExitPolicy.never(), config, SpeculativeConfig(0, 3))
    assert spec.token_ids == torch_kernels.token_ids


def test_the_certified_head_on_packed_bfloat16_is_still_the_float32_argmax():
    from calm.engine.lm_head import CertifiedArgmax

    torch.manual_seed(3)
    weight = torch.randn(5000, 64)
    weight[1] = weight[0] + 1e-4  # a near tie the bfloat16 scores cannot separate
    head = CertifiedArgmax(weight)
    x = torch.randn(9, 64)
    x[0] = weight[0] * 3  # rows 0 and 1 of the head nearly tie for this input
    with torch.inference_mode(), packed_linears(torch.nn.Linear(1, 1)):
        assert torch.equal(head(x), (x @ weight.T).argmax(1))


def test_nested_blocks_and_modules_with_their_own_forward_are_left_alone():
    model, x = _model(), torch.randn(2, 16)
    hooked = model[2]
    hooked.forward = lambda t: torch.zeros(t.shape[0], 8)  # e.g. an accelerate hook on the instance
    with torch.inference_mode():
        with packed_linears(model):
            assert "forward" in vars(model[0])
            with packed_linears(model):  # nested (a generate inside a generate): the outer packing stays
                model(x)
            assert "forward" in vars(model[0])
            assert torch.equal(model(x), torch.zeros(2, 8))
        assert "forward" not in vars(model[0]) and vars(hooked)["forward"] is not None


def test_outside_the_block_a_packed_forward_is_torchs_and_a_failed_install_leaves_nothing(monkeypatch):
    model, x = _model(), torch.randn(3, 16)
    with torch.inference_mode(), packed_linears(model):
        stray = model[0].forward
    with torch.inference_mode():  # e.g. another thread, or after the block: torch's own linear
        torch.testing.assert_close(stray(x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))
    import calm.engine.kernels as kernels

    real, calls = kernels._packed_forward, []

    def failing(module):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("no primitive")
        return real(module)

    monkeypatch.setattr(kernels, "_packed_forward", failing)
    with pytest.raises(RuntimeError, match="no primitive"), torch.inference_mode(), packed_linears(model):
        pass
    assert not any("forward" in vars(m) for m in model)


def test_bfloat16_without_cpu_support_and_autocast_keep_torchs_kernels(monkeypatch):
    from calm.engine.kernels import linear

    weight, x = torch.randn(32, 16).to(torch.bfloat16), torch.randn(4, 16).to(torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with torch.inference_mode(), packed_linears(_model()):
        assert torch.equal(linear(x, weight), torch.nn.functional.linear(x, weight))
    model = _model()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model):
        assert not any("forward" in vars(m) for m in model)


def test_only_slots_computes_the_kept_token_slots_and_nothing_else():
    """Inside only_slots, a packed linear over [B, T, in] runs on the kept slots only: their outputs are
    nn.Linear's, the others are zero (not even the bias is added: nothing was computed there). Inputs of
    another leading shape, and blocks outside packed_linears, are not narrowed."""
    model, x = _model(), torch.randn(3, 4, 16)
    keep = torch.tensor([[True, True, False, False], [True, False, False, False], [False, False, False, False]])
    layer = model[0]
    with torch.inference_mode():
        expected, other = layer(x), torch.randn(3, 5, 16)
        with only_slots(keep):  # outside packed_linears: no narrowing
            torch.testing.assert_close(layer(x), expected)
        with packed_linears(model), only_slots(keep) as kept:
            out = layer(x)
            assert kept.tolist() == [0, 1, 4]  # the kept slots, flattened
            torch.testing.assert_close(layer(other), torch.nn.functional.linear(other, layer.weight, layer.bias))
        with packed_linears(model), only_slots(torch.ones_like(keep)):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[~keep]) == 0
