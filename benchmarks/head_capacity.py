"""Do richer exit heads help? Agreement with the final layer for three head shapes at a few layers.

The shipped heads are a rank-r residual map h -> h + (h A) B in front of the model's final norm and
LM head. This trial trains, at each given layer and with the same data, steps and objective
(KL to the final layer's next-token distribution, the self-distillation of `calm train`):

- low-rank: the shipped shape (rank 32);
- full-rank: h -> h + h W + b (a tuned lens, D x D);
- mlp: h -> h + W2 gelu(W1 LN(h)) with a 1536-wide hidden layer,

on the model's own greedy summaries of training documents, and measures agreement on those of test
documents. If the full-rank map and the MLP barely beat the low-rank map, the limit of early exit
is in the backbone's states, not in the head. Writes JSON and Markdown to benchmarks/results/.

    python benchmarks/head_capacity.py --layers 15,20
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import nn

from calm.eval.reporting import machine_info, write_json_markdown
from calm.model import CalmModel
from calm.training import summary_features

RESULTS = Path(__file__).resolve().parent / "results"


class LowRank(nn.Module):
    def __init__(self, d: int, rank: int = 32):
        super().__init__()
        self.down = nn.Parameter(torch.randn(d, rank) * d**-0.5)
        self.up = nn.Parameter(torch.zeros(rank, d))

    def forward(self, h):
        return h + h @ self.down @ self.up


class FullRank(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, h):
        return h + h @ self.weight + self.bias


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int = 1536):
        super().__init__()
        self.norm, self.inner, self.outer = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, h):
        return h + self.outer(F.gelu(self.inner(self.norm(h))))


SHAPES = {"low-rank (32)": LowRank, "full-rank": FullRank, "mlp (1536)": MLP}


def head_logits(adapter, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return adapter.lm_head(adapter.final_norm(head(h.float()).to(adapter.dtype))).float()


def train_head(
    adapter, head: nn.Module, exits: torch.Tensor, final: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    loss = torch.tensor(math.nan)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(0, exits.shape[0], (batch,), generator=generator)
        with torch.no_grad():
            teacher = adapter.lm_head(final[rows].to(adapter.dtype)).float().log_softmax(-1)
        student = head_logits(adapter, head, exits[rows]).log_softmax(-1)
        loss = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss)


@torch.no_grad()
def agreement(adapter, head: nn.Module, exits: torch.Tensor, final: torch.Tensor) -> float:
    hits = 0
    for start in range(0, exits.shape[0], 512):
        top = adapter.lm_head(final[start : start + 512].to(adapter.dtype)).argmax(-1)
        hits += int((head_logits(adapter, head, exits[start : start + 512]).argmax(-1) == top).sum())
    return hits / exits.shape[0]


def markdown(r: dict) -> str:
    shapes = list(SHAPES)
    lines = [
        "# Do richer exit heads help? " + r["model"],
        "",
        f"Heads trained on {r['train']['positions']} positions of the model's own greedy summaries of "
        f"{r['train']['documents']} documents of `{r['train']['data']}`; agreement with the final layer's "
        f"argmax on {r['test']['positions']} positions of {r['test']['documents']} documents of "
        f"`{r['test']['data']}`. Each head: {r['steps']} steps of {r['batch']} positions, AdamW, cosine "
        "schedule, KL to the final layer's distribution.",
        "",
        "| layer | plain head | " + " | ".join(shapes) + " |",
        "|---:|---:|" + "---:|" * len(shapes),
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['layer']} | {row['plain']:.3f} | "
            + " | ".join(f"{row['shapes'][s]['agreement']:.3f}" for s in shapes)
            + " |"
        )
    lines += ["", f"Command: `{r['machine'].get('command', '')}`", ""]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="smollm2")
@click.option("--train-data", default="../shared/data/xsum/train.jsonl")
@click.option("--train-docs", type=int, default=200)
@click.option(
    "--train-cache",
    default="build/train-smollm2-heads/summaries.jsonl",
    help="Summaries cache of benchmarks/train_smollm2_heads.sh (same settings: reused, not regenerated).",
)
@click.option("--test-data", default="../shared/data/xsum/test.jsonl")
@click.option("--test-docs", type=int, default=100)
@click.option("--test-cache", default="build/agreement-summaries.jsonl")
@click.option("--layers", default="15,20")
@click.option("--steps", type=int, default=300)
@click.option("--batch", type=int, default=256)
@click.option("--seed", type=int, default=0)
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS))
def main(
    model, train_data, train_docs, train_cache, test_data, test_docs, test_cache, layers, steps, batch, seed, out_dir
):
    torch.manual_seed(seed)
    calm = CalmModel.from_pretrained(model)
    adapter = calm.adapter
    train = summary_features(calm, train_data, train_docs, cache=train_cache)
    test = summary_features(calm, test_data, test_docs, cache=test_cache)
    plain = nn.Identity()
    rows = []
    for layer in (int(k) for k in layers.split(",")):
        tx, tf = train.features.exits[:, layer - 1], train.features.final
        ex, ef = test.features.exits[:, layer - 1], test.features.final
        row = {"layer": layer, "plain": agreement(adapter, plain, ex, ef), "shapes": {}}
        for name, shape in SHAPES.items():
            head = shape(adapter.hidden_size)
            lr = 3e-3 if shape is LowRank else 1e-3
            loss = train_head(adapter, head, tx, tf, steps, batch, lr, seed)
            row["shapes"][name] = {
                "agreement": agreement(adapter, head, ex, ef),
                "final_kl": loss,
                "lr": lr,
                "parameters": sum(p.numel() for p in head.parameters()),
            }
            click.echo(f"layer {layer} {name}: {row['shapes'][name]}", err=True)
        rows.append(row)
    report = {
        "model": model,
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "rows": rows,
        "train": {"data": train_data, "documents": train.documents, "positions": train.features.exits.shape[0]},
        "test": {"data": test_data, "documents": test.documents, "positions": test.features.exits.shape[0]},
        "machine": machine_info(calm.device, " ".join(["python", *sys.argv])),
    }
    write_json_markdown(out_dir, "head_capacity_smollm2", report, markdown(report))
    click.echo(markdown(report))


if __name__ == "__main__":
    main()
