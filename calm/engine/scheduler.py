"""Continuous batching: one scheduler decides which requests run at each step (as vLLM v1's does).

Up to `max_batch` requests decode together, each in its own slot of one cache (calm.engine.slots). A
request that arrives waits until a slot is free; then it is prefilled alone, at its own length, and joins
the batch at the next step. A request that ends (EOS, its budget, or cancel) frees its slot at once.
Each request has its own position, length, exit policy (threshold and decay schedule) and sampling
settings, and rows never influence each other: every request's tokens are those of its solo run.

A step is one of two kinds, decided from the live rows each time:
- calm's decode step (calm.engine.decode), each row at its own exit threshold (the full model for rows
  that never exit);
- a speculative cycle (a `Drafter`, given by the speculative floor), when every live row wants the full
  model's greedy output and the drafter says drafting pays for that many rows. A drafter whose goodput gate
  leaves every live row without drafts hands the cycle back, and the step is the full model's plain step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from calm.engine.decode import NO_EXITS, ExitPlan, Network, StepOutput, decode_one_token, per_row_attention
from calm.engine.kernels import check_kernels, packed_linears
from calm.engine.sampling import SamplingConfig
from calm.engine.slots import SlotBatch
from calm.engine.speculative_stats import SpeculativeStats
from calm.errors import InputError, PolicyError
from calm.exits.policy import ExitPolicy

GREEDY = SamplingConfig()
NEVER = ExitPolicy.never()
INITIAL_COLUMNS = 256  # cache columns allocated up front; the cache grows as prompts need (SlotBatch)


@dataclass(frozen=True)
class Request:
    """One prompt to complete: its token ids, budget, exit policy and sampling settings."""

    ids: tuple[int, ...]
    max_new_tokens: int
    policy: ExitPolicy = NEVER
    sampling: SamplingConfig = GREEDY

    def __post_init__(self) -> None:
        if len(self.ids) == 0:
            raise InputError("a request needs at least one prompt token")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def exact_greedy(self) -> bool:
        """It wants the full model's greedy tokens: the rows a speculative cycle may run."""
        return self.policy.never_exits and not self.sampling.do_sample


@dataclass(frozen=True)
class TokenEvent:
    """What one step made for one request: its new tokens, and why it ended (None: it goes on)."""

    request_id: int
    tokens: tuple[int, ...]
    exit_layers: tuple[int, ...]
    finish_reason: str | None = None  # "stop" (EOS), "length" (its budget) or "cancelled"
    drafted: int = 0  # drafts a speculative cycle verified for it (tokens - 1 of them were accepted)


@dataclass(frozen=True)
class Finished:
    """A request's whole output."""

    request_id: int
    token_ids: tuple[int, ...]
    exit_layers: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int


@dataclass
class SchedulerStats:
    """What the scheduler spent, over its life: prompt tokens computed against the real ones, and time."""

    prompt_tokens: int = 0  # real prompt tokens of admitted requests
    prefill_tokens: int = 0  # tokens prefill computed (no padding: equal to prompt_tokens)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    speculative_steps: int = 0
    new_tokens: int = 0
    slot_steps: int = 0  # sum over steps of the rows that ran (mean batch = slot_steps / steps)
    attended_keys: int = 0  # decode steps: keys each live row's query attended, padding and holes included
    real_keys: int = 0  # of those, the row's own tokens (its prompt and outputs so far)

    def to_dict(self) -> dict:
        steps = self.decode_steps + self.speculative_steps
        return {**self.__dict__, "mean_live_rows": self.slot_steps / steps if steps else 0.0}


class Drafter(Protocol):
    """A speculative cycle over a slot batch (calm.speculative.cycle): the full model's greedy tokens, several
    per row where drafts are accepted."""

    width: int  # cache columns a cycle may write

    def wants(self, live_rows: int) -> bool: ...

    def stats(self) -> SpeculativeStats: ...

    def joined(self, slot: int, prompt: list[int]) -> None: ...

    def cycle(
        self, net: Network, batch: SlotBatch, pending: torch.Tensor, outputs: list[list[int] | None], budgets: list[int]
    ) -> Cycle | None: ...  # None: no live row drafts this step; the scheduler runs the plain step and calls plain

    def plain(self, committed: list[int | None], cpu_s: float, wall_s: float) -> None: ...


@dataclass(frozen=True)
class Cycle:
    """What a speculative cycle committed per slot (empty for free slots): its accepted drafts and the full
    model's next token, and how many drafts it verified."""

    tokens: list[list[int]]
    drafted: list[int]


