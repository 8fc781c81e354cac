import torch

from calm.engine.kv_cache import KVCache


def test_allocate_write_and_read_back():
    cache = KVCache.allocate(
        num_layers=3, batch=2, kv_heads=2, max_slots=8, head_dim=4, dtype=torch.float32, device=torch.device("cpu")
    )
    k = torch.randn(2, 2, 3, 4)
    v = torch.randn(2, 2, 3, 4)
    cache.write(1, 2, k, v)
    kc, vc = cache.keys_values(1, 5)
    assert kc.shape == (2, 2, 5, 4)
    assert torch.equal(kc[:, :, 2:5], k) and torch.equal(vc[:, :, 2:5], v)
    assert torch.count_nonzero(cache.k[0]) == 0 and torch.count_nonzero(cache.k[2]) == 0


def test_write_layers_fills_many_and_first_slots_skip_left_padding():
    cache = KVCache.allocate(4, 3, 1, 6, 2, torch.float32, torch.device("cpu"))
    k = torch.randn(2, 3, 1, 1, 2)  # layers 2..3, one slot
    cache.write_layers(2, 4, k, k + 1)
    assert torch.equal(cache.k[2:4, :, :, 4:5], k) and torch.equal(cache.v[2:4, :, :, 4:5], k + 1)
    kc, _ = cache.keys_values(3, 5)
    assert kc.data_ptr() == cache.k[3].data_ptr()  # a view of the cache, not a copy
    cache.key_mask[0, 0:] = True
    cache.key_mask[1, 3:] = True
    cache.key_mask[2, 5:] = True
    assert cache.first_slots() == [0, 3, 5]


def test_layer_views_write_into_the_cache_and_follow_a_replaced_tensor():
    cache = KVCache.allocate(2, 3, 1, 6, 2, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 1, 1, 2), torch.randn(2, 1, 1, 2)
    cache.write(1, 4, k, v, rows=torch.tensor([0, 2]))  # some rows, by index
    assert torch.equal(cache.k[1, [0, 2], :, 4:5], k) and torch.count_nonzero(cache.k[1, 1]) == 0
    cache.write(0, 0, k, v, rows=slice(1, 3))  # consecutive rows, as a slice
    assert torch.equal(cache.v[0, 1:3, :, 0:1], v)
    kc, _ = cache.keys_values(1, 5, rows=slice(0, 1))
    assert kc.data_ptr() == cache.k[1].data_ptr()  # a view, not a copy
    cache.k = torch.ones_like(cache.k)  # a new tensor (as moving a cache makes): the views follow it
    assert torch.equal(cache.keys_values(0, 6)[0], torch.ones(3, 1, 6, 2))
