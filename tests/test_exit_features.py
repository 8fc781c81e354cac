"""Exit features for a richer exit decision: values on a tiny model, and the logistic fit."""

import pytest
import torch

from calm.adapters import adapter_for
from calm.eval.ceiling import replay_exits
from calm.eval.exit_features import ALL, ExitFeatures, exit_features, fit_exit_model, score_exit_model
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.training import Features
from helpers import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_features(positions: int = 24, layers: int = 5) -> tuple[ExitFeatures, object, Features]:
    torch.manual_seed(0)
    model = tiny_llama(layers=layers)
    adapter = adapter_for(model)
    heads = ExitHeads(HeadsConfig(num_layers=layers, hidden_size=model.config.hidden_size, min_layer=2))
    torch.nn.init.normal_(heads.cls_weight)
    exits = torch.randn(positions, layers - 1, model.config.hidden_size)
    final = adapter.final_norm(torch.randn(positions, model.config.hidden_size))
    feats = Features(exits, final)
    return exit_features(adapter, heads, feats, chunk=5), (adapter, heads), feats


def test_features_agree_with_the_replay_and_have_their_meaning():
    f, (adapter, heads), feats = tiny_features()
    replay = replay_exits(adapter, heads, feats)
    assert torch.equal(f.agree, replay.agree)
    assert torch.allclose(f.select(("margin",))[..., 0], replay.scores["softmax"], atol=1e-6)
    above = slice(1, None)  # the classifier exits from layer 2
    cls = f.select(("classifier_logit",))[..., 0].sigmoid()
    assert torch.allclose(cls[:, above], replay.scores["classifier"][:, above], atol=1e-6)
    layer = f.select(("layer",))[..., 0]
    assert torch.allclose(layer[0], torch.arange(1, 5) / 5)
    p1, margin = f.select(("max_prob",))[..., 0], f.select(("margin",))[..., 0]
    assert (margin <= p1).all() and (f.select(("entropy",)) >= 0).all()
    # consecutive-layer agreement: 0 at layer 1; agree_prev2 implies agree_prev
    prev, prev2 = f.select(("agree_prev",))[..., 0], f.select(("agree_prev2",))[..., 0]
    assert (prev[:, 0] == 0).all() and (prev2 <= prev).all() and (prev2[:, :2] == 0).all()


def test_logistic_fit_ranks_agreeing_positions_above_the_others():
    torch.manual_seed(1)
    P, L1 = 400, 4
    agree = torch.rand(P, L1) < 0.5
    values = torch.randn(P, L1, len(ALL))
    values[..., ALL.index("margin")] += 3.0 * agree.float()  # one informative feature
    f = ExitFeatures(values, agree, num_layers=L1 + 1, min_exit_layer=1)
    model = fit_exit_model(f, ("margin", "entropy"))
    assert model.weight[0] > 1.0 and abs(float(model.weight[1])) < 0.5
    scores = score_exit_model(model, f)
    assert scores.shape == (P, L1)
    assert scores[agree].mean() > 0.8 and scores[~agree].mean() < 0.2
