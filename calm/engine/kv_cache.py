"""A preallocated key/value cache indexed by slot, one tensor for all layers (as in gpt-fast).

Slots are columns of the left-padded batch: slot s of every row is written at the same step.
`key_mask` says which slots hold real tokens for each row (padding is False). Prompts are
left-padded, so a row's real slots run contiguously from its first one to the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Rows = slice | torch.Tensor | None  # some rows of the batch: consecutive ones as a slice, others as long [R]; None: all


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, H_kv, S_max, D_head]
    v: torch.Tensor  # [L, B, H_kv, S_max, D_head]
    key_mask: torch.Tensor  # [B, S_max] bool
    length: int = 0  # slots written so far (same for every row)

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_slots: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (num_layers, batch, kv_heads, max_slots, head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            key_mask=torch.zeros(batch, max_slots, dtype=torch.bool, device=device),
        )

    @property
    def max_slots(self) -> int:
        return self.k.shape[3]

    def layer_views(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each layer's K and V [B, H_kv, S_max, D_head], as views made once: picking a layer from a tuple
        runs no torch op, where indexing k by layer runs one per call (a decode step makes four per layer)."""
        views = self.__dict__.get("_views")
        if views is None or views[0] is not self.k or views[1] is not self.v:
            views = self.__dict__["_views"] = (self.k, self.v, self.k.unbind(0), self.v.unbind(0))
        return views[2], views[3]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, rows: Rows = None) -> None:
        """Store k, v [R, H_kv, T, D_head] of the rows `rows` (every row when None) at slots start..start+T-1."""
        end = start + k.shape[2]
        ks, vs = self.layer_views()
        if rows is None:
            ks[layer][:, :, start:end] = k
            vs[layer][:, :, start:end] = v
            return
        ks[layer][rows, :, start:end] = k
        vs[layer][rows, :, start:end] = v

    def write_layers(self, first: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, B, H_kv, T, D_head] for layers first..first+n-1 in one copy."""
        last = first + k.shape[0]
        end = start + k.shape[3]
        self.k[first:last, :, :, start:end] = k
        self.v[first:last, :, :, start:end] = v

    def keys_values(self, layer: int, end: int, rows: Rows = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [R, H_kv, end, D_head] of slots 0..end-1 of the rows `rows` (every row when None): views where
        rows is None or a slice, copies for an index tensor."""
        ks, vs = self.layer_views()
        k, v = ks[layer][:, :, :end], vs[layer][:, :, :end]
        if isinstance(rows, torch.Tensor):
            return k.index_select(0, rows), v.index_select(0, rows)
        return (k, v) if rows is None else (k[rows], v[rows])

    def first_slots(self) -> list[int]:
        """Each row's first real slot (host ints; one sync)."""
        return self.key_mask.int().argmax(dim=1).tolist()
