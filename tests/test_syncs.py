import pytest
import torch

from calm.engine.syncs import SyncCounter

HOST_READS = {
    "item": lambda t, m: t.sum().item(),
    "bool": lambda t, m: bool(m.any()),
    "int": lambda t, m: int(t[0]),
    "nonzero": lambda t, m: m.nonzero(),
    "nonzero as tuple": lambda t, m: m.nonzero(as_tuple=True),
    "where(cond)": lambda t, m: torch.where(m),
    "mask index": lambda t, m: t[m],
    "mask assign": lambda t, m: t.clone().__setitem__(m, 0.0),
    "masked_select": lambda t, m: t.masked_select(m),
    "unique": lambda t, m: torch.unique(t),
    "tolist": lambda t, m: t.tolist(),
}


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("name", list(HOST_READS))
def test_host_reads_are_counted_once(name, inference):
    """Once each, with or without inference mode (which decomposes some of them differently)."""
    t = torch.tensor([1.0, 0.0, 2.0])
    with torch.inference_mode(inference), SyncCounter() as counter:
        HOST_READS[name](t, t > 0)
    assert counter.total == 1, counter.by_op


def test_device_side_work_is_not_a_sync():
    t = torch.tensor([1.0, 0.0, 2.0])
    with SyncCounter() as counter:
        m = t > 0
        torch.where(m, t, -t).argmax()
        t[torch.tensor([0, 2])]  # integer indices need no host
        t.clone().index_fill_(0, torch.tensor([1]), 5.0)
        torch.argsort(m.to(torch.uint8), stable=True)
        torch.isin(t, torch.tensor([2.0]))
    assert counter.total == 0, counter.by_op


def test_tolist_is_restored_after_counting():
    original = torch.Tensor.tolist
    with SyncCounter():
        assert torch.Tensor.tolist is not original
    assert torch.Tensor.tolist is original
    assert torch.tensor([1, 2]).tolist() == [1, 2]
