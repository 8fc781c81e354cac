"""The offline exit replay: oracle, threshold sweeps and token errors, on hand-made and tiny-model data."""

import pytest
import torch

from calm.adapters import adapter_for
from calm.eval.ceiling import ExitReplay, fewest_layers, first_exit, oracle_layers, replay_exits, replay_point, sweep
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.training import Features
from helpers import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_made() -> ExitReplay:
    # 3 positions, L = 4 (exit layers 1..3)
    agree = torch.tensor(
        [
            [False, True, True],  # first agrees at layer 2
            [True, False, True],  # agrees at 1, not at 2
            [False, False, False],
        ]
    )  # only the final layer has its token
    cls = torch.tensor([[0.2, 0.9, 0.95], [0.99, 0.5, 0.6], [0.1, 0.97, 0.3]])
    return ExitReplay(agree, {"classifier": cls, "softmax": cls.flip(1)}, num_layers=4, min_exit_layer=1)


def test_first_exit_respects_the_minimum_layer_and_falls_back_to_the_last():
    allowed = torch.tensor([[True, True, False], [False, False, False], [False, False, True]])
    assert first_exit(allowed, 1, 4).tolist() == [1, 4, 3]
    assert first_exit(allowed, 2, 4).tolist() == [2, 4, 3]


def test_oracle_is_the_first_agreeing_layer():
    replay = hand_made()
    assert oracle_layers(replay) == pytest.approx((2 + 1 + 4) / 3)


def test_threshold_points_count_layers_and_wrong_exits():
    replay = hand_made()
    p = replay_point(replay, "classifier", 0.9)
    # exits: pos0 at 2 (right), pos1 at 1 (right), pos2 at 2 (wrong)
    assert p.avg_layers == pytest.approx((2 + 1 + 2) / 3)
    assert p.token_error == pytest.approx(1 / 3) and p.exit_rate == pytest.approx(1.0)
    never = replay_point(replay, "classifier", 1.01)
    assert never.avg_layers == 4 and never.token_error == 0 and never.exit_rate == 0
    strict = replay_point(replay, "classifier", 0.98)  # only pos1 exits, at layer 1: right
    assert strict.token_error == 0 and strict.avg_layers == pytest.approx((4 + 1 + 4) / 3)


def test_fewest_layers_within_an_error_budget():
    points = sweep(hand_made(), "classifier", [0.9, 0.98, 1.01])
    assert fewest_layers(points, 0.0).threshold == 0.98
    assert fewest_layers(points, 0.5).threshold == 0.9
    assert fewest_layers([p for p in points if p.token_error > 0], 0.0) is None


def test_replay_on_a_tiny_model_matches_the_heads():
    torch.manual_seed(0)
    model = tiny_llama(layers=4)
    adapter = adapter_for(model)
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=model.config.hidden_size, min_layer=2))
    torch.nn.init.normal_(heads.cls_weight)
    exits = torch.randn(20, 3, model.config.hidden_size)
    final = adapter.final_norm(torch.randn(20, model.config.hidden_size))
    replay = replay_exits(adapter, heads, Features(exits, final), chunk=7)
    assert replay.min_exit_layer == 2 and replay.num_layers == 4 and replay.positions == 20
    # untrained heads are the plain shared head: agreement is argmax equality through norm + LM head
    want = adapter.lm_head(adapter.final_norm(exits[:, 1])).argmax(-1) == adapter.lm_head(final).argmax(-1)
    assert torch.equal(replay.agree[:, 1], want)
    assert torch.allclose(replay.scores["classifier"][:, 2], heads.classify(exits[:, 2], 3))
    assert (replay.scores["softmax"] >= 0).all() and (replay.scores["softmax"] <= 1).all()
    assert 2 <= oracle_layers(replay) <= 4