@dataclass
class _Row:
    request_id: int
    request: Request
    tokens: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    cached_prompt: int = 0  # the slots its prompt fills (an encoder-decoder's: the decoder's start tokens)

    @property
    def budget(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)


class Scheduler:
    """Requests in, token events out; `step()` runs one step of the batch. Not thread-safe: one thread
    (a bulk loop, or a server's engine thread) calls it."""

    def __init__(
        self,
        net: Network,
        *,
        max_batch: int = 8,
        eos_token_ids: tuple[int, ...] = (),
        drafter: Drafter | None = None,
        kernels: str = "auto",
    ) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        check_kernels(kernels)
        self.net, self.eos, self.drafter, self.kernels = net, frozenset(eos_token_ids), drafter, kernels
        self.batch = SlotBatch.allocate(net, max_batch, INITIAL_COLUMNS)
        self.rows: list[_Row | None] = [None] * max_batch
        self.pending = torch.zeros(max_batch, dtype=torch.long, device=net.adapter.device)
        self.waiting: deque[_Row] = deque()
        self.stats = SchedulerStats()
        self.plan: ExitPlan | None = None  # the exit measure and layers of the rows that may exit
        self._finished: dict[int, Finished] = {}
        self._next_id = 0

    # ---- requests ----------------------------------------------------------------------------
    def add(self, request: Request) -> int:
        """Queue a request; -> its id. Rows that may exit share one measure and set of exit layers."""
        self._check_plan(request.policy)
        row = _Row(self._next_id, request, generator=request.sampling.generator(self.net.adapter.device))
        self._next_id += 1
        self.waiting.append(row)
        return row.request_id

    def cancel(self, request_id: int) -> bool:
        """Drop a request, waiting or running: its slot is free for the next step. -> whether it was there."""
        for waiting in list(self.waiting):
            if waiting.request_id == request_id:
                self.waiting.remove(waiting)
                return True
        for slot, row in enumerate(self.rows):
            if row is not None and row.request_id == request_id:
                self._release(slot)
                return True
        return False

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    @property
    def live_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    def finished(self, request_id: int) -> Finished:
        """The whole output of a request that ended (once; it is forgotten after)."""
        return self._finished.pop(request_id)

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Bulk: every request through the batch; yields each as it finishes (not in input order)."""
        for request in requests:
            self.add(request)
        while self.busy:
            for event in self.step():
                if event.finish_reason is not None:
                    yield self.finished(event.request_id)

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests into free slots, then advance every live row by one step."""
        with packed_linears(self.net.adapter.model, self.kernels):
            events = self._admit()
            live = [slot for slot, row in enumerate(self.rows) if row is not None]
            if not live:
                return events
            start = time.perf_counter()
            drafts = self._drafts(live)
            self._count_keys(live, drafts)
            if drafts:
                events += self._speculative_step(live)
            else:
                events += self._decode_step(live)
            self.stats.decode_s += time.perf_counter() - start
            self.stats.slot_steps += len(live)
        return events

    def _count_keys(self, live: list[int], drafts: bool) -> None:
        """Attention's work in this step's first query per row: a row attends over its own slots where it attends
        alone (decode.per_row_attention), else over every column up to the write column."""
        end = self.batch.cache.length + 1
        alone = per_row_attention(self.batch.state, len(live)) and not drafts
        for slot in live:
            row = self._row(slot)
            self.stats.real_keys += row.cached_prompt + len(row.tokens)
            self.stats.attended_keys += end - self.batch.state.first_slots[slot] if alone else end

    def _admit(self) -> list[TokenEvent]:
        events = []
        for slot in self.batch.free_slots():
            if not self.waiting:
                break
            row = self.waiting.popleft()
            start = time.perf_counter()
            ids = list(row.request.ids)
            out, row.cached_prompt = self.batch.admit(self.net, slot, ids)
            self.rows[slot] = row
            if self.drafter is not None:
                self.drafter.joined(slot, ids)
            first = self._choose(out, {slot: 0})[slot]
            self.stats.prefill_s += time.perf_counter() - start
            self.stats.prompt_tokens += len(ids)
            self.stats.prefill_tokens += len(ids)
            events.append(self._append(slot, [first], [self.net.num_layers]))
        return events

    def _drafts(self, live: list[int]) -> bool:
        if self.drafter is None or not self.drafter.wants(len(live)):
            return False
        return all(self._row(s).request.exact_greedy for s in live)

    def _decode_step(self, live: list[int]) -> list[TokenEvent]:
        self.batch.make_room(1)
        rows = torch.tensor(live, device=self.pending.device)
        thresholds = torch.full((self.batch.slots,), math.inf)
        for slot in live:
            row = self._row(slot)
            policy = row.request.policy
            if not policy.never_exits:
                thresholds[slot] = policy.threshold_at(len(row.tokens), row.request.max_new_tokens)
        plan = self.plan or NO_EXITS
        out = decode_one_token(self.net, plan, self.pending, self.batch.state, thresholds, rows)
        self.stats.decode_steps += 1
        chosen = self._choose(out, {slot: slot for slot in live})
        exits = out.exit_layers.tolist()
        return [self._append(slot, [chosen[slot]], [exits[slot]]) for slot in live]

    def _speculative_step(self, live: list[int]) -> list[TokenEvent]:
        assert self.drafter is not None
        self.batch.make_room(self.drafter.width)
        outputs = [row.tokens if row is not None else None for row in self.rows]
        budgets = [row.budget if row is not None else 0 for row in self.rows]
        cycle = self.drafter.cycle(self.net, self.batch, self.pending, outputs, budgets)
        if cycle is None:
            return self._undrafted_step(live)
        self.stats.speculative_steps += 1
        full = self.net.num_layers
        return [
            self._append(slot, cycle.tokens[slot], [full] * len(cycle.tokens[slot]), cycle.drafted[slot])
            for slot in live
        ]

    def _undrafted_step(self, live: list[int]) -> list[TokenEvent]:
        """The full model's plain step where the drafter's goodput gate turned every live row's drafting off."""
        assert self.drafter is not None
        cpu, wall = time.process_time(), time.perf_counter()
        events = self._decode_step(live)
        committed: list[int | None] = [None] * len(self.rows)
        for slot, event in zip(live, events):
            committed[slot] = event.tokens[0]
        self.drafter.plain(committed, time.process_time() - cpu, time.perf_counter() - wall)
        return events

    def _choose(self, out: StepOutput, at: dict[int, int]) -> dict[int, int]:
        """The next token of each slot in `at` (slot -> its row in out), by the slot's own sampling settings:
        the greedy rows in one call, each sampling row alone with its own generator (as in its solo run)."""
        chosen: dict[int, int] = {}
        greedy = {s: i for s, i in at.items() if not self._row(s).request.sampling.do_sample}
        if greedy:
            picked = out.tokens(self.net, torch.tensor(list(greedy.values())), GREEDY, None).tolist()
            chosen.update({s: picked[i] for s, i in greedy.items()})
        for s, i in at.items():
            if s not in greedy:
                row = self._row(s)
                chosen[s] = int(out.tokens(self.net, torch.tensor([i]), row.request.sampling, row.generator)[i])
        return chosen

    def _row(self, slot: int) -> _Row:
        row = self.rows[slot]
        if row is None:
            raise RuntimeError(f"slot {slot} holds no request")
        return row

    def _append(self, slot: int, tokens: list[int], exits: list[int], drafted: int = 0) -> TokenEvent:
        """Commit a row's new tokens up to its first EOS and its budget; free its slot when it ends. drafted: the
        drafts a speculative cycle verified for it."""
        row = self._row(slot)
        kept, reason = [], None
        for token in tokens:
            if row.budget == 0:
                break
            kept.append(token)
            row.tokens.append(token)
            if token in self.eos:
                reason = "stop"
                break
        if reason is None and row.budget == 0:
            reason = "length"
        row.exits += exits[: len(kept)]
        self.stats.new_tokens += len(kept)
        if kept:
            self.pending[slot] = kept[-1]
        if reason is not None:
            self._finish(slot, reason)
        return TokenEvent(row.request_id, tuple(kept), tuple(exits[: len(kept)]), reason, drafted)

    def _finish(self, slot: int, reason: str) -> None:
        row = self._row(slot)
        self._finished[row.request_id] = Finished(
            row.request_id, tuple(row.tokens), tuple(row.exits), reason, len(row.request.ids)
        )
        self._release(slot)

    def _release(self, slot: int) -> None:
        self.rows[slot] = None
        self.batch.release(slot)
        if all(r is None or r.request.policy.never_exits for r in self.rows) and not self._exiting_waiting():
            self.plan = None

    def _exiting_waiting(self) -> bool:
        return any(not r.request.policy.never_exits for r in self.waiting)

    def _check_plan(self, policy: ExitPolicy) -> None:
        if policy.never_exits:
            return
        plan = ExitPlan.resolve(policy, self.net)
        if self.plan is not None and self.plan != plan:
            raise PolicyError(
                "rows of one batch that exit early share the exit measure and layers: this request asks for "
                f"{plan.measure} at layers {sorted(plan.allowed)}, the batch runs {self.plan.measure} at "
                f"{sorted(self.plan.allowed)}"
            )
        self.plan = plan
