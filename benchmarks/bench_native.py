"""Native 4-bit weights (issue 28) on the embedded model: calm float32, calm native, calm native + lossless (and
calm float32 + lossless, the default before native weights), and llama.cpp through llama-cpp-python on the same
GGUF file with the same prompt tokens, greedy. Batch 1, one thread, every variant in this one process, round robin
per prompt after a warm-up each.

Workloads: "summaries" (--docs XSum test documents at their natural lengths, --summary-tokens new tokens) and
"decode-heavy" (CHAT_PROMPTS, short chat prompts, --chat-tokens new tokens). EOS is ignored (every variant makes
the same number of tokens); agreement with calm float32 is counted up to float32's first EOS.

Per workload and variant: prefill tokens/s, decode ms per token, whole-request seconds (medians over prompts),
token agreement with calm float32 (tokens up to the first difference; share of identical outputs). Peak resident
memory is measured per variant in a fresh process (--memory), since a process's peak only grows. The cost
section times every linear of one decode step alone (bytes read, GFLOP/s) against the whole step, the rest being
attention, norms and Python.

--store CHECKPOINT writes the fastest format into the checkpoint's config (calm.checkpoints.native.StoredWeights),
read by weights="auto": native only where its decode is at least MIN_GAIN faster and at least MIN_IDENTICAL of its
outputs equal float32's, token for token. llama-cpp-python is the optional `bench` extra; without it its rows are
skipped (one line).

Usage: python benchmarks/bench_native.py [--out benchmarks/results] [--store calm/assets/smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from calm import CalmModel
from calm.checkpoints.checkpoint import store_extra
from calm.checkpoints.loading import smollm2_gguf
from calm.checkpoints.native import WEIGHTS_KEY, StoredWeights, peak_rss_bytes, weight_bytes
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.engine.kernels import packed_linears
from calm.engine.quantized import QuantizedLinear
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl
from calm.prompts.templates import summary_prompt
from calm.speculative.loop import generate_speculative
from calm.speculative.lossless import resolve_mode

CHAT_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Give me five tips for learning to play the guitar.",
    "What are the main differences between cats and dogs as pets?",
    "Describe a perfect autumn day in the mountains.",
    "How do airplanes stay in the air?",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "What should I pack for a week-long hiking trip?",
)
MIN_GAIN = 1.05  # native must decode at least this much faster to be stored as fastest
MIN_IDENTICAL = 0.9  # and this share of its outputs must equal float32's (issue 28)
NATIVE_C = "calm native, compiled static step"  # compiled once, in the warm-up (one graph for every cache length)
F32, NATIVE, NATIVE_LL, F32_LL, LLAMA = (
    "calm float32",
    "calm native",
    "calm native + lossless",
    "calm float32 + lossless",
    "llama.cpp",
)


def calm_runner(model: CalmModel, lossless: bool, compiled: bool = False):
    """(prompt ids) -> (tokens, prefill s, decode s, compile s): the full model, or the lossless run `auto` picks;
    compiled: the static engine's step through torch.compile (the full model; compile s: its steps that compiled,
    apart from decode s)."""
    run = resolve_mode(model, "lossless") if lossless else None
    spec = run.spec if run is not None else None

    def go(ids: list[int], new_tokens: int):
        batch = PromptBatch(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
        engine = {"engine": "static", "compile": True} if compiled else {}
        config = GenerationConfig(
            max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.pad_token_id, **engine
        )
        if spec is None:
            result = generate_tokens(model.network, batch, ExitPolicy.never(), config)
        else:
            assert run is not None
            result = generate_speculative(model.network, batch, run.policy, config, spec)
        t = result.timings
        return result.token_ids[0], t.prefill_s, t.decode_s, t.compile_s

    if compiled:
        return go, "full model, never exits, static engine, its step through torch.compile (inductor)"
    return go, (run.description if run is not None else "full model, never exits")


def llama_runner(threads: int):
    """llama.cpp on the same GGUF (greedy: top_k=1, no repeat penalty), or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install calm[bench]): llama.cpp rows skipped"
    import llama_cpp

    llm = Llama(str(smollm2_gguf()), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def go(ids: list[int], new_tokens: int):
        tokens: list[int] = []
        t0 = time.perf_counter()
        first = 0.0
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(tok))
            if len(tokens) == 1:
                first = time.perf_counter() - t0
            if len(tokens) == new_tokens:
                break
        return tuple(tokens), first, time.perf_counter() - t0 - first, 0.0

    return go, f"llama-cpp-python {llama_cpp.__version__}, n_threads={threads}"


