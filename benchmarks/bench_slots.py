"""Two costs of a continuous batch's slots, on the embedded model (CPU time, one thread, interleaved repeats):

1. attention with every one of 8 slots running, rows of 100-1,100 tokens: one batched call over the shared
   columns (padding included: calm.engine.decode.per_row_attention's rule) against one call per row;
2. a lossless speculative cycle with one live row, in a 1-slot and in an 8-slot batch (free slots should cost
   nothing: a continuous batch computes for its live rows only), and with two live rows in an 8-slot batch.

Usage: python benchmarks/bench_slots.py [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

import calm
import calm.engine.decode as decode
from calm import CalmModel
from calm.engine.scheduler import Request, Scheduler
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.eval.summarize import document_prompts
from calm.prompts.documents import read_jsonl
from calm.speculative.cycle import LosslessDrafter, lossless_drafter

DATA = "../shared/data/xsum/test.jsonl"


def prompt_ids(model: CalmModel, first: int, count: int, max_doc_tokens: int | None) -> list[list[int]]:
    records = read_jsonl(DATA, limit=first + count)[first:]
    prompts = document_prompts(model, records, 32, max_doc_tokens=max_doc_tokens)
    return [model.encode_prompts([p.text], 32).ids[0].tolist() for p in prompts]


@torch.inference_mode()  # _admit is called directly (Scheduler.step runs in inference mode itself)
def attention_step(model: CalmModel, ids: list[list[int]], one_by_one: bool) -> tuple[float, int, int]:
    """CPU seconds per decode step with all 8 slots running (up to 24 steps), attended and real keys."""
    rule = decode.per_row_attention
    if one_by_one:
        decode.per_row_attention = lambda state, live: not state.holes and live <= decode.PER_ROW_MAX_ROWS
    try:
        s = Scheduler(model.network, max_batch=8)
        for i in ids:
            s.add(Request(tuple(i), 32))
        s._admit()  # the prefills, outside the timing
        start, steps = time.process_time(), 0
        while s.live_rows == 8 and steps < 24:
            s.step()
            steps += 1
        return (time.process_time() - start) / steps, s.stats.attended_keys, s.stats.real_keys
    finally:
        decode.per_row_attention = rule


@torch.inference_mode()
def cycle_cost(model: CalmModel, requests: list[list[int]], slots: int) -> float:
    """CPU seconds per speculative cycle of the requests (one or two) in a batch of `slots`: the server's drafter
    without its goodput gate, so every step is a cycle (the gate would hand some back as plain steps)."""
    served = lossless_drafter(model, slots)
    assert served is not None, "the checkpoint's stored measurement gives the server no drafter"
    ungated = replace(served.spec, goodput=False)
    drafter = LosslessDrafter(model.network, ungated, served.policy, slots, served.most_rows)
    s = Scheduler(model.network, max_batch=slots, eos_token_ids=model.eos_token_ids, drafter=drafter)
    for ids in requests:
        s.add(Request(tuple(ids), 32))
    s._admit()
    start = time.process_time()
    while s.busy:
        s.step()
    return (time.process_time() - start) / max(1, s.stats.speculative_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    calm.set_threads(1)
    model = CalmModel.from_pretrained("smollm2")
    eight = prompt_ids(model, 8, 8, None)
    short = prompt_ids(model, 0, args.repeats, 256)
    attention: dict[str, list] = {"batched": [], "one by one": []}
    cycles: dict[str, list] = {"1 slot": [], "8 slots": [], "8 slots, 2 requests": []}
    load = os.getloadavg()[0]
    for rep in range(args.repeats):
        for name in attention:
            attention[name].append(attention_step(model, eight, name == "one by one"))
        for name, slots in (("1 slot", 1), ("8 slots", 8)):
            cycles[name].append(cycle_cost(model, [short[rep]], slots))
        cycles["8 slots, 2 requests"].append(cycle_cost(model, [short[rep], short[(rep + 1) % len(short)]], 8))
        print(f"repeat {rep + 1} done", file=sys.stderr, flush=True)
    report = {
        "machine": machine_info(command=" ".join(["python", *sys.argv])),
        "load_before_after": [load, os.getloadavg()[0]],
        "attention_s_per_step": {k: statistics.median(r[0] for r in v) for k, v in attention.items()},
        "attended_over_real_keys": attention["batched"][0][1] / attention["batched"][0][2],
        "cycle_s": {k: statistics.median(v) for k, v in cycles.items()},
    }
    write_json_markdown(args.out, "slots_smollm2", report, markdown(report))


def markdown(r: dict) -> str:
    a, k, c = r["attention_s_per_step"], r["attended_over_real_keys"], r["cycle_s"]
    k = k["batched"] if isinstance(k, dict) else k
    lines = ["# A continuous batch's slots: attention over padding, and free slots in a drafting cycle", ""]
    lines += machine_markdown(r["machine"])
    lines += [
        f"Load average {r['load_before_after'][0]:.1f} → {r['load_before_after'][1]:.1f}; medians of the repeats, "
        "CPU seconds of this process.",
        "",
        "| 8 slots running (XSum test documents 9-16, 100-1,100 tokens) | s per decode step | keys read / real keys |",
        "|---|---|---|",
        f"| one batched call over the shared columns | {a['batched']:.3f} | {k:.2f} |",
        f"| one call per row over its own slots | {a['one by one']:.3f} | 1.00 (its own slots only) |",
        "",
        "| one request alone (documents cut to 256 tokens, 32 tokens, lossless) | s per speculative cycle |",
        "|---|---|",
        f"| in a 1-slot batch | {c['1 slot']:.3f} |",
        f"| in an 8-slot batch | {c['8 slots']:.3f} ({c['8 slots'] / c['1 slot']:.2f}×) |",
    ]
    if "8 slots, 2 requests" in c:
        two = c["8 slots, 2 requests"]
        lines.append(f"| two requests in an 8-slot batch (both rows) | {two:.3f} ({two / c['1 slot']:.2f}×) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
