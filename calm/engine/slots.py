"""The cache of a continuous batch: B rows ("slots") that requests occupy and leave while the batch runs.

All slots share the write column (cache.length), as in a left-padded batch: a request that joins is
prefilled alone, at its own length, straight into the slots length-T..length-1 of its cache row, so it
looks like a row that was left-padded from the start and the decode step needs nothing new. No prompt
token is padded or computed twice. A prompt longer than the columns written so far moves every live row
right first; when the columns run out, the batch moves left by the padding every live row has in common (the
slots before the earliest first slot), and the cache grows only when that frees too little. Moves copy the
live rows only: a free slot's row holds nothing anyone reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calm.adapters.base import EncoderMemory
from calm.engine.decode import DecodeState, Network, StepOutput, prefill, row_selector
from calm.engine.kv_cache import KVCache

GROW_FACTOR = 1.5  # a full cache grows to this many times the columns it needs


@dataclass
class SlotBatch:
    """A DecodeState whose rows are slots, and which of them hold a request (host bookkeeping)."""

    state: DecodeState
    live: list[bool]

    @classmethod
    def allocate(cls, net: Network, slots: int, columns: int) -> SlotBatch:
        a = net.adapter
        cache = KVCache.allocate(a.num_layers, slots, a.num_kv_heads, columns, a.head_dim, a.dtype, a.device)
        positions = torch.zeros(slots, dtype=torch.long, device=a.device)
        return cls(DecodeState(cache=cache, positions=positions, first_slots=(0,) * slots), [False] * slots)

    @property
    def cache(self) -> KVCache:
        return self.state.cache

    @property
    def slots(self) -> int:
        return len(self.live)

    def free_slots(self) -> list[int]:
        return [b for b, used in enumerate(self.live) if not used]

    def admit(self, net: Network, slot: int, ids: list[int]) -> tuple[StepOutput, int]:
        """Prefill the prompt ids into the free `slot`, ending at the write column (an encoder-decoder: the
        encoder reads ids, and the decoder's start tokens go in the slot). -> its full-depth output for the last
        prompt token (hidden [1, D]), and the slots the row's cache now holds."""
        a = net.adapter
        encoder = None
        if a.is_encoder_decoder:
            encoder = self._encode(net, slot, ids)
            ids = a.decoder_start_ids(1)[0].tolist()
        t = len(ids)
        if t > self.cache.length:
            self._shift_right(t - self.cache.length)
        end = self.cache.length
        cache = self.cache
        cache.key_mask[slot] = False  # decode steps mark every row's new column, free slots' too
        view = KVCache(
            k=cache.k[:, slot : slot + 1, :, end - t : end],
            v=cache.v[:, slot : slot + 1, :, end - t : end],
            key_mask=cache.key_mask[slot : slot + 1, end - t : end],
        )
        view.key_mask.fill_(True)
        row = DecodeState(cache=view, positions=self.state.positions[:1].clone(), first_slots=(0,), encoder=encoder)
        out = prefill(net, torch.tensor([ids], dtype=torch.long, device=cache.k.device), row)
        self.state.positions[slot] = t
        self._set_first(slot, end - t)
        self.live[slot] = True
        return out, t

    def _encode(self, net: Network, slot: int, ids: list[int]) -> EncoderMemory:
        """Run the encoder over ids and place its memory in the slot's row of the batch's, which widens (padding
        masked) when ids are longer than any before. -> the slot's row of it (views)."""
        device = self.cache.k.device
        memory = net.adapter.encode(
            torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.bool, device=device)
        )
        t, batch = len(ids), self.state.encoder
        if batch is None or batch.mask.shape[1] < t:
            batch = self._widened(memory, t)
            self.state.encoder = batch
        batch.mask[slot] = False
        batch.mask[slot, :t] = True
        for big, row in zip((*batch.cross_k, *batch.cross_v), (*memory.cross_k, *memory.cross_v)):
            big[slot, :, :t] = row[0]
        pick = slice(slot, slot + 1)
        return EncoderMemory(
            tuple(k[pick] for k in batch.cross_k), tuple(v[pick] for v in batch.cross_v), batch.mask[pick]
        )

    def _widened(self, like: EncoderMemory, columns: int) -> EncoderMemory:
        """The batch's encoder memory with `columns` columns: the old one's rows copied, padding masked."""
        old, slots = self.state.encoder, len(self.live)

        def grow(
            tensors: tuple[torch.Tensor, ...], before: tuple[torch.Tensor, ...] | None
        ) -> tuple[torch.Tensor, ...]:
            out = []
            for i, x in enumerate(tensors):
                new = x.new_zeros(slots, x.shape[1], columns, x.shape[3])
                if before is not None:
                    new[:, :, : before[i].shape[2]] = before[i]
                out.append(new)
            return tuple(out)

        mask = torch.zeros(slots, columns, dtype=torch.bool, device=like.mask.device)
        if old is not None:
            mask[:, : old.mask.shape[1]] = old.mask
        return EncoderMemory(
            grow(like.cross_k, old.cross_k if old else None), grow(like.cross_v, old.cross_v if old else None), mask
        )

    def release(self, slot: int) -> None:
        """The slot's request left: its cache row holds nothing from now on."""
        self.live[slot] = False
        self.cache.key_mask[slot] = False
        self._set_first(slot, self.cache.length)

    def make_room(self, width: int) -> None:
        """Room for `width` more columns: move left by the padding all live rows share, else grow."""
        cache = self.cache
        if cache.length + width <= cache.max_slots:
            return
        firsts = [f for f, used in zip(self.state.first_slots, self.live) if used]
        shift = min(firsts, default=cache.length)
        if shift > 0:
            self._shift_left(shift)
        if cache.length + width > cache.max_slots:
            self._grow(int((cache.length + width) * GROW_FACTOR))

    def _shift_left(self, shift: int) -> None:
        cache, n = self.cache, self.cache.length - shift
        self._copy_live(cache, slice(shift, shift + n), cache, slice(0, n))
        cache.key_mask[:, :n] = cache.key_mask[:, shift : shift + n].clone()
        cache.key_mask[:, n:] = False
        cache.length = n
        self.state.first_slots = tuple(max(f - shift, 0) for f in self.state.first_slots)

    def _shift_right(self, shift: int) -> None:
        cache, n = self.cache, self.cache.length
        if n + shift > cache.max_slots:
            self._grow(int((n + shift) * GROW_FACTOR))
            cache = self.cache
        self._copy_live(cache, slice(0, n), cache, slice(shift, shift + n))
        cache.key_mask[:, shift : shift + n] = cache.key_mask[:, :n].clone()
        cache.key_mask[:, :shift] = False
        cache.length = n + shift
        self.state.first_slots = tuple(f + shift for f in self.state.first_slots)

    def _grow(self, columns: int) -> None:
        old = self.cache
        layers, slots, heads, _, dim = old.k.shape
        new = KVCache.allocate(layers, slots, heads, columns, dim, old.k.dtype, old.k.device)
        n = old.length
        self._copy_live(old, slice(0, n), new, slice(0, n))
        new.key_mask[:, :n] = old.key_mask[:, :n]
        new.length = n
        self.state.cache = new

    def _copy_live(self, source: KVCache, columns: slice, target: KVCache, to: slice) -> None:
        """K/V of the live slots' cache rows at `columns` of source into `to` of target: a free slot's row holds
        nothing anyone reads, so moving the cache costs what its requests hold, not what the batch could."""
        rows = [b for b, used in enumerate(self.live) if used]
        if not rows:
            return
        sel = row_selector(torch.tensor(rows))
        for src, dst in ((source.k, target.k), (source.v, target.v)):
            dst[:, sel, :, to] = src[:, sel, :, columns].clone()

    def _set_first(self, slot: int, first: int) -> None:
        firsts = list(self.state.first_slots)
        firsts[slot] = first
        self.state.first_slots = tuple(firsts)
