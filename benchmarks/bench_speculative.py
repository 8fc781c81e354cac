"""Lossless speculative decoding (issue 13) on the embedded model with its shipped heads, CPU.

Batch 1 (each of --docs XSum test documents alone) and batch 8 (the first 8 as one batch), --new-tokens
per row (EOS ignored, as calm bench), documents cut to --max-doc-tokens. Compared, round robin per
document after one short warm-up each, median of --repeats:
  - never-exit calm (full depth) and transformers `generate`;
  - calm speculative at every draft layer E x max draft k x draft controller, and with drafts looked
    up in the context (E = 0, calm.speculative.lookup) at each of --context-drafts;
  - transformers `assistant_early_exit=E` (always drafts), and for E = 0 its prompt lookup
    (`prompt_lookup_num_tokens`, calm's best k): one timed run on the first --assistant-docs documents,
    at batch 1 only (transformers refuses assisted generation for batch > 1, recorded).
Every speculative run's tokens are checked against full depth's. tokens/s include the prefill.

With --store CHECKPOINT the best settings at batch 1 and at batch 8 and their measured speedups over full
depth go into the checkpoint's config, where `calm summarize --lossless` reads them (calm.speculative.lossless).
--from-json REPORT rewrites the Markdown (and --store) from a report's JSON without timing anything.

Usage: python benchmarks/bench_speculative.py [--model smollm2] [--out benchmarks/results] [--store calm/assets/smollm2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calm import CalmModel
from calm.bench import parse_run_spec
from calm.checkpoints.checkpoint import store_extra
from calm.engine.decode import forward_layers, prefill
from calm.engine.generation import GenerationConfig, PromptBatch, _start, generate_tokens
from calm.engine.kernels import only_slots, packed_linears
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl, summary_prompt, truncate_document
from calm.speculative.drafting import CONTEXT_DRAFT
from calm.speculative.loop import generate_speculative
from calm.speculative.lossless import LARGE_BATCH_KEY, STORE_KEY, MeasuredSetting
from calm.speculative.verification import slot_context

FULL, HF = "calm full", "transformers generate"
TORCH_KERNELS = "calm full, torch kernels"


@dataclass
class Config:
    """One engine setting, and what its timed runs gave."""

    name: str
    run: object  # (PromptBatch, new tokens) -> (tokens per row, SpeculativeStats | None)
    spec: str | None = None  # the calm.bench run spec of a speculative setting
    times: dict = field(default_factory=dict)  # batch key -> [wall seconds]
    cpu: dict = field(default_factory=dict)  # batch key -> [CPU seconds of this process]
    stats: dict = field(default_factory=dict)  # batch key -> [SpeculativeStats]
    split: dict = field(default_factory=dict)  # batch key -> [(prefill wall s, decode wall s)] (calm runs)
    tokens: dict = field(default_factory=dict)  # batch key -> tokens per row of the last run
    identical: bool = True  # tokens equal the reference's in every run


def calm_runner(model: CalmModel, spec: str | None, kernels: str = "auto"):
    policy, speculative = parse_run_spec(spec) if spec else (ExitPolicy.never(), None)

    def run(batch: PromptBatch, new_tokens: int):
        config = GenerationConfig(
            max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.pad_token_id, kernels=kernels
        )
        if speculative is None:
            result = generate_tokens(model.network, batch, policy, config)
        else:
            result = generate_speculative(model.network, batch, policy, config, speculative)
        return result.token_ids, result.speculative, (result.timings.prefill_s, result.timings.decode_s)

    return run


def hf_runner(model: CalmModel, **kwargs):
    """transformers generate, greedy; kwargs: its assisted-decoding switch (assistant_early_exit=E or
    prompt_lookup_num_tokens=K)."""

    def run(batch: PromptBatch, new_tokens: int):
        out = model.model.generate(
            input_ids=batch.ids,
            attention_mask=batch.mask.long(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.pad_token_id,
            eos_token_id=list(model.eos_token_ids) or None,
            **kwargs,
        )
        return tuple(tuple(r) for r in out[:, batch.ids.shape[1] :].tolist()), None, None

    return run


def _split(c: Config, keys: list[str]) -> tuple[float | None, float | None]:
    """Prefill and decode wall seconds (sums of per-batch medians) of a calm config; (None, None) for others."""
    if not all(k in c.split for k in keys):
        return None, None
    prefill = sum(statistics.median(p for p, _ in c.split[k]) for k in keys)
    decode = sum(statistics.median(d for _, d in c.split[k]) for k in keys)
    return prefill, decode


def timed(
    config: Config,
    key: str,
    batch: PromptBatch,
    new_tokens: int,
    reference: dict | None,
    prefix_only: tuple[int, ...] = (),
) -> None:
    """One timed run; its tokens are checked against reference[key] (with prefix_only = EOS ids: only
    up to the reference's first EOS, for transformers, which suppresses EOS to reach the length)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tokens, stats, split = config.run(batch, new_tokens)
    config.times.setdefault(key, []).append(time.perf_counter() - t0)
    config.cpu.setdefault(key, []).append(time.process_time() - c0)
    config.tokens[key] = tokens
    if split is not None:
        config.split.setdefault(key, []).append(split)
    if stats is not None:
        config.stats.setdefault(key, []).append(stats)
    if reference is not None:
        config.identical &= all(_agrees(a, b, prefix_only) for a, b in zip(tokens, reference[key]))


def _agrees(tokens: tuple[int, ...], reference: tuple[int, ...], eos: tuple[int, ...]) -> bool:
    """Equal, up to the reference's first EOS when eos is given."""
    n = next((i for i, t in enumerate(reference) if t in eos), len(reference))
    return tokens[:n] == reference[:n]


@torch.inference_mode()
def forward_cost(
    model: CalmModel,
    batch: PromptBatch,
    widths: tuple[int, ...] = (1, 2, 3, 4, 5, 7),
    reps: int = 12,
    kernels: str = "auto",
    drafting_rows: int | None = None,
) -> dict:
    """CPU seconds of one forward over all layers for T new positions after the prompt, median of `reps`
    interleaved runs, relative to T = 1: what verifying T slots costs against one decode step, on the
    matmuls `kernels` picks (calm.engine.kernels). drafting_rows: only the first that many rows verify T slots,
    the others their pending token alone (verification runs the matmuls on those slots only)."""
    with packed_linears(model.model, kernels):
        return _forward_cost(model, batch, widths, reps, drafting_rows)


def _forward_cost(
    model: CalmModel, batch: PromptBatch, widths: tuple[int, ...], reps: int, drafting_rows: int | None
) -> dict:
    net = model.network
    state, ids = _start(net, batch, max(widths))
    prefill(net, ids, state)
    start, cost, rows = state.cache.length, {}, batch.ids.shape[0]
    for _ in range(reps):
        for t in widths:
            keep = torch.ones(rows, t, dtype=torch.bool)
            if drafting_rows is not None:  # the other rows verify their pending token alone
                keep[drafting_rows:, 1:] = False
            state.cache.key_mask[:, start : start + t] = keep
            positions = state.positions[:, None] + torch.arange(t)
            ctx = slot_context(net, state, positions, start)
            h = torch.randn(rows, t, net.adapter.hidden_size)
            c0 = time.process_time()
            with only_slots(keep):
                forward_layers(net, h, range(net.num_layers), ctx, state.cache)
            cost.setdefault(t, []).append(time.process_time() - c0)
        h = torch.randn(batch.ids.shape[0], net.adapter.hidden_size)
        layer = torch.full((batch.ids.shape[0],), net.num_layers // 2)
        c0 = time.process_time()
        net.greedy_tokens(h, layer)
        cost.setdefault("head", []).append(time.process_time() - c0)
    one = statistics.median(cost[widths[0]])
    return {str(t): statistics.median(v) / one for t, v in cost.items()}


def round_robin(
    configs: list[Config], batches: dict[str, PromptBatch], new_tokens: int, repeats: int, eos: tuple[int, ...]
) -> None:
    """A 4-token warm-up of each config, then per batch `repeats` rounds over all of them in turn. The
    first config (full depth) gives each batch's reference tokens."""
    for c in configs:
        c.run(next(iter(batches.values())), 4)
    for key, batch in batches.items():
        for _ in range(repeats):
            for c in configs:
                reference = configs[0].tokens if c is not configs[0] else None
                timed(c, key, batch, new_tokens, reference, eos if c.name == HF else ())
        print(
            f"{key}: " + ", ".join(f"{c.name} {statistics.median(c.cpu[key]):.2f}s" for c in configs),
            file=sys.stderr,
            flush=True,
        )


def summary_rows(configs: list[Config], keys: list[str], batch_size: int, new_tokens: int) -> list[dict]:
    """Per config: tokens per CPU second and per wall second over the given batches (sums of per-batch
    medians), speedups (on CPU time), acceptance."""
    rows = []
    for c in configs:
        if not all(k in c.times for k in keys):
            continue
        seconds = sum(statistics.median(c.times[k]) for k in keys)
        cpu_seconds = sum(statistics.median(c.cpu[k]) for k in keys)
        stats = [c.stats[k][-1] for k in keys if k in c.stats]
        drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
        row_cycles = sum(s.row_cycles for s in stats)
        tokens = batch_size * new_tokens * len(keys)
        prefill, decode = _split(c, keys)
        rows.append(
            {
                "name": c.name,
                "spec": c.spec,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "cpu_seconds_per_batch": {k: statistics.median(c.cpu[k]) for k in keys},
                "tokens_per_s": tokens / seconds,
                "tokens_per_cpu_s": tokens / cpu_seconds,
                "prefill_share": prefill / (prefill + decode) if prefill is not None else None,
                "decode_tokens_per_cpu_s": (
                    batch_size * (new_tokens - 1) * len(keys) / (cpu_seconds * decode / (prefill + decode))
                    if prefill is not None
                    else None
                ),
                "identical": c.identical,
                "acceptance_rate": accepted / drafted if drafted else None,
                "mean_accepted_length": accepted / row_cycles if stats else None,
                "mean_draft_length": drafted / row_cycles if stats else None,
                "context_drafted": sum(s.context_drafted for s in stats) if stats else None,
                "context_accepted": sum(s.context_accepted for s in stats) if stats else None,
                "draft_s": sum(s.draft_s for s in stats) if stats else None,
                "verify_s": sum(s.verify_s for s in stats) if stats else None,
            }
        )
    full = next(r for r in rows if r["name"] == FULL)
    hf = next((r for r in rows if r["name"] == HF), None)
    for r in rows:
        r["vs_full"] = r["tokens_per_cpu_s"] / full["tokens_per_cpu_s"]
        r["decode_vs_full"] = (
            r["decode_tokens_per_cpu_s"] / full["decode_tokens_per_cpu_s"] if r["decode_tokens_per_cpu_s"] else None
        )
        r["vs_full_wall"] = r["tokens_per_s"] / full["tokens_per_s"]
        r["vs_transformers"] = r["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"] if hf else None
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = CalmModel.from_pretrained(args.model)
    docs = read_jsonl(args.data, limit=max(args.docs, 8))
    prompts = [summary_prompt(truncate_document(model.tokenizer, d.document, args.max_doc_tokens)) for d in docs]
    single = {f"doc{i}": model.encode_prompts(prompts[i], args.new_tokens) for i in range(args.docs)}
    specs = [
        f"spec:{e}:{k}" + (f":{c}" if c != "always" else "")
        for e in args.draft_layers
        for k in args.max_drafts
        for c in args.controllers
    ]
    if args.context_drafts:  # E = 0: no controller, a lookup drafts whatever it finds
        specs = [f"spec:{CONTEXT_DRAFT}:{k}" for k in args.context_drafts] + specs
    specs += args.specs
    configs = [Config(FULL, calm_runner(model, None)), Config(HF, hf_runner(model))]
    if args.torch_kernels:  # the engine before calm.engine.kernels: torch's (MKL) matmuls
        configs.append(Config(TORCH_KERNELS, calm_runner(model, None, kernels="torch")))
    configs += [Config(f"speculative {s[5:]}", calm_runner(model, s), spec=s) for s in specs]
    eos = model.eos_token_ids
    t0 = time.perf_counter()
    round_robin(configs, single, args.new_tokens, args.repeats, eos)
    batch1 = summary_rows(configs, list(single), 1, args.new_tokens)
    batch8 = []
    eight = {"batch8": model.encode_prompts(prompts[:8], args.new_tokens)} if args.batch8 else {}
    if eight:
        round_robin(configs, eight, args.new_tokens, args.repeats, eos)
        batch8 = summary_rows(configs, ["batch8"], 8, args.new_tokens)
    assistant = assistant_rows(model, args, single, configs)
    forward = forward_cost(model, next(iter(single.values())))
    forward_torch = forward_cost(model, next(iter(single.values())), kernels="torch")
    forward8 = forward_cost(model, eight["batch8"], (1, 2, 3, 4), reps=6) if eight else {}
    half8 = forward_cost(model, eight["batch8"], (1, 2, 3, 4), reps=6, drafting_rows=4) if eight else {}
    return {
        "benchmark": "speculative",
        "model": args.model,
        "num_layers": model.num_layers,
        "new_tokens": args.new_tokens,
        "docs": args.docs,
        "max_doc_tokens": args.max_doc_tokens,
        "repeats": args.repeats,
        "controllers": args.controllers,
        "machine": machine_info(model.device, " ".join(sys.argv)),
        "wall_s": time.perf_counter() - t0,
        "prompt_tokens": [int(b.mask.sum()) for b in single.values()],
        "batch1": batch1,
        "batch8": batch8,
        "assistant": assistant,
        "best": best(batch1),
        "forward_cost_vs_one_position": forward,
        "forward_cost_batch8": forward8,
        "forward_cost_batch8_half_drafting": half8,
        "forward_cost_torch_kernels": forward_torch,
    }


def assistant_rows(model: CalmModel, args, single: dict, configs: list[Config]) -> list[dict]:
    """transformers assistant_early_exit at each E, batch 1, on the first --assistant-docs documents, one
    timed run after a short warm-up; against transformers generate and calm's best k at that E on the same
    documents. Batch 8 is tried once and its refusal recorded."""
    keys = list(single)[: args.assistant_docs]
    if not keys:
        return []
    hf = next(c for c in configs if c.name == HF)
    rows = []
    layers = ([CONTEXT_DRAFT] if args.context_drafts else []) + [e for e in args.draft_layers if e != CONTEXT_DRAFT]
    for e in layers:
        ours = [x for x in configs if x.spec and int(x.spec.split(":")[1]) == e and ":lookup" not in x.spec]
        if not ours:  # only hybrids at this E: transformers has no like-for-like switch
            continue
        best_ours = min(ours, key=lambda x: sum(statistics.median(x.cpu[k]) for k in keys))
        switch = _transformers_switch(e, best_ours.spec)
        c = Config(" ".join(f"{k}={v}" for k, v in switch.items()), hf_runner(model, **switch))
        c.run(single[keys[0]], 4)
        for k in keys:
            timed(c, k, single[k], args.new_tokens, hf.tokens)
        seconds = sum(c.cpu[k][0] for k in keys)
        hf_s = sum(statistics.median(hf.cpu[k]) for k in keys)
        ours_s = sum(statistics.median(best_ours.cpu[k]) for k in keys)
        rows.append(
            {
                "draft_layer": e,
                "transformers": c.name,
                "cpu_seconds": seconds,
                "tokens_per_cpu_s": args.new_tokens * len(keys) / seconds,
                "vs_transformers": hf_s / seconds,
                "identical_to_transformers": c.identical,
                "calm_best_at_E": best_ours.name,
                "calm_vs_assistant": seconds / ours_s,
                "docs": len(keys),
                "batch8": batch8_refusal(model, single, switch),
            }
        )
        print(f"{c.name}: {seconds:.2f}s, calm {best_ours.name} {ours_s:.2f}s", file=sys.stderr, flush=True)
    return rows


def _transformers_switch(e: int, spec: str) -> dict:
    """transformers' own way to draft like calm at draft layer e: from its early exit, or (e = 0) by
    prompt lookup with calm's best k."""
    if e == CONTEXT_DRAFT:
        return {"prompt_lookup_num_tokens": int(spec.split(":")[2])}
    return {"assistant_early_exit": e}


def batch8_refusal(model: CalmModel, single: dict, switch: dict) -> str:
    first = next(iter(single.values()))
    ids = [first.ids[0].tolist()] * 2
    try:
        hf_runner(model, **switch)(model.encode_prompts(ids, 2), 2)
    except ValueError as exc:
        return f"refused: {exc}"
    return "ran"


def _source(row: dict) -> str | None:
    """Where a speculative row's drafts come from: "exit", "context" or "both" (None: not speculative)."""
    if not row["spec"]:
        return None
    if _draft_layer(row) == CONTEXT_DRAFT:
        return "context"
    return "both" if _looks_up(row) else "exit"


def _looks_up(row: dict) -> bool:
    """Whether a speculative row drafts from the context first (the spec's `lookup` flag)."""
    return parse_run_spec(row["spec"])[1].lookup


def _draft_layer(row: dict) -> int | None:
    return int(row["spec"].split(":")[1]) if row["spec"] else None


def best(rows: list[dict]) -> dict | None:
    """The fastest speculative setting that drafted at all (one that never drafts is full depth)."""
    speculative = [r for r in rows if r["spec"] and r["mean_draft_length"]]
    return max(speculative, key=lambda r: r["tokens_per_cpu_s"]) if speculative else None


def markdown(report: dict) -> str:
    b = report["best"]
    lines = [
        f"# Lossless speculative decoding: {report['model']}, CPU",
        "",
        *machine_markdown(report["machine"]),
        f"{report['new_tokens']} new tokens per row (EOS ignored), XSum test documents cut to "
        f"{report['max_doc_tokens']} tokens (prompts of {min(report['prompt_tokens'])}–"
        f"{max(report['prompt_tokens'])} tokens), batch 1 over {report['docs']} documents"
        f"{' and one batch of 8' if report['batch8'] else ''}; "
        f"median of {report['repeats']} round-robin runs after a warm-up, prefill included. The CPU was shared "
        "with other jobs, so speeds are tokens per CPU second of this single-threaded process (time.process_time), "
        "which time-slicing by other processes does not inflate; wall-clock ratios are listed beside them. "
        f"Benchmark wall time {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    rows1 = report["batch1"]
    if b is None:
        lines += ["**No speculative setting drafted at batch 1.**", ""]
    else:
        identical = all(r["identical"] for r in report["batch1"] + report["batch8"])
        lines += [
            f"**Best at batch 1 (of the settings that drafted): {b['name']}**, **{b['vs_full']:.2f}×** never-exit "
            f"calm ({b['tokens_per_cpu_s']:.2f} tokens per CPU second). Outputs identical to full depth in every "
            f"run: **{identical}**.",
            "",
            *_headline("Drafts from the exit heads", best([r for r in rows1 if _source(r) == "exit"])),
            *_headline("Drafts looked up in the context (E = 0)", best([r for r in rows1 if _source(r) == "context"])),
            *_headline("Context drafts first, else the exit heads", best([r for r in rows1 if _source(r) == "both"])),
            *_batch8_line(report["batch8"]),
            *_break_even(report),
        ]
    for title, rows in (("Batch 1", report["batch1"]), ("Batch 8", report["batch8"])):
        if rows:
            lines += [
                f"## {title}",
                "",
                "| config | tokens/CPU s | vs full | vs transformers | wall vs full | prefill share | decode vs full | "
                "identical | acceptance | drafted per step | kept per step | draft s | verify s |",
                "|---|" + "---:|" * 12,
            ]
            lines += [
                f"| {r['name']} | {r['tokens_per_cpu_s']:.2f} | {r['vs_full']:.2f}× | {_f(r['vs_transformers'])}× | "
                f"{r['vs_full_wall']:.2f}× | {_pct(r.get('prefill_share'))} | {_x(r.get('decode_vs_full'))} | "
                f"{'yes' if r['identical'] else 'NO'} | {_f(r['acceptance_rate'])} | "
                f"{_f(r['mean_draft_length'])} | {_f(r['mean_accepted_length'])} | {_f(r['draft_s'])} | "
                f"{_f(r['verify_s'])} |"
                for r in rows
            ]
            lines.append("")
    lines += _transformers_section(report["assistant"])
    lines += _cost_line(
        report["forward_cost_vs_one_position"],
        "What verifying costs here: one forward over all layers for T positions, against T = 1 (CPU time, batch 1)",
        ".",
    )
    lines += _cost_line(
        report.get("forward_cost_torch_kernels"),
        "The same on torch's own matmuls (MKL; the engine before calm.kernels)",
        ". calm's generation runs oneDNN's linear on weights packed once (calm.kernels), as the rows above do.",
    )
    lines += _cost_line(
        report.get("forward_cost_batch8"), "The same for 8 rows (T positions each, against one position each)", "."
    )
    lines += _cost_line(
        report.get("forward_cost_batch8_half_drafting"),
        "The same for 8 rows of which 4 verify T positions and 4 only their pending token",
        ": a row verifies its own drafts only (the matmuls run on the real slots, calm.engine.kernels.only_slots), "
        "so a row that drafts nothing costs one position.",
    )
    lines += [
        "",
        "acceptance: drafted tokens the full model kept. drafted / kept per step: per row per verification "
        "pass. draft s / verify s: wall seconds summed over the timed batches' last run (layers 1..E with the "
        "exit head; layers E+1..L with the LM head, accept and rollback). prefill share: the prompt's "
        "forward (all layers, full depth, the same in every config) over prefill + decode wall time. decode vs "
        "full: tokens after the first per CPU second of the decode part alone, against never-exit calm's.",
        "",
    ]
    return "\n".join(lines)


def _cost_line(cost: dict | None, title: str, after: str) -> list[str]:
    """One paragraph of forward costs by width T (a dict from forward_cost), or nothing where not measured."""
    if not cost:
        return []
    return ["", f"{title}: " + ", ".join(f"T={t}: {c:.2f}×" for t, c in cost.items() if t != "head") + after]


def _headline(title: str, b: dict | None) -> list[str]:
    if b is None:
        return []
    return [
        f"- {title}: best **{b['name']}**, **{b['vs_full']:.2f}×** never-exit calm at batch 1 (acceptance "
        f"{_f(b['acceptance_rate'])}, {_f(b['mean_draft_length'])} drafted and {_f(b['mean_accepted_length'])} "
        "kept per step)."
    ]


def _transformers_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return [
        "## transformers' assisted decoding at the same E (batch 1): assistant_early_exit, or prompt lookup for E = 0",
        "",
        "| E | transformers | docs | tokens/CPU s | vs transformers generate | same tokens as generate | "
        "calm best at E | calm speedup over it | batch 8 |",
        "|---:|---|---:|---:|---:|:---:|---|---:|---|",
        *(
            f"| {r['draft_layer']} | {r['transformers']} | {r['docs']} | {r['tokens_per_cpu_s']:.2f} | "
            f"{r['vs_transformers']:.2f}× | {'yes' if r['identical_to_transformers'] else 'NO'} | "
            f"{r['calm_best_at_E']} | {r['calm_vs_assistant']:.2f}× | {r['batch8']} |"
            for r in rows
        ),
    ]


def _batch8_line(rows: list[dict]) -> list[str]:
    b = best(rows)
    if b is None:
        return []
    verdict = "faster than" if b["vs_full"] > 1 else "not faster than"
    return [
        f"- Batch 8: the best setting that drafted, **{b['name']}**, runs at **{b['vs_full']:.2f}×** never-exit calm "
        f"({verdict} full depth)."
    ]


def _break_even(report: dict) -> list[str]:
    """Why exit-head drafts pay or not: a drafted token costs its layers 1..E and the exit head, about
    E/L + head of a full step, and saves a full step only when kept; so acceptance must beat that."""
    cost = report["forward_cost_vs_one_position"]
    if "head" not in cost:
        return [""]
    layers = report.get("num_layers", 30)
    rows = [
        r
        for r in report["batch1"]
        if r["spec"] and _draft_layer(r) and not _looks_up(r) and r["acceptance_rate"] is not None
    ]
    seen: dict[int, dict] = {}
    for r in rows:
        e = _draft_layer(r)
        if e not in seen or r["vs_full"] > seen[e]["vs_full"]:
            seen[e] = r
    parts = [
        f"E={e}: needs > {e / layers + cost['head']:.2f}, measured {r['acceptance_rate']:.2f} ({r['vs_full']:.2f}×)"
        for e, r in sorted(seen.items())
    ]
    if not parts:  # no setting drafted from the exit heads alone
        return [""]
    return [
        "",
        "Break-even for exit-head drafts: a drafted token costs layers 1..E and the exit head (one LM-head "
        f"argmax costs {cost['head']:.2f}× a full decode step here), about E/L + {cost['head']:.2f} of a step, and "
        "saves a step only when the full model keeps it; verifying more positions is extra (below). So a "
        "draft pays only where acceptance beats E/L + head: " + "; ".join(parts) + ". Context drafts "
        "cost no layer at all; only the wider verification pass.",
        "",
    ]


def _f(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def store(report: dict, checkpoint: str, report_file: str) -> dict | None:
    """The best batch-1 setting, with the best batch-8 one inside it (calm.speculative.lossless.LARGE_BATCH_KEY), into
    the checkpoint's config, each with never-exit calm's decode rate in the same run (for the footer)."""
    cpu = report["machine"].get("cpu") or report["machine"].get("processor") or ""
    setting = _measured(report["best"], report["batch1"], report_file, cpu)
    if setting is None:
        return None
    large = _measured(best(report["batch8"]), report["batch8"], report_file, cpu) if report["batch8"] else None
    if large is not None:
        setting[LARGE_BATCH_KEY] = large
    store_extra(checkpoint, STORE_KEY, setting)
    return setting


def _measured(b: dict | None, rows: list[dict], report_file: str, machine: str) -> dict | None:
    if b is None:
        return None
    policy, spec = parse_run_spec(b["spec"])
    full = next(r for r in rows if r["name"] == FULL)
    return MeasuredSetting(
        draft_layer=spec.draft_layer,
        max_draft=spec.max_draft,
        lookup=spec.lookup,
        adaptive=spec.adaptive,
        candidates=spec.candidates,
        measure=policy.measure,
        threshold=policy.threshold,
        speedup_vs_full=b["vs_full"],
        acceptance_rate=b["acceptance_rate"] or 0.0,
        report=report_file,
        full_decode_tokens_per_s=full.get("decode_tokens_per_cpu_s") or 0.0,
        machine=machine,
    ).to_dict()


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="alias, checkpoint directory or path")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--docs", type=int, default=4, help="documents timed at batch 1")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--max-doc-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draft-layers", type=_ints, default=[8, 12, 15, 20])
    parser.add_argument("--max-drafts", type=_ints, default=[2, 4, 6])
    parser.add_argument(
        "--controllers",
        type=lambda v: v.split(","),
        default=["classifier:0.7"],
        help="draft controllers, comma-separated: MEASURE:λ or 'always'",
    )
    parser.add_argument(
        "--context-drafts",
        type=_ints,
        default=[1, 2, 3],
        help="k values for drafts looked up in the context (draft layer 0); empty: none",
    )
    parser.add_argument("--assistant-docs", type=int, default=2)
    parser.add_argument(
        "--specs",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="more speculative settings, comma-separated calm bench specs (e.g. spec:0:3:adaptive, spec:0:3:c2)",
    )
    parser.add_argument(
        "--torch-kernels",
        action="store_true",
        help="also time never-exit calm on torch's matmuls (calm.engine.kernels)",
    )
    parser.add_argument("--no-batch8", dest="batch8", action="store_false")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--name", default=None, help="report file stem (default speculative_<model>, or the --from-json file's)"
    )
    parser.add_argument(
        "--store",
        default=None,
        metavar="CHECKPOINT",
        help="write the best batch-1 and batch-8 settings and their speedups into this calm checkpoint",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="REPORT",
        help="no timing: rewrite the Markdown (and --store) from this report's JSON, under its own name unless --name",
    )
    args = parser.parse_args()
    report = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    default = Path(args.from_json).stem if args.from_json else f"speculative_{args.model.rstrip('/').split('/')[-1]}"
    stem = args.name or default  # a report rewritten from its JSON keeps its own name
    if args.store:
        report["stored"] = store(report, args.store, f"{args.out}/{stem}.md")
    write_json_markdown(args.out, stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
