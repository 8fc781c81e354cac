"""Bulk jobs through the scheduler: many prompts in, their outputs back in input order, as soon as each run of
them is complete, with the timings of generate_tokens' results."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, GenerationResult, Timings, resolve_engine
from calm.engine.scheduler import Drafter, Finished, Request, Scheduler, SchedulerStats
from calm.errors import InputError
from calm.exits.policy import ExitPolicy


def in_order(scheduler: Scheduler, requests: Iterable[Request]) -> Iterator[list[Finished]]:
    """Bulk: every request through the scheduler; yields the outputs in input order, each run of them as soon
    as all before it have finished (a row that ends early waits for the rows before it, not for the batch)."""
    ids = [scheduler.add(r) for r in requests]
    done: dict[int, Finished] = {}
    at = 0
    while at < len(ids):
        for event in scheduler.step():
            if event.finish_reason is not None:
                done[event.request_id] = scheduler.finished(event.request_id)
        ready = []
        while at < len(ids) and ids[at] in done:
            ready.append(done.pop(ids[at]))
            at += 1
        if ready:
            yield ready


def result_of(rows: list[Finished], net: Network, timings: Timings, drafter: Drafter | None) -> GenerationResult:
    """The GenerationResult of finished rows, as generate_tokens gives it."""
    return GenerationResult(
        token_ids=tuple(r.token_ids for r in rows),
        exit_layers=tuple(r.exit_layers for r in rows),
        num_layers=net.num_layers,
        timings=timings,
        speculative=drafter.stats() if drafter is not None and drafter.stats().cycles else None,
    )


def timings_since(stats: SchedulerStats, before: SchedulerStats, rows: list[Finished]) -> Timings:
    """The scheduler's prefill and step time between two snapshots of its stats, over the rows given."""
    return Timings(
        prefill_s=stats.prefill_s - before.prefill_s,
        decode_s=stats.decode_s - before.decode_s,
        new_tokens=sum(len(r.token_ids) for r in rows),
        decode_tokens=sum(max(len(r.token_ids) - 1, 0) for r in rows),
    )


def runs_dynamic(config: GenerationConfig, device: torch.device) -> bool:
    """Whether the config runs the dynamic step, the one a continuous batch runs."""
    return resolve_engine(config, device) == "dynamic" and not config.compile


def check_engine(config: GenerationConfig, device: torch.device) -> None:
    if not runs_dynamic(config, device):
        raise InputError("continuous batching runs the dynamic engine; the static engine batches with generate_tokens")


@torch.inference_mode()
def generate_continuous(
    net: Network,
    prompts: list[list[int]],
    policy: ExitPolicy,
    config: GenerationConfig,
    max_batch: int,
    drafter: Drafter | None = None,
) -> GenerationResult:
    """Many prompts through one continuous batch of `max_batch` slots; the result in input order, as
    generate_tokens gives it (timings: the scheduler's prefill and step time)."""
    check_engine(config, net.adapter.device)
    scheduler = Scheduler(
        net, max_batch=max_batch, eos_token_ids=config.eos_token_ids, drafter=drafter, kernels=config.kernels
    )
    requests = [Request(tuple(p), config.max_new_tokens, policy, config.sampling) for p in prompts]
    rows = [row for ready in in_order(scheduler, requests) for row in ready]
    return result_of(rows, net, timings_since(scheduler.stats, SchedulerStats(), rows), drafter)
