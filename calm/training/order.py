"""Seeded randomness and the data order: every random choice of a training run is seeded by (seed,
purpose, index), and steps read consecutive slices of per-epoch permutations, so the order is a pure
function of (seed, step)."""

from __future__ import annotations

import hashlib

import torch

from calm.errors import InputError


def mix(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(mix(*parts))


class EpochSampler:
    """Indices of step `step`: consecutive slices of per-epoch permutations seeded by (seed, rank, epoch)."""

    def __init__(self, size: int, seed: int, rank: int = 0):
        if size < 1:
            raise InputError("no training positions: the data produced no usable sequences")
        self.size, self.seed, self.rank = size, seed, rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=generator(self.seed, "epoch", self.rank, epoch))}
        return self._perms[epoch]

    def indices(self, step: int, count: int) -> torch.Tensor:
        out, i = [], step * count
        while count > 0:
            epoch, offset = divmod(i, self.size)
            take = min(count, self.size - offset)
            out.append(self._perm(epoch)[offset : offset + take])
            i += take
            count -= take
        return torch.cat(out)


def local_count(total: int, rank: int, world: int) -> int:
    """This process's share of `total` rows."""
    return total // world + (1 if rank < total % world else 0)
