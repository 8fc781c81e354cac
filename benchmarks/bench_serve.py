"""calm serve under load (issue 27): Poisson arrivals at several rates against the embedded model, CPU.

Requests: XSum test documents in the summary prompt (calm.eval.summarize.document_prompts, documents cut to
--max-doc-tokens), sent to /v1/chat/completions (the chat template) with max_tokens --new-tokens, greedy,
streamed (stream_options.include_usage) by the real `openai` async client. Arrival times are a Poisson
process (seeded) at each rate; every way of serving gets the same arrival times. Three ways:
  - continuous: calm serve with continuous batching, --max-batch 8 (requests join and leave the batch);
  - one-at-a-time: the same server with --max-batch 1 (what llama-cpp-python's server does);
  - static: the --max-batch 8 server, but the client emulates static batching: the requests go in groups
    of 8 in arrival order; a group is sent when its last request has arrived and the previous group has
    finished, and all 8 run to the end before the next group starts.
Each server runs in a process of its own (one torch thread); the client times from each request's
scheduled arrival: TTFT to its first text, end-to-end to its last chunk. Rates are given as multiples of
one request's measured solo rate (1 / its time alone) unless --rates says req/s. Ways run interleaved per
rate, after a warm-up of each server.

Usage: python benchmarks/bench_serve.py [--requests 64] [--rates-x 0.3,1,4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "xsum" / "test.jsonl"
WAYS = ("continuous", "one-at-a-time", "static")
STATIC_GROUP = 8


@dataclass
class Outcome:
    """One request under load: times in seconds from its scheduled arrival."""

    index: int
    arrival: float  # scheduled, from the start of the run
    ttft: float = float("nan")
    latency: float = float("nan")
    tokens: int = 0
    ok: bool = False
    error: str | None = None


def serve_process(max_batch: int, port: int, model: str) -> subprocess.Popen:
    code = (
        "import calm, sys\nfrom calm import CalmModel\nfrom calm.serving import Server, ServeConfig\n"
        "calm.set_threads(1)\n"
        f"Server(CalmModel.from_pretrained({model!r}), ServeConfig(port={port}, max_batch={max_batch}, "
        f"max_queue=256, model_name='bench')).run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def server_stats(port: int) -> dict:
    """The server's scheduler counters (/health): what its engine spent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        health = json.loads(r.read())
    return {**health["scheduler"], "cache_columns": health["cache_columns"]}


def stats_delta(before: dict, after: dict) -> dict:
    delta = {k: after[k] - before[k] for k in after if k not in ("mean_live_rows", "cache_columns")}
    steps = delta["decode_steps"] + delta["speculative_steps"]
    delta["mean_live_rows"] = delta["slot_steps"] / steps if steps else 0.0
    delta["s_per_step"] = delta["decode_s"] / steps if steps else float("nan")
    delta["cache_columns_after"] = after["cache_columns"]
    return delta


