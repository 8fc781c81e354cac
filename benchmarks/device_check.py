"""The GPU half of benchmarks/device_check.sh: bench rows on CUDA for the embedded model.

Rows: full depth, a fixed exit at layer 15, the calibrated knob at speed 0.5 (its threshold on the
calibration's schedule) and the lossless run the checkpoint stores (speculative decoding, or the full
model), at batch 1 and 32, on the dynamic engine and on static+compile (lossless only on the dynamic
engine: speculative decoding has no static step). Writes device_check_<model>.json/.md.

Usage: python benchmarks/device_check.py [--model smollm2] [--device cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from calm import CalmModel
from calm.bench import BenchConfig, bench_prompts, run_bench
from calm.eval.bench_report import bench_markdown
from calm.eval.reporting import machine_info, write_json_markdown
from calm.prompts.documents import read_jsonl
from calm.speculative.lossless import MeasuredSetting

DATA = "../shared/data/xsum/test.jsonl"


def lossless_spec(model: CalmModel, batch_size: int) -> str | None:
    """The stored speculative setting for this row count as a bench spec; None where lossless is the full model."""
    stored = MeasuredSetting.from_extra(model.extra, batch_size)
    if stored is None or not stored.beats_full_depth:
        return None
    adaptive = ":adaptive" if stored.adaptive else ""
    if stored.draft_layer == 0:
        return f"spec:0:{stored.max_draft}{adaptive}"
    lookup = ":lookup" if stored.lookup else ""
    return f"spec:{stored.draft_layer}:{stored.max_draft}:{stored.measure}:{stored.threshold:g}{lookup}{adaptive}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = CalmModel.from_pretrained(args.model, device=args.device)
    try:
        documents = [d.document for d in read_jsonl(DATA, limit=32)]
    except Exception:  # no data beside the checkout: the built-in paragraph
        documents = None
    prompts = bench_prompts(model, documents, max_doc_tokens=256, new_tokens=args.new_tokens)
    knob = model.policy(speed=0.5)
    base = BenchConfig(
        model=args.model,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        policies=("fixed:15", f"{knob.measure}:{knob.threshold:g}"),
        decay_tau=knob.decay_tau,
        transformers=False,
    )
    machine = machine_info(model.device, " ".join(sys.argv))
    sections = []
    for engine in ("dynamic", "static+compile"):
        for batch in (1, 32):
            extra = lossless_spec(model, batch) if engine == "dynamic" else None
            config = replace(
                base, batch_sizes=(batch,), engine=engine, policies=base.policies + ((extra,) if extra else ())
            )
            report = run_bench(model, prompts, config, machine)
            sections.append((f"{engine}, batch {batch}", report))
            print(f"{engine} batch {batch} done", file=sys.stderr, flush=True)
    markdown = "\n".join(
        [f"# Device check: {args.model} on {machine['device']}", "", "Knob row: speed 0.5 of the calibration.", ""]
        + [f"## {title}\n\n{bench_markdown(r)}" for title, r in sections]
    )
    data = {"model": args.model, "machine": machine, "sections": {t: r.to_dict() for t, r in sections}}
    write_json_markdown(args.out, f"device_check_{args.model}", data, markdown)
    print(markdown)


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 parity with the CPU
    main()
