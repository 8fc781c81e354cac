"""The static decode step: fixed shapes, exits as masks, no host synchronisation inside a step.

The dynamic step (calm.engine.decode) asks the host which rows exited at every allowed layer, so that it
can skip their work: right on a CPU, where skipping compute is the point, but on a GPU each
question stalls the device, and it rules out CUDA graphs and `torch.compile` of the whole step.
This step never asks. Every row runs every layer; a row that has exited keeps its frozen hidden
state (its attention and MLP outputs are computed and dropped by `torch.where`), and its input
norm and K/V projection still run, which is CALM's state propagation as in the dynamic step.
Attention reads all S slots of the cache under key_mask, so shapes do not change from one token to
the next; the slot, the positions and the threshold are tensors, so nothing recompiles per token, and the cache's
slot count is a dynamic dimension, so nothing recompiles for another prompt length either.

The one skip that needs no host is known when the step is traced: under the `fixed` measure every
row leaves at the first allowed layer, so the layers above it only get their K/V filled.

`torch.compile(static_step, fullgraph=True)` captures the step as one graph (tests/test_static_decode.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import torch

from calm.adapters.base import EncoderMemory
from calm.engine.decode import DecodeState, ExitPlan, Network, exit_decision
from calm.engine.sampling import SamplingConfig, next_token

SLOT_MULTIPLE = 64  # cache slots are allocated in multiples of this, so prompts of similar length share a shape

StepFunction = Callable[
    [Network, ExitPlan, torch.Tensor, "StaticState", torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass
class StaticState:
    """What a static step reads and writes: tensors only (a Python int here would recompile per token)."""

    k: tuple[torch.Tensor, ...]  # per layer [B, H_kv, S, D_head], each its own storage: a write into a
    v: tuple[torch.Tensor, ...]  # view of one [L, ...] input would make inductor copy the whole tensor
    key_mask: torch.Tensor  # [B, S] bool, True where a slot holds a real token
    positions: torch.Tensor  # [B] long, position id of the next token
    slot: torch.Tensor  # [1] long, the cache slot of the next token (same for every row)
    encoder: EncoderMemory | None = None
    compiled: bool = False  # the step runs through torch.compile: lengths are marked dynamic (any_length)

    @classmethod
    def after_prefill(cls, state: DecodeState, compiled: bool = False) -> StaticState:
        cache = state.cache
        slot = torch.tensor([cache.length], dtype=torch.long, device=cache.k.device)
        k, v = (tuple(t.clone() for t in kv.unbind(0)) for kv in (cache.k, cache.v))
        return cls(k, v, cache.key_mask, state.positions.clone(), slot, state.encoder, compiled).any_length()

    def any_length(self) -> StaticState:
        """For a compiled step: marks the cache's slot count S (and an encoder-decoder's encoder length) as
        dynamic, so that one graph serves every prompt length. Eager steps leave the tensors unmarked."""
        if not self.compiled:
            return self
        from torch._dynamo import maybe_mark_dynamic  # loaded only where the step compiles

        for t in (*self.k, *self.v):
            maybe_mark_dynamic(t, 2)
        maybe_mark_dynamic(self.key_mask, 1)
        encoder = self.encoder
        if encoder is not None and encoder.mask.shape[1] > 1:  # a length of 1 is specialised, not marked
            for t in (*encoder.cross_k, *encoder.cross_v):
                maybe_mark_dynamic(t, 2)
            maybe_mark_dynamic(encoder.mask, 1)
        return self

    def advance(self) -> None:
        """Move to the next slot and position, in place on the device (no host sync)."""
        self.slot += 1
        self.positions += 1

    def select(self, rows: torch.Tensor) -> StaticState:
        """Only `rows` (long [R], on the device) of the batch: compaction once some rows have finished."""
        encoder = self.encoder
        if encoder is not None:
            encoder = EncoderMemory(
                cross_k=tuple(t.index_select(0, rows) for t in encoder.cross_k),
                cross_v=tuple(t.index_select(0, rows) for t in encoder.cross_v),
                mask=encoder.mask.index_select(0, rows),
            )
        return replace(
            self,
            k=tuple(t.index_select(0, rows) for t in self.k),
            v=tuple(t.index_select(0, rows) for t in self.v),
            key_mask=self.key_mask.index_select(0, rows),
            positions=self.positions.index_select(0, rows),
            encoder=encoder,
        ).any_length()


def full_depth(plan: ExitPlan, num_layers: int) -> int:
    """Layers a step runs in full. Under `fixed` every row leaves at the first allowed layer, which
    is known when the step is traced; under any other measure a row may run to the last layer."""
    if plan.measure == "fixed" and plan.allowed:
        return min(plan.allowed)
    return num_layers


def static_step(
    net: Network, plan: ExitPlan, tokens: torch.Tensor, state: StaticState, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every row: tokens [B] -> the LM head's input [B, D] (each row's exit state through its exit
    head and the final norm) and exit layers [B] (1..L); `static_tokens` picks the tokens from it. Writes the
    token's K/V at state.slot of every layer; threshold is a 0-d tensor."""
    a = net.adapter
    batch = tokens.shape[0]
    state.key_mask[:, state.slot] = True
    positions = state.positions[:, None]  # [B, 1]
    ctx = a.static_context(positions, state.key_mask, state.slot, state.encoder)
    h = a.embed(tokens[:, None], positions)  # [B, 1, D]
    exit_layers = torch.full((batch,), a.num_layers, dtype=torch.long, device=tokens.device)
    running = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    depth = full_depth(plan, a.num_layers)
    for i in range(depth):
        x = a.attn_input(i, h)
        k, v = a.kv(i, x, ctx)  # every row
        state.k[i][:, :, state.slot] = k  # in place (index_put_)
        state.v[i][:, :, state.slot] = v
        h_out = a.finish_layer(i, h, x, state.k[i], state.v[i], ctx)  # [B, 1, D]
        h_in, h = h, torch.where(running[:, None, None], h_out, h)  # exited rows: frozen
        layer = i + 1
        if layer in plan.allowed:
            confident, _ = exit_decision(net, plan, layer, h_out[:, 0], h_in[:, 0], threshold)
            exits = confident & running
            exit_layers = torch.where(exits, layer, exit_layers)
            running = running & ~exits
    if depth < a.num_layers:  # every row left at `depth`: propagate its state upward
        k, v = a.kv_layers(depth, h, ctx)  # [n, B, H_kv, 1, D]
        for j in range(k.shape[0]):
            state.k[depth + j][:, :, state.slot] = k[j]
            state.v[depth + j][:, :, state.slot] = v[j]
    return net.head_input(h[:, 0], exit_layers), exit_layers


def static_tokens(
    net: Network, x: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The next tokens [B] from the LM head's input x [B, D]: from the LM head's logits, with no host read; greedy
    on a native head (calm.engine.quantized, CPU only), from its certified argmax, as the dynamic step picks a
    token at full depth: the float32 argmax of the dequantised head, where the head's own int4 kernel rounds the
    logits to bfloat16 (its candidate search reads the host, which costs a CPU nothing)."""
    if not sampling.do_sample and net.argmax is not None and net.argmax.native is not None:
        return net.argmax(x)
    return next_token(net.adapter.lm_head(x), sampling, generator)


@cache
def compiled_step(backend: str = "inductor", mode: str | None = None) -> StepFunction:
    """static_step through torch.compile as one whole graph (fullgraph: a graph break is an error).

    One wrapper per backend and mode, so calls share dynamo's cache: a new batch size, model or exit
    plan compiles once (a new cache length does not: StaticState.any_length); a new token or threshold does not."""
    return torch.compile(static_step, fullgraph=True, backend=backend, mode=mode)
