"""The generation loop: prefill, then decode steps until every row stops. It owns stopping,
timing and bookkeeping; each step is a function of explicit state (calm.engine.decode)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from calm.engine.decode import DecodeState, ExitPlan, Network, decode_one_token, prefill
from calm.engine.kernels import check_kernels, packed_linears
from calm.engine.kv_cache import KVCache
from calm.engine.sampling import SamplingConfig
from calm.engine.static_decode import SLOT_MULTIPLE, StaticState, compiled_step, static_step, static_tokens
from calm.errors import InputError
from calm.exits.policy import ExitPolicy

ENGINES = ("auto", "dynamic", "static")
ENGINE_SPECS = (*ENGINES, "static+compile")  # what the command line takes

if TYPE_CHECKING:
    from calm.engine.speculative_stats import SpeculativeStats


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts. For encoder-decoders, ids/mask are the encoder input."""

    ids: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, T] bool, False on padding


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    sampling: SamplingConfig = SamplingConfig()
    engine: str = "auto"  # "dynamic", "static", or auto: dynamic on a CPU, static on a GPU (resolve_engine)
    compile: bool | str = False  # static engine: the step through torch.compile(fullgraph=True); a string
    # names the backend (True: inductor; "eager" checks capture without a compiler)
    sync_every: int = 8  # static engine: ask "have all rows finished?" every this many tokens
    kernels: str = "auto"  # dynamic engine and speculative decoding: CPU matmuls (calm.engine.kernels.KERNELS)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.compile and self.engine == "dynamic":
            raise InputError(
                "compile needs the static engine (engine='static' or 'auto'): the dynamic step "
                "branches on which rows exited, which no graph can capture"
            )
        check_kernels(self.kernels)
        if self.sync_every < 1:
            raise InputError(f"sync_every must be >= 1, got {self.sync_every}")


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one generate call. Prefill runs the prompt (and the encoder) and picks every
    row's first token; decode makes the rest, where early exit saves its layers."""

    prefill_s: float
    decode_s: float  # decode steps, without the ones that compiled (compile_s)
    new_tokens: int  # tokens generated over all rows
    decode_tokens: int  # of those, the ones after each row's first (made by decode steps)
    compile_s: float = 0.0  # engine static+compile: the decode steps that ran torch.compile, apart
    compile_tokens: int = 0  # the tokens those steps made

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.compile_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """All generated tokens over prefill + decode time."""
        return self.new_tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over decode time (compiling steps left out): the rate early exit changes."""
        tokens = self.decode_tokens - self.compile_tokens
        return tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "new_tokens": self.new_tokens,
            "decode_tokens": self.decode_tokens,
            "compile_s": self.compile_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[tuple[int, ...], ...]  # per row, generated tokens up to and including EOS
    exit_layers: tuple[tuple[int, ...], ...]  # per row, per generated token, 1..num_layers
    num_layers: int
    timings: Timings
    texts: tuple[str, ...] = ()
    speculative: SpeculativeStats | None = None  # mode="speculative": acceptance, draft and verify time
    decoding: str = ""  # what ran and why (CalmModel.generate): the full model, early exit, or speculative
    # per row, why it stopped, as OpenAI-style APIs say it: "stop" (it ended with EOS) or "length" (it hit
    # max_new_tokens, likely mid-sentence); set by CalmModel.generate, which knows the EOS ids
    finish_reasons: tuple[str, ...] = ()

    @property
    def avg_layers(self) -> float:
        """Mean layers used per generated token, over all rows."""
        flat = [k for row in self.exit_layers for k in row]
        return sum(flat) / len(flat) if flat else float("nan")

    @property
    def row_avg_layers(self) -> tuple[float, ...]:
        return tuple(sum(r) / len(r) if r else float("nan") for r in self.exit_layers)

    def to_dict(self) -> dict:
        spec = {"speculative": self.speculative.to_dict()} if self.speculative is not None else {}
        return {
            "texts": list(self.texts),
            "finish_reasons": list(self.finish_reasons),
            "token_ids": [list(r) for r in self.token_ids],
            "exit_layers": [list(r) for r in self.exit_layers],
            "num_layers": self.num_layers,
            "avg_layers": self.avg_layers,
            "timings": self.timings.to_dict(),
            "decoding": self.decoding,
            **spec,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_settings(spec: str) -> dict:
    """GenerationConfig's engine and compile for an engine spec: auto, dynamic, static or static+compile."""
    if spec not in ENGINE_SPECS:
        raise InputError(f"unknown engine {spec!r}; choose one of {', '.join(ENGINE_SPECS)}")
    engine, _, compiled = spec.partition("+")
    return {"engine": engine, "compile": bool(compiled)}