def agreement(tokens: tuple[int, ...], reference: tuple[int, ...], eos: tuple[int, ...]) -> tuple[int, int, bool]:
    """(tokens equal before the first difference, the reference's length up to its first EOS, identical)."""
    n = next((i + 1 for i, t in enumerate(reference) if t in eos), len(reference))
    same = next((i for i, (a, b) in enumerate(zip(tokens[:n], reference[:n])) if a != b), min(n, len(tokens)))
    return same, n, same == n


def run_workload(runners: dict, prompts: list[list[int]], new_tokens: int, eos: tuple[int, ...]) -> dict:
    """Each variant on each prompt, round robin (one short warm-up each first, where the compiled step compiles):
    per-prompt records."""
    warmup_s = {}
    for name, go in runners.items():
        t0 = time.perf_counter()
        go(prompts[0][:32], 4)
        warmup_s[name] = time.perf_counter() - t0
    records: dict[str, list[dict]] = {name: [] for name in runners}
    for i, ids in enumerate(prompts):
        for name, go in runners.items():
            t0 = time.perf_counter()
            tokens, prefill, decode, compile_s = go(ids, new_tokens)
            whole = time.perf_counter() - t0
            records[name].append(
                {
                    "prompt_tokens": len(ids),
                    "tokens": list(tokens),
                    "prefill_s": prefill,
                    "decode_s": decode,
                    "whole_s": whole,
                    "compile_s": compile_s,  # steps that compiled inside the timed run (0: no recompile)
                }
            )
            print(f"  prompt {i} ({len(ids)} tokens) {name}: whole {whole:.2f} s", file=sys.stderr, flush=True)
    reference = records[F32]
    rows = []
    for name, runs in records.items():
        agree = [agreement(tuple(r["tokens"]), tuple(ref["tokens"]), eos) for r, ref in zip(runs, reference)]
        rows.append(
            {
                "variant": name,
                "prefill_tokens_per_s": statistics.median(r["prompt_tokens"] / r["prefill_s"] for r in runs),
                "decode_ms_per_token": statistics.median(1e3 * r["decode_s"] / (new_tokens - 1) for r in runs),
                "whole_s": statistics.median(r["whole_s"] for r in runs),
                "whole_s_total": sum(r["whole_s"] for r in runs),
                "identical": sum(a[2] for a in agree) / len(agree),
                "agreeing_tokens": [a[0] for a in agree],
                "reference_tokens": [a[1] for a in agree],
            }
        )
    return {
        "new_tokens": new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "rows": rows,
        "runs": records,
        "warmup_s": warmup_s,
    }


def step_costs(model: CalmModel) -> dict:
    """One decode step's linears timed alone (1 row, as the engine calls them), their weight bytes and FLOPs."""
    linears = [m for m in model.model.modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
    total_s = 0.0
    flops = 0
    read = 0
    with torch.no_grad(), packed_linears(model.model):
        for m in linears:
            x = torch.randn(1, m.in_features)
            for _ in range(3):
                m(x)
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                m(x)
            total_s += (time.perf_counter() - t0) / reps
            flops += 2 * m.in_features * m.out_features
            read += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n in ("packed", "scales_zeros"))
            read += sum(p.numel() * p.element_size() for p in m.parameters())
    return {"linear_ms": 1e3 * total_s, "gflop": flops / 1e9, "gflops": flops / total_s / 1e9, "mb_read": read / 1e6}


