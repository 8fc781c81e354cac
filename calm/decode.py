"""The early-exit decode step: prefill, and one token through the layer stack with per-row exits.

A row leaves the stack when its confidence at an allowed exit layer reaches the threshold. Its
hidden state then stays frozen in `h`, and every later layer still runs its input norm and K/V
projection over all rows: for an exited row that is CALM's state propagation (the exit state
copied upward fills the skipped layers' cache), fused into the batch's one K/V matmul. The rest
of each layer (queries, attention, MLP) runs only for the rows still going. Once no row is left,
the remaining layers' K/V are filled in one fused call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calm.adapters.base import Adapter, EncoderMemory, pick
from calm.confidence import softmax_margin, state_similarity
from calm.heads import ExitHeads
from calm.kv_cache import KVCache
from calm.policy import ExitPolicy


@dataclass(frozen=True)
class Network:
    """A backbone seen through its adapter, with optional trained exit heads."""

    adapter: Adapter
    heads: ExitHeads | None = None

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def token_logits(self, h: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """Next-token logits [R, V] of hidden states h [R, D] taken at exit layers [R] (L = full depth)."""
        if self.heads is not None:
            h = self.heads.transform(h, layers)
        return self.adapter.lm_head(self.adapter.final_norm(h))


@dataclass(frozen=True)
class ExitPlan:
    """An ExitPolicy resolved against one model: the allowed layers as a set, the measure."""

    measure: str
    allowed: frozenset[int]

    @classmethod
    def resolve(cls, policy: ExitPolicy, net: Network) -> "ExitPlan":
        allowed = frozenset(policy.allowed_layers(net.num_layers))
        if policy.measure == "classifier" and allowed and (net.heads is None or not net.heads.config.classifier):
            from calm.errors import PolicyError
            raise PolicyError("the 'classifier' measure needs trained exit heads with a classifier "
                              "(load a calm checkpoint, or train one with `calm train`)")
        return cls(measure=policy.measure, allowed=allowed)


@dataclass
class DecodeState:
    """What one decode step reads and advances, besides the tokens themselves."""

    cache: KVCache
    positions: torch.Tensor              # [B] position id of the next token
    encoder: EncoderMemory | None = None


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor       # [B, V] (rows not decoded are zero)
    exit_layers: torch.Tensor  # [B] long, 1..L


def prefill(net: Network, ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Run all layers over the prompt ids [B, T] (cache slots 0..T-1); returns last-token logits [B, V]."""
    a, cache = net.adapter, state.cache
    t = ids.shape[1]
    positions = (cache.key_mask[:, :t].long().cumsum(-1) - 1).clamp(min=0)            # [B, T]
    ctx = a.context(positions, cache.key_mask, 0, state.encoder)
    h = a.embed(ids, positions)                                                          # [B, T, D]
    for i in range(a.num_layers):
        x = a.attn_input(i, h)
        k, v = a.kv(i, x, ctx)
        cache.write(i, 0, k, v)
        kc, vc = cache.keys_values(i, t)
        h = a.finish_layer(i, h, x, kc, vc, ctx)
    cache.length = t
    state.positions = positions[:, -1] + 1
    return a.lm_head(a.final_norm(h[:, -1]))


def exit_decision(net: Network, plan: ExitPlan, layer: int, h_out: torch.Tensor, h_in: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which of R running rows exit at `layer`: bool [R], and their logits [R, V] when the measure made them."""
    if plan.measure == "fixed":
        return torch.ones(h_out.shape[0], dtype=torch.bool, device=h_out.device), None
    if plan.measure == "softmax":
        logits = net.token_logits(h_out, torch.full((h_out.shape[0],), layer, device=h_out.device))
        return softmax_margin(logits) >= threshold, logits
    if plan.measure == "state":
        return state_similarity(h_out, h_in) >= threshold, None
    return net.heads.classify(h_out, layer) >= threshold, None


def decode_one_token(net: Network, plan: ExitPlan, tokens: torch.Tensor, state: DecodeState,
                     threshold: float, rows: torch.Tensor) -> StepOutput:
    """Advance the rows `rows` (long [R], the unfinished ones) by one token. tokens [B]."""
    a, cache = net.adapter, state.cache
    slot = cache.length
    batch = tokens.shape[0]
    cache.key_mask[:, slot] = True
    positions = state.positions[:, None]                                                 # [B, 1]
    ctx = a.context(positions, cache.key_mask, slot, state.encoder)
    h = a.embed(tokens[:, None], positions)                                              # [B, 1, D]
    exit_layers = torch.full((batch,), a.num_layers, dtype=torch.long, device=tokens.device)
    running = None if rows.numel() == batch else rows                                    # None: every row
    decided: list[tuple[torch.Tensor, torch.Tensor]] = []                                # (rows, logits)
    for i in range(a.num_layers):
        x = a.attn_input(i, h)
        k, v = a.kv(i, x, ctx)
        cache.write(i, slot, k, v)
        kc, vc = cache.keys_values(i, slot + 1, running)
        h_in = pick(h, running)
        h_out = a.finish_layer(i, h_in, pick(x, running), kc, vc, ctx, running)
        h = h_out if running is None else h.index_copy(0, running, h_out)
        layer = i + 1
        if layer not in plan.allowed:
            continue
        exits, logits = exit_decision(net, plan, layer, h_out[:, 0], h_in[:, 0], threshold)
        current = rows if running is None else running
        exited = current[exits]                                                          # host sync
        if exited.numel() == 0:
            continue
        exit_layers[exited] = layer
        if logits is not None:
            decided.append((exited, logits[exits]))
        running = current[~exits]
        if running.numel() == 0:
            if layer < a.num_layers:
                k, v = a.kv_layers(layer, h, ctx)
                cache.write_layers(layer, slot, k, v)
            break
    cache.length = slot + 1
    state.positions = state.positions + 1
    return StepOutput(logits=_gather_logits(net, h[:, 0], exit_layers, rows, decided), exit_layers=exit_layers)


def _gather_logits(net: Network, h: torch.Tensor, exit_layers: torch.Tensor, rows: torch.Tensor,
                   decided: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Logits [B, V] for `rows`: reused where the exit check made them, one batched head call for the rest."""
    if not decided:
        if rows.numel() == h.shape[0]:
            return net.token_logits(h, exit_layers)
        out = net.token_logits(h.index_select(0, rows), exit_layers.index_select(0, rows))
        return torch.zeros(h.shape[0], out.shape[-1], dtype=out.dtype, device=out.device).index_copy(0, rows, out)
    have = torch.cat([r for r, _ in decided])
    need_mask = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    need_mask[rows] = True
    need_mask[have] = False
    need = need_mask.nonzero()[:, 0]
    first = decided[0][1]
    out = torch.zeros(h.shape[0], first.shape[-1], dtype=first.dtype, device=h.device)
    for r, logits in decided:
        out[r] = logits
    if need.numel():
        out[need] = net.token_logits(h.index_select(0, need), exit_layers.index_select(0, need)).to(out.dtype)
    return out
