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

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, rows: Rows = None) -> None:
        """Store k, v [R, H_kv, T, D_head] of the rows `rows` (every row when None) at slots start..start+T-1."""
        end = start + k.shape[2]
        sel = slice(None) if rows is None else rows
        self.k[layer, sel, :, start:end] = k
        self.v[layer, sel, :, start:end] = v

    def write_layers(self, first: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, B, H_kv, T, D_head] for layers first..first+n-1 in one copy."""
        last = first + k.shape[0]
        end = start + k.shape[3]
        self.k[first:last, :, :, start:end] = k
        self.v[first:last, :, :, start:end] = v

    def keys_values(self, layer: int, end: int, rows: Rows = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [R, H_kv, end, D_head] of slots 0..end-1 of the rows `rows` (every row when None): views where
        rows is None or a slice, copies for an index tensor."""
        k, v = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if isinstance(rows, torch.Tensor):
            return k.index_select(0, rows), v.index_select(0, rows)
        sel = slice(None) if rows is None else rows
        return k[sel], v[sel]

    def first_slots(self) -> list[int]:
        """Each row's first real slot (host ints; one sync)."""
        return self.key_mask.int().argmax(dim=1).tolist()