def memory(weights: str) -> dict:
    """Load in `weights` and generate a few tokens in a fresh process: resident weight bytes and peak RSS."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = CalmModel.from_pretrained("smollm2", weights=weights)
    load_s = time.perf_counter() - t0
    peak_load = peak_rss_bytes()
    model.generate(["What is the capital of France?"], max_new_tokens=8, mode="calm")
    return {
        "weights": weights,
        "weights_mb": weight_bytes(model.model) / 1e6,
        "peak_load_mb": peak_load / 1e6,
        "peak_run_mb": peak_rss_bytes() / 1e6,
        "load_s": load_s,
    }


def memory_rows() -> list[dict]:
    rows = []
    for weights in ("float32", "native"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory", weights], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    f32 = CalmModel.from_pretrained(args.model, weights="float32")
    native = CalmModel.from_pretrained(args.model, weights="native")
    runners, described = {}, {}
    for name, model, lossless in (
        (F32, f32, False),
        (NATIVE, native, False),
        (NATIVE_LL, native, True),
        (F32_LL, f32, True),
    ):
        runners[name], described[name] = calm_runner(model, lossless)
    if args.compiled:  # the fastest native engine, opt-in for users (it compiles first)
        runners[NATIVE_C], described[NATIVE_C] = calm_runner(native, False, compiled=True)
    for name in args.skip:  # float32 stays: the reference of agreement
        runners.pop(name, None)
        described.pop(name, None)
    llama, described[LLAMA] = llama_runner(args.threads)
    if llama is not None:
        runners[LLAMA] = llama
    print(described[LLAMA], file=sys.stderr)
    docs = read_jsonl(args.data, limit=args.docs)
    summaries = [
        list(f32.encode_prompts(summary_prompt(d.document), args.summary_tokens).ids[0].tolist()) for d in docs
    ]
    chats = [list(f32.encode_prompts(p, args.chat_tokens).ids[0].tolist()) for p in CHAT_PROMPTS[: args.chats]]
    eos = f32.eos_token_ids
    t0 = time.perf_counter()
    inputs = {"summaries": (summaries, args.summary_tokens), "decode-heavy": (chats, args.chat_tokens)}
    workloads = {k: run_workload(runners, *inputs[k], eos) for k in args.workloads}
    with torch.no_grad():
        costs = {F32: step_costs(f32), NATIVE: step_costs(native)}
    if NATIVE_C in runners:
        costs[NATIVE_C] = costs[NATIVE]  # the same linears
    return {
        "benchmark": "native",
        "model": args.model,
        "gguf": smollm2_gguf().name,
        "variants": described,
        "llama_cpp": llama is not None,
        "machine": {**machine_info(None, " ".join(sys.argv)), "load_before": os.getloadavg()},
        "wall_s": time.perf_counter() - t0,
        "workloads": workloads,
        "step_costs": costs,
        "memory": memory_rows() if args.memory_rows else [],
    }


def _row(report: dict, workload: str, variant: str) -> dict | None:
    return next((r for r in report["workloads"][workload]["rows"] if r["variant"] == variant), None)


def fastest(report: dict) -> str:
    """native where it decodes at least MIN_GAIN faster than float32 and agrees on MIN_IDENTICAL of outputs."""
    keys = list(report["workloads"])
    gain = min(
        _row(report, k, F32)["decode_ms_per_token"] / _row(report, k, NATIVE)["decode_ms_per_token"] for k in keys
    )
    same = statistics.mean(_row(report, k, NATIVE)["identical"] for k in keys)
    return "native" if gain >= MIN_GAIN and same >= MIN_IDENTICAL else "float32"


def targets(report: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured, need, met) for issue 28's targets; None where llama.cpp did not run."""
    default = NATIVE_LL if fastest(report) == "native" else F32_LL
    out = []
    for k in report["workloads"]:
        f, n, ll, d = (_row(report, k, v) for v in (F32, NATIVE, LLAMA, default))
        ratio = f["decode_ms_per_token"] / n["decode_ms_per_token"]
        out.append((f"{k}: native decode vs float32 (×, ms per token)", ratio, "≥ 2.5×", ratio >= 2.5))
        vs = n["decode_ms_per_token"] / ll["decode_ms_per_token"] if ll else None
        out.append((f"{k}: native decode ms / llama.cpp's", vs, "≤ 1.3", None if vs is None else vs <= 1.3))
        whole = ll["whole_s_total"] / d["whole_s_total"] if ll and d else None
        need = 1.4 if k == "summaries" else 1.0
        out.append(
            (
                f"{k}: default ({default}) whole requests vs llama.cpp (×)",
                whole,
                f"≥ {need}×",
                None if whole is None else whole >= need,
            )
        )
        out.append((f"{k}: native outputs identical to float32", n["identical"], "≥ 90%", n["identical"] >= 0.9))
        out += _compiled_targets(report, k, f, ll)
    return out