def wait_healthy(port: int, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server on port {port} did not come up")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_request(client, prompt: str, new_tokens: int, outcome: Outcome, start: float) -> None:
    """Stream one chat completion; fill `outcome` (times from the scheduled arrival)."""
    arrival = start + outcome.arrival
    try:
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content and outcome.ttft != outcome.ttft:
                outcome.ttft = now - arrival
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
        outcome.latency = time.perf_counter() - arrival
        outcome.ok = outcome.tokens > 0
    except Exception as exc:  # a failed request is counted, never hidden
        outcome.error = f"{type(exc).__name__}: {exc}"


async def run_way(port: int, prompts: list[str], arrivals: list[float], new_tokens: int, static: bool) -> list[Outcome]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    outcomes = [Outcome(i, a) for i, a in enumerate(arrivals)]
    start = time.perf_counter()

    async def at_arrival(i: int) -> None:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        await one_request(client, prompts[i], new_tokens, outcomes[i], start)

    if not static:
        await asyncio.gather(*(at_arrival(i) for i in range(len(prompts))))
    else:
        for first in range(0, len(prompts), STATIC_GROUP):
            group = range(first, min(first + STATIC_GROUP, len(prompts)))
            await asyncio.sleep(max(0.0, start + arrivals[group[-1]] - time.perf_counter()))
            await asyncio.gather(*(one_request(client, prompts[i], new_tokens, outcomes[i], start) for i in group))
    await client.close()
    return outcomes


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(outcomes: list[Outcome]) -> dict:
    done = [o for o in outcomes if o.ok]
    span = max((o.arrival + o.latency for o in done), default=float("nan")) - min(o.arrival for o in outcomes)
    return {
        "requests": len(outcomes),
        "failed": len(outcomes) - len(done),
        "span_s": span,
        "requests_per_s": len(done) / span,
        "output_tokens_per_s": sum(o.tokens for o in done) / span,
        "output_tokens": sum(o.tokens for o in done),
        "ttft_p50_s": percentile([o.ttft for o in done], 0.5),
        "ttft_p99_s": percentile([o.ttft for o in done], 0.99),
        "latency_p50_s": percentile([o.latency for o in done], 0.5),
        "latency_p99_s": percentile([o.latency for o in done], 0.99),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


def poisson(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def load_prompts(model_name: str, n: int, new_tokens: int, max_doc_tokens: int) -> list[str]:
    from calm import CalmModel
    from calm.eval.summarize import document_prompts
    from calm.prompts.documents import read_jsonl

    model = CalmModel.from_pretrained(model_name)
    records = read_jsonl(DATA, limit=n)
    return [p.text for p in document_prompts(model, records, new_tokens, max_doc_tokens=max_doc_tokens)]


def solo_time(port: int, prompt: str, new_tokens: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        outcome = asyncio.run(run_way(port, [prompt], [0.0], new_tokens, static=False))[0]
        if not outcome.ok:
            raise RuntimeError(f"the solo request failed: {outcome.error}")
        times.append(outcome.latency)
    return statistics.median(times)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def markdown(report: dict) -> str:
    from calm.eval.reporting import machine_markdown

    lines = [
        "# calm serve under load (SmolLM2-135M, CPU)",
        "",
        *machine_markdown(report["machine"]),
        f"Load before: `{report['uptime_before']}`; after: `{report['uptime_after']}` (2 cores shared with other "
        "agents: absolute times are noisy, ratios within a rate less so).",
        *([f"Note: {report['note']}"] if report.get("note") else []),
        "",
        f"Requests per rate: {', '.join(str(r['requests']) for r in report['rates'])} (the first XSum test "
        f"documents), documents cut to {report['settings']['max_doc_tokens']} tokens in the summary prompt "
        f"(chat template), {report['settings']['new_tokens']} new tokens at most, greedy, streamed. One request "
        f"alone took {report['solo_s']:.2f} s (median of 3) on the max-batch-1 server. Static batching is a "
        "client-side emulation: groups of 8 in arrival order, each sent when its last request has arrived and the "
        "previous group has finished (the last group may be smaller), to the max-batch-8 server. TTFT and latency "
        "count from each request's scheduled arrival, so they include the client-side wait of static batching.",
        "",
        "| rate (req/s) | way | req/s | output tok/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in report["rates"]:
        for way in WAYS:
            r = rate["ways"][way]
            lines.append(
                f"| {rate['rate']:.3f} | {way} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.2f} | "
                f"{r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s | {r['latency_p50_s']:.2f} s | "
                f"{r['latency_p99_s']:.2f} s | {r['failed']} |"
            )
    lines += [
        "",
        "## What the server's engine spent (its scheduler's counters over each run)",
        "",
        "The prefill is the same work in every way (each prompt alone, the same prompts), so its time per prompt token "
        "probes how fast the shared machine was during each run.",
        "",
        "| rate (req/s) | way | prefill s | prefill ms per prompt token | step s | steps | of them speculative | "
        "mean live rows | s per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in report["rates"]:
        for way in WAYS:
            e = rate["ways"][way]["server"]
            per_token = 1000 * e["prefill_s"] / e["prompt_tokens"]
            lines.append(
                f"| {rate['rate']:.3f} | {way} | {e['prefill_s']:.1f} | {per_token:.2f} | "
                f"{e['decode_s']:.1f} | "
                f"{e['decode_steps'] + e['speculative_steps']} | {e['speculative_steps']} | "
                f"{e['mean_live_rows']:.2f} | {e['s_per_step']:.3f} |"
            )
    lines += ["", "## Against the targets", ""] + [f"- {line}" for line in report["verdict"]]
    if report.get("analysis"):
        lines += ["", "## Why", ""] + [f"- {line}" for line in report["analysis"]]
    return "\n".join(lines) + "\n"


def verdict(rates: list[dict]) -> list[str]:
    sat, light = rates[-1]["ways"], rates[0]["ways"]
    gain = sat["continuous"]["output_tokens_per_s"] / sat["one-at-a-time"]["output_tokens_per_s"]
    p50 = light["continuous"]["latency_p50_s"] / light["one-at-a-time"]["latency_p50_s"]
    failed = sum(r["ways"][w]["failed"] for r in rates for w in WAYS)
    saturating = [
        f"saturating rate: continuous batching gives {gain:.2f}× the output tokens/s of one-at-a-time "
        f"(target >= 2×: {'met' if gain >= 2 else 'missed'}); static batches give "
        f"{sat['static']['output_tokens_per_s'] / sat['one-at-a-time']['output_tokens_per_s']:.2f}×"
    ]
    return (saturating if len(rates) > 1 else []) + [  # one rate measured: the light one
        f"light rate: continuous p50 latency is {p50:.2f}× one-at-a-time's "
        f"(target <= 1×: {'met' if p50 <= 1.0 else 'missed'})",
        f"failed requests: {failed} (target 0: {'met' if failed == 0 else 'missed'})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", default="64", help="requests per rate: one number, or one per rate")
    parser.add_argument("--rates-x", default="0.3,1,4", help="rates as multiples of 1 / (one request's time)")
    parser.add_argument("--rates", default=None, help="rates in req/s (instead of --rates-x)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--max-doc-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solo-only", action="store_true", help="measure one request's time and stop")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="serve_smollm2")
    parser.add_argument("--from-json", default=None, help="rewrite the Markdown of this report's JSON; time nothing")
    args = parser.parse_args()
    import calm
    from calm.eval.reporting import machine_info, write_json_markdown

    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["verdict"] = verdict(report["rates"])
        for path in write_json_markdown(args.out, Path(args.from_json).stem, report, markdown(report)):
            print(path)
        return

    calm.set_threads(1)
    before = uptime()
    counts = [int(n) for n in args.requests.split(",")]
    prompts = load_prompts(args.model, max(counts), args.new_tokens, args.max_doc_tokens)
    ports = {8: free_port(), 1: free_port()}
    servers = [serve_process(batch, port, args.model) for batch, port in ports.items()]
    try:
        for port in ports.values():
            wait_healthy(port)
            asyncio.run(run_way(port, prompts[:2], [0.0, 0.0], 8, static=False))  # warm-up
        solo = solo_time(ports[1], prompts[0], args.new_tokens)
        print(f"one request alone: {solo:.2f} s", flush=True)
        if args.solo_only:
            return
        if args.rates:
            rates = [float(r) for r in args.rates.split(",")]
        else:
            rates = [float(x) / solo for x in args.rates_x.split(",")]
        counts = counts * len(rates) if len(counts) == 1 else counts
        if len(counts) != len(rates):
            raise SystemExit(f"--requests gives {len(counts)} counts for {len(rates)} rates")
        results = []
        for k, rate in enumerate(rates):
            n = counts[k]
            arrivals = poisson(n, rate, args.seed + k)
            ways = {}
            for way in WAYS:
                port = ports[1] if way == "one-at-a-time" else ports[8]
                started, counters = time.perf_counter(), server_stats(port)
                outcomes = asyncio.run(run_way(port, prompts[:n], arrivals, args.new_tokens, way == "static"))
                ways[way] = {**summarize(outcomes), "server": stats_delta(counters, server_stats(port))}
                print(
                    f"rate {rate:.3f} {way}: {json.dumps(ways[way])} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            results.append({"rate": rate, "requests": n, "ways": ways})
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(60)
    settings = {
        "requests": counts,
        "new_tokens": args.new_tokens,
        "max_doc_tokens": args.max_doc_tokens,
        "seed": args.seed,
        "static_group": STATIC_GROUP,
    }
    command = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
    report = {
        "machine": machine_info(command=command),
        "uptime_before": before,
        "uptime_after": uptime(),
        "settings": settings,
        "solo_s": solo,
        "rates": results,
        "verdict": verdict(results),
    }
    for path in write_json_markdown(args.out, args.name, report, markdown(report)):
        print(path)


if __name__ == "__main__":
    main()