def resolve_engine(config: GenerationConfig, device: torch.device) -> str:
    """ "dynamic" or "static": auto is the dynamic step on a CPU (skipping the work of exited rows is
    the saving there) and the static one on a GPU (no host sync inside a step) or when compiling."""
    if config.engine == "auto":
        return "static" if device.type == "cuda" or config.compile else "dynamic"
    return config.engine


@torch.inference_mode()
def generate_tokens(
    net: Network, prompts: PromptBatch, policy: ExitPolicy, config: GenerationConfig
) -> GenerationResult:
    plan = ExitPlan.resolve(policy, net)
    device = prompts.ids.device
    decode = _decode_static if resolve_engine(config, device) == "static" else _decode_dynamic
    kernels = config.kernels if decode is _decode_dynamic else "torch"  # the static step compiles torch's
    t0 = time.perf_counter()
    with packed_linears(net.adapter.model, kernels):
        out = decode(net, plan, policy, prompts, config)
    _sync(device)
    t2 = time.perf_counter()
    token_ids, exit_layers = _trim(
        out.tokens[:, : out.steps].tolist(), out.exits[:, : out.steps].tolist(), set(config.eos_token_ids)
    )
    timings = Timings(
        prefill_s=out.prefill_end - t0,
        decode_s=t2 - out.prefill_end - out.compile_s,
        new_tokens=sum(len(r) for r in token_ids),
        decode_tokens=sum(max(len(r) - 1, 0) for r in token_ids),
        compile_s=out.compile_s,
        compile_tokens=out.compile_tokens,
    )
    return GenerationResult(token_ids=token_ids, exit_layers=exit_layers, num_layers=net.num_layers, timings=timings)


@dataclass(frozen=True)
class _Decoded:
    tokens: torch.Tensor  # [B, max_new_tokens] long, pad after a row finished
    exits: torch.Tensor  # [B, max_new_tokens] long, 0 after a row finished
    steps: int  # columns filled
    prefill_end: float  # perf_counter() once the first token was chosen
    compile_s: float = 0.0  # of the decode time, the steps that compiled a graph
    compile_tokens: int = 0


def _decode_dynamic(
    net: Network, plan: ExitPlan, policy: ExitPolicy, prompts: PromptBatch, config: GenerationConfig
) -> _Decoded:
    """The dynamic step: the host learns which rows exit at every allowed layer and skips their work."""
    a = net.adapter
    device = prompts.ids.device
    generator = config.sampling.generator(device)
    state, first_ids = _start(net, prompts, config.max_new_tokens)
    batch = first_ids.shape[0]
    all_rows = torch.arange(batch, device=device)
    tokens_out, exits_out, eos = _outputs(batch, config, device)
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
    return _Decoded(tokens_out, exits_out, steps, t1)


