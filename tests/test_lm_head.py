import torch

from calm.engine.lm_head import CertifiedArgmax


def test_certified_argmax_equals_the_float32_argmax():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5000, 64, generator=g) * 0.05
    x = torch.randn(32, 64, generator=g) * 3
    assert torch.equal(CertifiedArgmax(weight)(x), (x @ weight.T).argmax(1))


def test_near_ties_that_bfloat16_cannot_separate_are_settled_in_float32():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(1000, 32, generator=g)
    x = torch.randn(4, 32, generator=g)
    for row in range(4):
        best = int((x[row] @ weight.T).argmax())
        rival = (best + 1) % 1000
        # a rival whose exact logit is higher by less than bfloat16 can resolve
        weight[rival] = weight[best] + 1e-4 * x[row] / x[row].norm()
    exact = (x @ weight.T).argmax(1)
    assert torch.equal(CertifiedArgmax(weight)(x), exact)


def test_only_plain_float32_linear_heads_get_one():
    assert CertifiedArgmax.for_head(torch.nn.Linear(8, 16, bias=False)) is not None
    assert CertifiedArgmax.for_head(torch.nn.Linear(8, 16, bias=True)) is None
    assert CertifiedArgmax.for_head(torch.nn.Linear(8, 16, bias=False).to(torch.bfloat16)) is None
