"""calm.training.order: seeded randomness and the data order, a pure function of (seed, step)."""

from __future__ import annotations

import pytest
import torch

from calm.errors import InputError
from calm.training.order import EpochSampler, generator, local_count, mix


def test_sampler_is_a_function_of_seed_and_step():
    s = EpochSampler(10, seed=1)
    first = torch.cat([s.indices(step, 4) for step in range(5)])
    assert sorted(first[:10].tolist()) == list(range(10))  # one epoch is a permutation
    again = EpochSampler(10, seed=1)
    assert torch.equal(again.indices(3, 4), s.indices(3, 4))  # a function of (seed, step) alone
    assert not torch.equal(EpochSampler(10, seed=2).indices(0, 10), s.indices(0, 10))
    with pytest.raises(InputError, match="no training positions"):
        EpochSampler(0, seed=1)


def test_seeds_are_stable_and_tell_purposes_apart():
    assert mix(1, "epoch", 0) == mix(1, "epoch", 0) and 0 <= mix(1, "epoch", 0) < 2**63
    assert len({mix(1, "epoch", 0), mix(1, "epoch", 1), mix(1, "chunks"), mix(2, "epoch", 0)}) == 4
    assert torch.equal(torch.rand(3, generator=generator(5, "x")), torch.rand(3, generator=generator(5, "x")))


def test_local_counts_share_the_rows_out():
    assert [local_count(10, rank, 3) for rank in range(3)] == [4, 3, 3]
    assert sum(local_count(7, rank, 4) for rank in range(4)) == 7