def _decode_static(
    net: Network, plan: ExitPlan, policy: ExitPolicy, prompts: PromptBatch, config: GenerationConfig
) -> _Decoded:
    """The static step (calm.engine.static_decode): no host sync inside a step; between steps one, every
    `sync_every` steps, asks whether all rows have finished, and drops the finished ones from the batch."""
    a = net.adapter
    device = prompts.ids.device
    generator = config.sampling.generator(device)
    state, first_ids = _start(net, prompts, config.max_new_tokens, slot_multiple=SLOT_MULTIPLE)
    batch = first_ids.shape[0]
    tokens_out, exits_out, eos = _outputs(batch, config, device)
    first = prefill(net, first_ids, state)
    tokens = static_tokens(net, net.head_input(first.hidden, first.exit_layers), config.sampling, generator)
    tokens_out[:, 0], exits_out[:, 0] = tokens, a.num_layers
    finished = torch.isin(tokens, eos)
    static = StaticState.after_prefill(state, compiled=bool(config.compile))
    thresholds = torch.tensor(
        [policy.threshold_at(t, config.max_new_tokens) for t in range(config.max_new_tokens)],
        dtype=torch.float32,
        device=device,
    )  # λ(t), one copy
    threshold = thresholds[0].clone()
    step = (
        static_step if not config.compile else compiled_step("inductor" if config.compile is True else config.compile)
    )
    rows = torch.arange(batch, device=device)  # output row of each row
    _sync(device)
    t1 = time.perf_counter()
    steps, compiling = 1, _CompileClock(bool(config.compile), device)
    while steps < config.max_new_tokens:
        threshold.copy_(thresholds[steps])
        with compiling.step(finished):
            head_input, exit_layers = step(net, plan, tokens, static, threshold)
        chosen = static_tokens(net, head_input, config.sampling, generator)
        tokens = torch.where(finished, config.pad_token_id, chosen)
        tokens_out[rows, steps] = tokens
        exits_out[rows, steps] = torch.where(finished, 0, exit_layers)
        finished = finished | torch.isin(tokens, eos)
        static.advance()
        steps += 1
        if steps % config.sync_every == 0 and steps < config.max_new_tokens:
            live = len(finished) - sum(finished.tolist())  # the one host sync
            if live == 0:
                break
            if live < len(finished):  # compaction
                keep = torch.argsort(finished.to(torch.uint8), stable=True)[:live]  # unfinished, in order
                static, tokens, finished, rows = static.select(keep), tokens[keep], finished[keep], rows[keep]
    return _Decoded(tokens_out, exits_out, steps, t1, compiling.seconds, compiling.tokens)


class _CompileClock:
    """The time and tokens of the static+compile steps in which torch.compile made a graph (the first step,
    and one per new batch shape), so that decode tokens/s counts decoding only."""

    def __init__(self, active: bool, device: torch.device):
        self.active, self.device, self.seconds, self.tokens = active, device, 0.0, 0

    @contextmanager
    def step(self, finished: torch.Tensor) -> Iterator[None]:
        if not self.active:
            yield
            return
        from torch._dynamo.utils import counters

        graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
        yield
        if counters["stats"]["unique_graphs"] != graphs:
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            self.tokens += int((~finished).sum())


def _outputs(
    batch: int, config: GenerationConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token and exit-layer buffers [B, max_new_tokens], and the EOS ids as a tensor."""
    tokens_out = torch.full((batch, config.max_new_tokens), config.pad_token_id, dtype=torch.long, device=device)
    exits_out = torch.zeros((batch, config.max_new_tokens), dtype=torch.long, device=device)
    return tokens_out, exits_out, torch.tensor(config.eos_token_ids or (-1,), device=device)


def _start(
    net: Network, prompts: PromptBatch, max_new_tokens: int, slot_multiple: int = 1
) -> tuple[DecodeState, torch.Tensor]:
    """The empty decode state and the ids the decoder's prefill reads; cache slots are rounded up to
    a multiple of slot_multiple."""
    a = net.adapter
    encoder = None
    if a.is_encoder_decoder:
        encoder = a.encode(prompts.ids, prompts.mask)
        first_ids = a.decoder_start_ids(prompts.ids.shape[0])
        first_mask = torch.ones_like(first_ids, dtype=torch.bool)
    else:
        first_ids, first_mask = prompts.ids, prompts.mask
    batch, t = first_ids.shape
    slots = -(-(t + max_new_tokens) // slot_multiple) * slot_multiple
    cache = KVCache.allocate(a.num_layers, batch, a.num_kv_heads, slots, a.head_dim, a.dtype, a.device)
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
