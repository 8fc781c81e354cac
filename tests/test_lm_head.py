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


def _near_tied(rows: int, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    weight, x = torch.randn(3000, 64, generator=g), torch.randn(rows, 64, generator=g)
    for row in range(rows):
        best = int((x[row] @ weight.T).argmax())
        weight[(best + 7) % 3000] = weight[best] + gap * x[row] / x[row].norm()
    return weight, x


def test_up_to_four_rows_are_scored_by_the_int8_copy_and_more_by_the_float32_head(monkeypatch):
    from calm.engine import kernels, lm_head

    head = torch.nn.Linear(64, 3000, bias=False)
    head.weight.data, x = _near_tied(12, 1e-4)
    argmax = CertifiedArgmax(head.weight)
    scored = []
    monkeypatch.setattr(argmax.int8, "scores", lambda a, f=argmax.int8.scores: scored.append("int8") or f(a))
    monkeypatch.setattr(lm_head, "linear", lambda a, w: scored.append(str(w.dtype)) or kernels.linear(a, w))
    with torch.inference_mode(), kernels.packed_linears(head):
        together = argmax(x)
        alone = torch.cat([argmax(x[i : i + 1]) for i in range(12)])
    assert scored == ["torch.float32"] + ["int8"] * 12
    assert torch.equal(together, alone)
    assert torch.equal(together, (x @ head.weight.T).argmax(1))


def test_the_int8_copys_error_stays_within_its_bound():
    """|int8 score - exact logit| <= |x| * width per token, on plain, spiky and heavy-tailed rows and inputs."""
    g = torch.Generator().manual_seed(4)
    for scale in (0.05, 1.0, 30.0):
        weight = torch.randn(3000, 96, generator=g) * scale
        weight[:20] *= torch.rand(20, 96, generator=g) ** 8
        x = torch.randn(16, 96, generator=g) * 7
        x[:8] = x[:8].sign() * x[:8].abs() ** 3
        int8 = CertifiedArgmax(weight).int8
        for rows in (x[:8], x[8:]):
            error = (int8.scores(rows).double() - rows.double() @ weight.double().T).abs()
            assert (error <= rows.norm(dim=1, keepdim=True).double() * int8.widths.double()).all()


def test_float32_scores_settle_ties_closer_than_float32_rounding_by_recomputing_them():
    head = torch.nn.Linear(64, 3000, bias=False)
    head.weight.data, x = _near_tied(4, 1e-6)
    from calm.engine.kernels import packed_linears

    with torch.inference_mode(), packed_linears(head):
        together = CertifiedArgmax(head.weight)(x)
    alone = torch.cat([CertifiedArgmax(head.weight)(x[i : i + 1]) for i in range(4)])
    assert torch.equal(together, alone)


def _recomputing(argmax: CertifiedArgmax, monkeypatch) -> list[int]:
    """The candidate counts each call recomputes in float32."""
    counts: list[int] = []
    rows = argmax._rows
    monkeypatch.setattr(argmax, "_rows", lambda cols: counts.append(len(cols)) or rows(cols))
    return counts


def test_rows_whose_best_float32_score_is_clear_skip_the_recomputation(monkeypatch):
    """More rows than the int8 copy scores: the float32 head's tight bound."""
    from calm.engine.kernels import onednn_available, packed_linears

    g = torch.Generator().manual_seed(3)
    clear = torch.nn.Linear(64, 3000, bias=False)
    clear.weight.data, x = torch.randn(3000, 64, generator=g), torch.randn(12, 64, generator=g) * 3
    tied = torch.nn.Linear(64, 3000, bias=False)
    tied.weight.data, y = _near_tied(12, 1e-6)
    clear_argmax, tied_argmax = CertifiedArgmax(clear.weight), CertifiedArgmax(tied.weight)
    clear_counts, tied_counts = _recomputing(clear_argmax, monkeypatch), _recomputing(tied_argmax, monkeypatch)
    with torch.inference_mode(), packed_linears(torch.nn.Sequential(clear, tied)):
        assert torch.equal(clear_argmax(x), (x @ clear.weight.T).argmax(1))
        assert torch.equal(tied_argmax(y), (y @ tied.weight.T).argmax(1))
    if onednn_available():
        assert clear_counts == [] and len(tied_counts) == 1 and tied_counts[0] >= 24  # two candidates per tied row


def test_heads_whose_width_the_int8_kernel_cannot_step_through_keep_float32_scores():
    g = torch.Generator().manual_seed(6)
    weight, x = torch.randn(500, 40, generator=g), torch.randn(3, 40, generator=g)  # 40: not a multiple of 16
    argmax = CertifiedArgmax(weight)
    assert argmax.int8 is None and torch.equal(argmax(x), (x @ weight.T).argmax(1))


def test_the_int8_copy_follows_the_head_changed_in_place():
    g = torch.Generator().manual_seed(7)
    weight, x = torch.randn(500, 64, generator=g), torch.randn(3, 64, generator=g)
    argmax = CertifiedArgmax(weight)
    assert argmax.int8 is not None and torch.equal(argmax(x), (x @ weight.T).argmax(1))
    with torch.no_grad():
        weight.mul_(-1)  # every row's best is now its worst
    assert torch.equal(argmax(x), (x @ weight.T).argmax(1))
