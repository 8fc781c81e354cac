"""calm.training.objectives: what each mode minimises, on the tiny backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calm.adapters import adapter_for
from calm.checkpoints import lora
from calm.checkpoints.loading import load_backbone
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.training import (
    FinetuneObjective,
    HeadsObjective,
    LoraObjective,
    TrainSequence,
    classifier_logits,
    last_state_is_normed,
    layer_weights,
)
from calm.training.objectives import balance_weights, lora_loss, make_batch
from training_helpers import training_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heads_objective_sends_gradient_only_to_heads(training_setup):
    model = load_backbone(training_setup["backbone"]).model
    model.requires_grad_(False)
    a = adapter_for(model)
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4))
    with torch.no_grad():
        heads.up.normal_()
    obj = HeadsObjective(heads, a)
    h = torch.randn(6, 64)
    kl, logit, labels = obj(h, torch.tensor([1, 2, 3, 1, 2, 3]), torch.randn(2, 64), torch.tensor([0, 0, 0, 1, 1, 1]))
    (kl.mean() + F.binary_cross_entropy_with_logits(logit, labels)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert heads.down.grad is not None and heads.up.grad is not None and heads.cls_weight.grad is not None
    assert set(labels.tolist()) <= {0.0, 1.0} and (kl >= -1e-5).all()
    # the vectorised classifier logit is ExitHeads' own
    with torch.no_grad():
        heads.cls_weight.normal_()
        for k in (1, 2, 3):
            rows = torch.tensor([k, k, k, k, k, k])
            torch.testing.assert_close(classifier_logits(heads, h, rows), heads.classifier_logit(h, k))


def test_finetune_layer_weights_follow_layer_index():
    w = layer_weights(4)
    torch.testing.assert_close(w, torch.tensor([1, 2, 3, 4]) / 10.0)
    assert torch.all(w[1:] > w[:-1]) and torch.isclose(w.sum(), torch.tensor(1.0))
    w30 = layer_weights(30)
    torch.testing.assert_close(w30 / w30[0], torch.arange(1, 31, dtype=torch.float32))


def test_finetune_objective_is_the_per_layer_loss(training_setup):
    model = load_backbone(training_setup["backbone"]).model
    a = adapter_for(model)
    obj = FinetuneObjective(model, a, last_state_is_normed(model, a, torch.device("cpu")))
    ids = torch.randint(3, 300, (1, 10))
    rows, cols = torch.zeros(9, dtype=torch.long), torch.arange(9)
    per_layer = obj(ids, torch.ones_like(ids), rows, cols, ids[0, 1:])
    assert per_layer.shape == (4,)
    with torch.no_grad():
        full = model(ids).logits[0, :9]
    torch.testing.assert_close(per_layer[-1], F.cross_entropy(full, ids[0, 1:]), rtol=1e-4, atol=1e-4)


def test_make_batch_pads_right_and_lists_the_loss_positions():
    seqs = [TrainSequence((5, 6, 7), (1,), (7,), "text", "x"), TrainSequence((8, 9), (0, 1), (9, 4), "text", "x")]
    b = make_batch(seqs, "cpu")
    assert b.ids.tolist() == [[5, 6, 7], [8, 9, 0]] and b.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.rows.tolist() == [0, 1, 1] and b.cols.tolist() == [1, 0, 1] and b.targets.tolist() == [7, 9, 4]


def test_balance_weights_are_negatives_over_positives():
    w = balance_weights(torch.tensor([1.0, 9.0, 0.0]), torch.tensor([10.0, 10.0, 1e6], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([10 / 2, 2 / 10, 100.0]))  # smoothed by one, clamped
    assert w.dtype == torch.float32


def test_fresh_lora_objective_matches_the_teacher(training_setup):
    """With fresh adapters (B = 0) the adapted model is the original: the anchor is 0 and the final layers agree;
    exit layers through untrained heads are far from it, and the loss decays the label counts."""
    model = load_backbone(training_setup["backbone"]).model
    a = adapter_for(model)
    normed = last_state_is_normed(model, a, "cpu")
    peft_model = lora.attach(model, lora.LoraSpec(rank=2, alpha=4.0), a.num_layers)
    obj = LoraObjective(peft_model, ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4)), normed)
    batch = make_batch([TrainSequence(tuple(range(3, 15)), (4, 7, 10), (8, 11, 14), "text", "x")], "cpu")
    out = obj(batch, [1, 3], obj.teacher(batch))
    assert out["anchor"].abs() < 1e-5 and out["final_agree"] == 1.0
    assert out["kl"].shape == (2,) and (out["kl"] > 1e-3).all() and out["logits"].shape == (2, 3)
    counts = torch.ones(2, 3, dtype=torch.float64)
    loss, metrics = lora_loss(training_config(training_setup, "o", mode="lora", anchor=2.0), out, [1, 3], counts)
    assert counts[1].tolist() == [0.99 + 3, 0.99, 0.99 + 3]  # decayed, plus 3 positions at layers 1 and 3
    want = (out["kl"] * torch.tensor([1.0, 3.0])).sum() / 4 + 2.0 * out["anchor"]
    assert loss.item() > want.item() and metrics["exit_kl"] == pytest.approx(want.item() - 2.0 * out["anchor"].item())
