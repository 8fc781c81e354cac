import pytest
import torch

from calm.exits.confidence import softmax_margin, state_similarity
from calm.exits.heads import ExitHeads, HeadsConfig


def test_softmax_margin_is_top1_minus_top2_in_float32():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])).to(torch.bfloat16)
    margin = softmax_margin(logits)
    assert margin.dtype == torch.float32
    assert torch.allclose(margin, torch.tensor([0.5, 0.0]), atol=1e-2)


def test_state_similarity_is_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    assert torch.allclose(state_similarity(a, b), torch.tensor([1.0, -1.0]))


def test_classifier_is_a_probability_and_untrained_transform_is_identity():
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=8, rank=2))
    h = torch.randn(3, 8)
    p = heads.classify(h, 2)
    assert p.shape == (3,) and torch.all((p >= 0) & (p <= 1))
    assert torch.equal(heads.transform(h, torch.tensor([1, 2, 4])), h)
    with torch.no_grad():
        heads.up.normal_()
    moved = heads.transform(h, torch.tensor([1, 2, 4]))
    assert not torch.equal(moved[:2], h[:2]) and torch.equal(moved[2], h[2])  # layer L passes through


def test_layers_below_the_trained_range_are_never_confident():
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=8, rank=2, min_layer=3))
    with torch.no_grad():
        heads.cls_bias.fill_(10.0)
    h = torch.randn(2, 8)
    assert torch.equal(heads.classify(h, 2), torch.zeros(2))
    assert torch.all(heads.classify(h, 3) > 0.99)


# ---- issue 20, item 2: the softmax measure's cost, said once where it outweighs the saving ---------------


def test_check_overhead_counts_checks_against_layers_saved():
    from calm.exits.confidence import check_overhead

    # two rows; the first token of each comes from the prefill and is left out
    checks, spent, saved = check_overhead([[4, 2, 4], [4, 3]], [2, 3], 4, check_layers=2.0)
    assert (checks, saved) == pytest.approx(((1 + 2 + 2) / 3, (2 + 0 + 1) / 3))
    assert spent == pytest.approx(checks * 2.0)


def test_softmax_check_cost_is_the_head_over_one_layer(llama):
    from calm.exits.confidence import softmax_check_layers

    head = llama.lm_head.weight.numel()
    body = sum(p.numel() for p in llama.parameters()) - head - llama.model.embed_tokens.weight.numel()
    assert softmax_check_layers(llama, llama.lm_head, 4) == pytest.approx(head / (body / 4))


@pytest.mark.parametrize("cost, warned", [(8.0, True), (0.01, False)])
def test_the_footer_warns_once_when_softmax_checks_cost_more_than_they_save(tiny_model, monkeypatch, cost, warned):
    from helpers import invoke

    monkeypatch.setattr("calm.eval.render.softmax_check_layers", lambda *args: cost)
    args = ("summarize", "--model", tiny_model, "--text", "the cat sat on the mat", "--max-new-tokens", 4)
    result = invoke(*args, "--measure", "softmax", "--threshold", "0")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("the softmax measure cost more than it saved") == (1 if warned else 0)
    state = invoke(*args, "--measure", "state", "--threshold", "0.3")
    assert "the softmax measure" not in state.stderr
