import pytest
import torch

from calm import CalmModel
from calm.engine.sampling import SamplingConfig, filter_logits, next_token
from calm.errors import InputError


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert next_token(logits, SamplingConfig(), None).tolist() == [1, 0]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, SamplingConfig(do_sample=True, top_k=2))).tolist() == [
        [False, False, True, True]
    ]
    kept = ~torch.isinf(filter_logits(logits, SamplingConfig(do_sample=True, top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(4, 50)
    cfg = SamplingConfig(do_sample=True, temperature=0.9, seed=7)
    a = next_token(logits, cfg, cfg.generator(torch.device("cpu")))
    b = next_token(logits, cfg, cfg.generator(torch.device("cpu")))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)])
def test_bad_sampling_settings(kwargs):
    with pytest.raises(InputError):
        SamplingConfig(do_sample=True, **kwargs)


def test_sampling_without_a_seed_leaves_the_global_generator_alone():
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    cfg = SamplingConfig(do_sample=True)
    first, second = cfg.generator(torch.device("cpu")), cfg.generator(torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)
    assert first.initial_seed() != second.initial_seed()  # still unseeded: a fresh seed each time


def test_unseeded_generate_leaves_the_global_generator_alone(llama):
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    CalmModel.from_model(llama).generate([[5, 6, 7]], max_new_tokens=4, do_sample=True)
    assert torch.equal(torch.rand(4), expected)
