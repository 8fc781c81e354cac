"""What the embedded model's matmuls cost on this CPU, one thread, CPU seconds, medians of interleaved repeats:

1. its 210 backbone linears at 1, 2, 4 and 8 rows: torch's float32 linear (MKL) against oneDNN on weights
   packed for 4 rows (calm.engine.kernels, what calm runs);
2. a speculative verification of 1-8 positions from the embeddings against one plain decode step, at full depth,
   both scoring their tokens, after a 256-token XSum prompt (what decides whether drafts pay: on the AMD EPYC of
   speculative_smollm2.md 3-5 positions cost 0.94-0.97x one);
3. the LM head's greedy argmax at 1-16 rows of real final states (calm.engine.lm_head): its int8 copy and the packed
   float32 head, and the certified argmax as calm runs it (int8 up to lm_head.INT8_MAX_ROWS rows, float32 beyond);
4. the same 210 shapes on random Q4_1 blocks: torch's int4 kernel with bfloat16 activations (calm's native
   weights), the same kernel with float16 and float32 activations (and scale tables in that dtype: its only
   paths that round less), and a float32 dequantise-and-dot that torch.compile fuses into one kernel per linear
   (exact to float32 rounding, unlike the int4 kernel's bfloat16).

Usage: python benchmarks/kernel_costs.py [--repeats 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

import calm
from calm import CalmModel
from calm.engine.decode import NO_EXITS, decode_one_token, forward_layers, prefill
from calm.engine.generation import PromptBatch, _start
from calm.engine.kernels import linear, only_slots, packed_linears
from calm.engine.quantized import QuantBlocks, QuantizedLinear, kernel_table
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.speculative.verification import slot_context

HEAD_ROWS = (1, 2, 4, 8, 16)


def medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """CPU seconds per call of each function, round robin after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.process_time()
            f()
            times[k].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def linears(model: CalmModel, repeats: int) -> dict[str, float]:
    lins = [m for m in model.network.adapter.model.modules() if isinstance(m, torch.nn.Linear)]
    lins = [m for m in lins if m.out_features < 10_000]  # the backbone (the LM head is measured by the verification)
    packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 4) for m in lins]
    fns: dict[str, Callable[[], object]] = {}
    for rows in (1, 2, 4, 8):
        xs = {m.in_features: torch.randn(rows, m.in_features) for m in lins}
        fns[f"MKL, {rows} rows"] = lambda xs=xs: [torch.nn.functional.linear(xs[m.in_features], m.weight) for m in lins]
        fns[f"oneDNN, {rows} rows"] = lambda xs=xs: [
            torch.ops.mkldnn._linear_pointwise(xs[m.in_features], p, None, "none", [], "") for m, p in zip(lins, packed)
        ]
    return medians(fns, repeats)


def xsum_ids(model: CalmModel) -> torch.Tensor:
    """The first XSum test document cut to 256 tokens, in the summary prompt: ids [T]."""
    from calm.eval.summarize import document_prompts
    from calm.prompts.documents import read_jsonl

    prompt = document_prompts(model, read_jsonl("../shared/data/xsum/test.jsonl", limit=1), 32, max_doc_tokens=256)
    return model.encode_prompts([prompt[0].text], 32).ids[0]


def verification(model: CalmModel, repeats: int) -> dict[str, float]:
    net = model.network
    ids = xsum_ids(model)
    with packed_linears(net.adapter.model, "auto"):
        state, first = _start(net, PromptBatch(ids[None], torch.ones(1, ids.shape[0], dtype=torch.bool)), 64)
        prefill(net, first, state)
        end, positions = state.cache.length, state.positions.clone()

        def plain() -> None:  # the step and its token, as the verification below scores its positions' tokens
            step = decode_one_token(net, NO_EXITS, torch.tensor([5]), state, math.inf, torch.tensor([0]))
            net.greedy_tokens(step.hidden, step.exit_layers)
            state.cache.length, state.positions = end, positions.clone()

        def verify(width: int) -> Callable[[], None]:
            def run() -> None:
                state.cache.key_mask[:, end : end + width] = True
                at = positions[:, None] + torch.arange(width)[None]
                ctx = slot_context(net, state, at, end)
                with only_slots(state.cache.key_mask[:, end : end + width]):
                    h = forward_layers(net, net.adapter.embed(torch.full((1, width), 5), at), range(net.num_layers),
                                       ctx, state.cache)  # fmt: skip
                net.greedy_tokens(h.reshape(width, -1), torch.full((width,), net.num_layers))
                state.cache.key_mask[:, end : end + width] = False

            return run

        widths = (1, 2, 3, 4, 6, 8)
        return medians({"plain decode step": plain, **{f"verify {w}": verify(w) for w in widths}}, repeats)