def _compiled_targets(report: dict, k: str, f: dict, ll: dict | None) -> list[tuple]:
    """The two speed targets and agreement for the compiled static step on native weights, where it ran."""
    c = _row(report, k, NATIVE_C)
    if c is None:
        return []
    ratio = f["decode_ms_per_token"] / c["decode_ms_per_token"]
    vs = c["decode_ms_per_token"] / ll["decode_ms_per_token"] if ll else None
    return [
        (f"{k}: native, compiled: decode vs float32 (×, ms per token)", ratio, "≥ 2.5×", ratio >= 2.5),
        (f"{k}: native, compiled: decode ms / llama.cpp's", vs, "≤ 1.3", None if vs is None else vs <= 1.3),
        (f"{k}: native, compiled: outputs identical to float32", c["identical"], "≥ 90%", c["identical"] >= 0.9),
    ]


def _f(value: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _workload_lines(report: dict, name: str) -> list[str]:
    w = report["workloads"][name]
    p = w["prompt_tokens"]
    lines = [
        f"### {name}: {len(p)} prompts of {min(p)}–{max(p)} tokens, {w['new_tokens']} new tokens",
        "",
        "| variant | prefill tokens/s | decode ms/token | whole request (median s) | all requests (s) "
        "| identical to float32 | tokens before the first difference (of float32's) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in w["rows"]:
        agree = ", ".join(f"{a}/{n}" for a, n in zip(r["agreeing_tokens"], r["reference_tokens"]))
        lines.append(
            f"| {r['variant']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_ms_per_token']:.1f} | {r['whole_s']:.2f} "
            f"| {r['whole_s_total']:.1f} | {100 * r['identical']:.0f}% | {agree} |"
        )
    if NATIVE_C in w.get("warmup_s", {}):
        inside = sum(r["compile_s"] for r in w["runs"][NATIVE_C])
        lines += [
            "",
            f"{NATIVE_C}: its untimed warm-up (4 tokens) took {w['warmup_s'][NATIVE_C]:.1f} s, compiling included "
            f"where this process had not compiled yet; steps that compiled inside the timed runs: {inside:.1f} s.",
        ]
    return [*lines, ""]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Native 4-bit weights against float32 and llama.cpp (SmolLM2-135M, batch 1, one thread)",
        "",
        *machine_markdown(m),
        f"Load average before the run: {', '.join(f'{x:.2f}' for x in m['load_before'])} (2 cores shared with other "
        "jobs: compare ratios, not absolute times). Produced by `benchmarks/bench_native.py`; every variant in one "
        f"process, round robin per prompt after a warm-up each. GGUF file: `{report['gguf']}`.",
        "",
        "Variants:",
        "",
        *[f"- **{k}**: {v}" for k, v in report["variants"].items()],
        "",
    ]
    if not report["llama_cpp"]:
        lines += [f"{report['variants'][LLAMA]}.", ""]
    for name in report["workloads"]:
        lines += _workload_lines(report, name)
    lines += ["## Targets (issue 28)", "", "| target | measured | needed | met |", "|---|---:|---:|---|"]
    for target, value, need, met in targets(report):
        shown = _f(100 * value, ".0f", "%") if "identical" in target else _f(value, ".2f", "×" if "×" in target else "")
        lines.append(f"| {target} | {shown} | {need} | {'–' if met is None else 'yes' if met else '**no**'} |")
    lines += ["", "## What one decode step costs", "", _cost_table(report), "", *_memory_lines(report)]
    verdict = "stored in the checkpoint" if report.get("stored") else "what --store would store (not stored)"
    lines += [
        f"The format `auto` runs, {verdict}: **{fastest(report)}** (native needs ≥ {MIN_GAIN}× float32's decode "
        f"and ≥ {100 * MIN_IDENTICAL:.0f}% of outputs identical to float32's).",
        "",
    ]
    return "\n".join(lines + report.get("notes", [])) + "\n"


def _memory_lines(report: dict) -> list[str]:
    if not report["memory"]:
        return []
    lines = [
        "## Memory",
        "",
        "Each in a fresh process: load `smollm2`, generate 8 tokens. Resident weights: parameters and buffers, each "
        "storage once. Peak: the process's peak resident set (Python, torch and transformers included).",
        "",
        "| weights | resident weights (MB) | peak while loading (MB) | peak after generating (MB) | load (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["memory"]:
        lines.append(
            f"| {r['weights']} | {r['weights_mb']:.0f} | {r['peak_load_mb']:.0f} | {r['peak_run_mb']:.0f} "
            f"| {r['load_s']:.1f} |"
        )
    return [*lines, ""]


def _cost_table(report: dict) -> str:
    rows = [
        "| weights | linears alone (ms/step) | GFLOP/step | GFLOP/s | MB read/step | GB/s "
        "| decode step (ms, first workload) | rest: attention, norms, Python (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in report["step_costs"].items():
        step = _row(report, next(iter(report["workloads"])), name)["decode_ms_per_token"]
        rows.append(
            f"| {name} | {c['linear_ms']:.1f} | {c['gflop']:.2f} | {c['gflops']:.1f} | {c['mb_read']:.0f} "
            f"| {c['mb_read'] / c['linear_ms']:.1f} | {step:.1f} | {step - c['linear_ms']:.1f} |"
        )
    return "\n".join(rows)


def store(report: dict, checkpoint: str, report_file: str) -> dict:
    ms = {
        w: statistics.median(_row(report, k, v)["decode_ms_per_token"] for k in report["workloads"])
        for w, v in (("float32", F32), ("native", NATIVE))
    }
    stored = StoredWeights(fastest(report), ms, report_file, report["machine"]["cpu"])
    store_extra(checkpoint, WEIGHTS_KEY, {"cpu": stored.to_dict()})
    return stored.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--chat-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="native_smollm2")
    parser.add_argument("--store", default=None, help="checkpoint whose config gets the fastest format")
    parser.add_argument("--from-json", default=None, help="rewrite the Markdown (and --store) from a report's JSON")
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-compiled", dest="compiled", action="store_false", help=f"leave out '{NATIVE_C}'")
    parser.add_argument("--workloads", nargs="+", default=["summaries", "decode-heavy"])
    parser.add_argument("--skip", nargs="*", default=[], choices=[NATIVE_LL, F32_LL], help="variants left out")
    parser.add_argument("--no-memory", dest="memory_rows", action="store_false", help="skip the memory processes")
    parser.add_argument(
        "--notes", default=None, help="a Markdown file of analysis appended to the report (kept in its JSON)"
    )
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(memory(args.memory)))
        return
    report = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    if args.notes:
        report["notes"] = ["", *Path(args.notes).read_text(encoding="utf-8").splitlines()]
    report_file = f"{args.out}/{args.name}.md"
    if args.store:
        report["stored"] = store(report, args.store, report_file)
    for path in write_json_markdown(args.out, args.name, report, markdown(report)):
        print(path)


if __name__ == "__main__":
    main()
