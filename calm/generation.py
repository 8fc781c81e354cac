"""The generation loop: prefill, then decode steps until every row stops. It owns stopping,
timing and bookkeeping; each step is a function of explicit state (calm.decode)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from calm.decode import DecodeState, ExitPlan, Network, decode_one_token, prefill
from calm.kv_cache import KVCache
from calm.policy import ExitPolicy
from calm.sampling import SamplingConfig


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts. For encoder-decoders, ids/mask are the encoder input."""

    ids: torch.Tensor    # [B, T] long
    mask: torch.Tensor   # [B, T] bool, False on padding


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    sampling: SamplingConfig = SamplingConfig()


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one generate call. Prefill runs the prompt (and the encoder) and picks every
    row's first token; decode makes the rest, where early exit saves its layers."""

    prefill_s: float
    decode_s: float
    new_tokens: int          # tokens generated over all rows
    decode_tokens: int       # of those, the ones after each row's first (made by decode steps)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """All generated tokens over prefill + decode time."""
        return self.new_tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over decode time: the rate early exit changes."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "new_tokens": self.new_tokens,
                "decode_tokens": self.decode_tokens, "tokens_per_s": self.tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[tuple[int, ...], ...]     # per row, generated tokens up to and including EOS
    exit_layers: tuple[tuple[int, ...], ...]   # per row, per generated token, 1..num_layers
    num_layers: int
    timings: Timings
    texts: tuple[str, ...] = ()

    @property
    def avg_layers(self) -> float:
        """Mean layers used per generated token, over all rows."""
        flat = [k for row in self.exit_layers for k in row]
        return sum(flat) / len(flat) if flat else float("nan")

    @property
    def row_avg_layers(self) -> tuple[float, ...]:
        return tuple(sum(r) / len(r) if r else float("nan") for r in self.exit_layers)

    def to_dict(self) -> dict:
        return {
            "texts": list(self.texts), "token_ids": [list(r) for r in self.token_ids],
            "exit_layers": [list(r) for r in self.exit_layers], "num_layers": self.num_layers,
            "avg_layers": self.avg_layers, "timings": self.timings.to_dict(),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_tokens(net: Network, prompts: PromptBatch, policy: ExitPolicy, config: GenerationConfig) -> GenerationResult:
    a = net.adapter
    plan = ExitPlan.resolve(policy, net)
    device = prompts.ids.device
    generator = config.sampling.generator(device)
    t0 = time.perf_counter()
    state, first_ids = _start(net, prompts, config.max_new_tokens)
    batch = first_ids.shape[0]
    all_rows = torch.arange(batch, device=device)
    tokens_out = torch.full((batch, config.max_new_tokens), config.pad_token_id, dtype=torch.long, device=device)
    exits_out = torch.zeros((batch, config.max_new_tokens), dtype=torch.long, device=device)
    eos = torch.tensor(config.eos_token_ids or (-1,), device=device)
    tokens = prefill(net, first_ids, state).tokens(net, all_rows, config.sampling, generator)
    tokens_out[:, 0], exits_out[:, 0] = tokens, a.num_layers
    finished = torch.isin(tokens, eos)
    _sync(device)
    t1 = time.perf_counter()
    steps = 1
    while steps < config.max_new_tokens:
        rows = (~finished).nonzero()[:, 0]
        if rows.numel() == 0:
            break
        threshold = policy.threshold_at(steps, config.max_new_tokens)
        out = decode_one_token(net, plan, tokens, state, threshold, rows)
        tokens = torch.where(finished, config.pad_token_id, out.tokens(net, rows, config.sampling, generator))
        tokens_out[:, steps] = tokens
        exits_out[:, steps] = torch.where(finished, 0, out.exit_layers)
        finished = finished | torch.isin(tokens, eos)
        steps += 1
    _sync(device)
    t2 = time.perf_counter()
    token_ids, exit_layers = _trim(tokens_out[:, :steps].tolist(), exits_out[:, :steps].tolist(), set(config.eos_token_ids))
    timings = Timings(prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=sum(len(r) for r in token_ids),
                      decode_tokens=sum(max(len(r) - 1, 0) for r in token_ids))
    return GenerationResult(token_ids=token_ids, exit_layers=exit_layers, num_layers=a.num_layers, timings=timings)


def _start(net: Network, prompts: PromptBatch, max_new_tokens: int) -> tuple[DecodeState, torch.Tensor]:
    """The empty decode state and the ids the decoder's prefill reads."""
    a = net.adapter
    encoder = None
    if a.is_encoder_decoder:
        encoder = a.encode(prompts.ids, prompts.mask)
        first_ids = a.decoder_start_ids(prompts.ids.shape[0])
        first_mask = torch.ones_like(first_ids, dtype=torch.bool)
    else:
        first_ids, first_mask = prompts.ids, prompts.mask
    batch, t = first_ids.shape
    cache = KVCache.allocate(a.num_layers, batch, a.num_kv_heads, t + max_new_tokens, a.head_dim, a.dtype, a.device)
    cache.key_mask[:, :t] = first_mask
    positions = torch.zeros(batch, dtype=torch.long, device=first_ids.device)
    state = DecodeState(cache=cache, positions=positions, first_slots=tuple(cache.first_slots()), encoder=encoder)
    return state, first_ids


def _trim(tokens: list[list[int]], exits: list[list[int]], eos: set[int]) -> tuple[tuple, tuple]:
    """Cut each row after its first EOS."""
    out_tokens, out_exits = [], []
    for row_tokens, row_exits in zip(tokens, exits):
        end = next((i + 1 for i, t in enumerate(row_tokens) if t in eos), len(row_tokens))
        out_tokens.append(tuple(row_tokens[:end]))
        out_exits.append(tuple(row_exits[:end]))
    return tuple(out_tokens), tuple(out_exits)