def final_states(model: CalmModel, rows: int) -> torch.Tensor:
    """Real inputs of the LM head: the final (normed) states [rows, D] of an XSum prompt's last positions."""
    ids = xsum_ids(model)
    return model.model(ids[None], output_hidden_states=True).hidden_states[-1][0, -rows:]


def lm_head(model: CalmModel, repeats: int) -> dict[str, float]:
    net = model.network
    argmax, weight = net.argmax, net.adapter.head_module.weight.detach()
    if argmax is None or argmax.weight is None or argmax.int8 is None:
        raise SystemExit("the model's LM head has no certified float32 argmax with an int8 copy")
    int8, states = argmax.int8, final_states(model, 16)
    fns: dict[str, Callable[[], object]] = {}
    with packed_linears(net.adapter.model, "auto"):
        for rows in HEAD_ROWS:
            x = states[:rows]
            fns[f"int8 copy, {rows} rows"] = lambda x=x: int8.scores(x)
            fns[f"float32 packed, {rows} rows"] = lambda x=x: linear(x, weight)
            fns[f"certified argmax, {rows} rows"] = lambda x=x: argmax(x)
        return medians(fns, repeats)


def q4_1_gemv(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ a Q4_1 weight [N, K] in float32: words [N/16, K/8, 16] int32 of 8 codes each, scale and low (d, m)
    [N/16, K/32, 16] float32. -> [1, N]."""
    k = x.shape[1]
    groups, blocks = k // 32, words.shape[0]
    xw = x.view(1, 1, groups, 4, 8, 1)
    codes = words.view(blocks, groups, 4, 16)
    dot = sum(((codes >> (4 * i)) & 15).float()[None] * xw[:, :, :, :, i] for i in range(8)).sum(3)  # [1, NB, G, 16]
    sums = x.view(1, 1, groups, 32).sum(-1)[..., None]
    return (scale[None] * dot + low[None] * sums).sum(2).reshape(1, blocks * 16)


def int4_in(q: QuantizedLinear, x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """q's int4 kernel with activations and tables in tables' dtype -> [1, N] float32."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(tables.dtype), q.packed, 32, tables)  # [1, N']
    return y[:, : q.out_features].float()


def native(model: CalmModel, repeats: int) -> dict:
    torch._dynamo.config.recompile_limit = 64
    lins = [m for m in model.network.adapter.model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = [tuple(m.weight.shape) for m in lins if m.out_features < 10_000]
    g = torch.Generator().manual_seed(0)
    int4, quants, fused, xs = [], [], [], {k: torch.randn(1, k, generator=g) for _, k in shapes}
    for n, k in shapes:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        d, m = (torch.rand(n, k // 32, generator=g) * 0.01).half(), (-torch.rand(n, k // 32, generator=g) * 0.05).half()
        quants.append(QuantBlocks("Q4_1", codes, d, m))
        int4.append(QuantizedLinear(quants[-1]))
        words = sum(codes.view(n, k // 8, 8)[:, :, i].long() << (4 * i) for i in range(8))
        words = torch.where(words >= 2**31, words - 2**32, words).int().view(n // 16, 16, k // 8).transpose(1, 2)
        blocks = [t.float().view(n // 16, 16, k // 32).transpose(1, 2).contiguous() for t in (d, m)]
        fused.append((words.contiguous(), *blocks))
    gemv = torch.compile(q4_1_gemv, dynamic=False, fullgraph=True)
    tables = {dt: [kernel_table(b, dt) for b in quants] for dt in (torch.float16, torch.float32)}
    errors = {}
    for i, (q, (w, sc, lo)) in list(enumerate(zip(int4, fused)))[-3:]:  # the MLP's three shapes
        x = xs[q.in_features]
        exact = x.double() @ q.dequantize().double().T
        scale = exact.abs().max()
        errors[f"{q.out_features}x{q.in_features}"] = {
            "int4 kernel": float((q.int4(x).double() - exact).abs().max() / scale),
            "fused float32": float((gemv(x, w, sc, lo).double() - exact).abs().max() / scale),
            **{
                f"int4 kernel, {str(dt)[6:]}": float((int4_in(q, x, tables[dt][i]) - exact).abs().max() / scale)
                for dt in tables
            },
        }
    costs = medians(
        {
            "int4 kernel, bfloat16 activations": lambda: [q.int4(xs[q.in_features]) for q in int4],
            **{
                f"int4 kernel, {str(dt)[6:]} activations": lambda t=t: [
                    int4_in(q, xs[q.in_features], table) for q, table in zip(int4, t)
                ]
                for dt, t in tables.items()
            },
            "fused float32 dequant-GEMV (compiled per linear)": lambda: [
                gemv(xs[w.shape[1] * 8], w, s, lo) for w, s, lo in fused
            ],
        },
        repeats,
    )
    return {"seconds": costs, "max_relative_error": errors}


def markdown(r: dict) -> str:
    lin, ver, nat = r["linears_s"], r["verification_s"], r["native_s"]
    lines = ["# What the embedded model's matmuls cost on this CPU (one thread)", "", *machine_markdown(r["machine"])]
    lines += [f"Load average {r['load'][0]:.1f} → {r['load'][1]:.1f}; CPU seconds, medians of interleaved repeats.", ""]
    lines += ["| the 210 backbone linears | 1 row | 2 rows | 4 rows | 8 rows |", "|---|---|---|---|---|"]
    for name in ("MKL", "oneDNN"):
        cells = [f"{1000 * lin[f'{name}, {n} rows']:.1f} ms" for n in (1, 2, 4, 8)]
        lines.append(f"| {name}{' (packed for 4 rows: calm)' if name == 'oneDNN' else ''} | {' | '.join(cells)} |")
    plain = ver["plain decode step"]
    lines += ["", "| full depth after a 256-token prompt, with its tokens | ms | vs the plain step |", "|---|---|---|"]
    lines += [f"| {k} | {1000 * v:.1f} | {v / plain:.2f}× |" for k, v in ver.items()]
    head = r["lm_head_s"]
    lines += ["", f"| the LM head (49152 x 576), on real final states | {' | '.join(f'{n} rows' for n in HEAD_ROWS)} |"]
    lines += ["|---" * (len(HEAD_ROWS) + 1) + "|"]
    for name in ("int8 copy", "float32 packed", "certified argmax"):
        cells = [f"{1000 * head[name + f', {n} rows']:.1f} ms" for n in HEAD_ROWS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| the 210 linear shapes on random Q4_1 blocks, 1 row | ms |", "|---|---|"]
    lines += [f"| {k} | {1000 * v:.1f} |" for k, v in nat["seconds"].items()]
    kinds = list(next(iter(nat["max_relative_error"].values())))
    lines += [
        "",
        f"| max error relative to the exact (float64) product | {' | '.join(kinds)} |",
        "|---" * (1 + len(kinds)) + "|",
    ]
    lines += [f"| {k} | {' | '.join(f'{e[c]:.1e}' for c in kinds)} |" for k, e in nat["max_relative_error"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    calm.set_threads(1)
    model = CalmModel.from_pretrained("smollm2")
    load = os.getloadavg()[0]
    with torch.inference_mode():
        report = {
            "machine": machine_info(command=" ".join(["python", *sys.argv])),
            "linears_s": linears(model, args.repeats),
            "verification_s": verification(model, args.repeats),
            "lm_head_s": lm_head(model, args.repeats),
            "native_s": native(model, args.repeats),
        }
    report["load"] = [load, os.getloadavg()[0]]
    write_json_markdown(args.out, "kernel_costs_smollm2", report, markdown(report))


if __name__ == "__main__":
    main()
