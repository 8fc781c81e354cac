"""The agreement report: how often layer k's argmax equals the final layer's, before (the plain
shared head) and after training (through the exit heads), with the exit classifier's quality."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calm.adapters.base import Adapter
from calm.checkpoints.checkpoint import read_config
from calm.errors import InputError
from calm.exits.heads import ExitHeads
from calm.training.config import TrainConfig
from calm.training.data import encode_prompt, read_training_jsonl, summary_sequence
from calm.training.features import Features, hidden_features, last_state_is_normed
from calm.training.progress import ProgressUi, progress_bar
from calm.training.summaries import SUMMARIES_FILE, generate_summaries, summary_jobs

if TYPE_CHECKING:
    from calm.model import CalmModel


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    pos, neg = scores[labels], scores[~labels]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    ranks = torch.empty_like(scores, dtype=torch.float64)
    order = scores.argsort()
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    return float((ranks[labels].sum() - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


@torch.no_grad()
def layer_agreement(adapter: Adapter, heads: ExitHeads | None, features: Features, chunk: int = 256) -> dict:
    """Per exit layer k = 1..L-1: the fraction of positions where argmax of layer k's prediction
    (plain shared head, and through `heads` when given) equals the final layer's argmax, and the
    exit classifier's quality against that oracle label."""
    L1 = features.exits.shape[1]
    P = features.final.shape[0]
    plain = torch.zeros(L1)
    trained = torch.zeros(L1)
    cls_rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(L1)]
    use_cls = heads is not None and heads.config.classifier
    for start in range(0, P, chunk):
        final = features.final[start : start + chunk].to(adapter.dtype)
        top = adapter.lm_head(final).argmax(-1)
        for k in range(1, L1 + 1):
            h = features.exits[start : start + chunk, k - 1].to(adapter.dtype)
            layers = torch.full((h.shape[0],), k, dtype=torch.long, device=h.device)
            plain[k - 1] += (adapter.lm_head(adapter.final_norm(h)).argmax(-1) == top).sum().item()
            if heads is not None:
                agree = adapter.lm_head(adapter.final_norm(heads.transform(h, layers))).argmax(-1) == top
                trained[k - 1] += agree.sum().item()
                if use_cls:
                    cls_rows[k - 1].append((heads.classify(h, k).cpu(), agree.cpu()))
    result: dict = {"layers": list(range(1, L1 + 1)), "positions": P, "plain": (plain / P).tolist()}
    if heads is not None:
        result["heads"] = (trained / P).tolist()
    if use_cls:
        result["classifier"] = _classifier_quality(cls_rows)
    return result


def _classifier_quality(cls_rows: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict:
    """Per layer: AUC, accuracy at 0.5 and the mean probability on agreeing / disagreeing rows."""
    aucs, acc, p_pos, p_neg = [], [], [], []
    for rows in cls_rows:
        probs = torch.cat([r[0] for r in rows])
        labels = torch.cat([r[1] for r in rows])
        aucs.append(_auc(probs, labels))
        acc.append(float(((probs >= 0.5) == labels).float().mean()))
        p_pos.append(float(probs[labels].mean()) if labels.any() else None)
        p_neg.append(float(probs[~labels].mean()) if (~labels).any() else None)
    return {"auc": aucs, "accuracy_at_0.5": acc, "mean_p_agree": p_pos, "mean_p_disagree": p_neg}


@dataclass(frozen=True)
class SummaryFeatures:
    features: Features
    documents: int
    examples: tuple[str, ...]  # the first generated summaries, for the report
    seconds: float  # generating the summaries (or reading them from the cache)


def summary_features(
    calm: CalmModel,
    data: str,
    num_docs: int,
    *,
    summary_tokens: int = 48,
    max_doc_tokens: int = 256,
    gen_batch_size: int = 16,
    progress: bool = True,
    cache: str | None = None,
) -> SummaryFeatures:
    """The backbone's hidden states at every position of its own greedy summaries of the first
    num_docs documents of `data`. `cache`: a JSONL file keeping the summaries between reports
    (they depend on the backbone only, not on the heads)."""
    t0 = time.perf_counter()
    records = read_training_jsonl(Path(data))[0][:num_docs]  # documents without text are skipped
    cfg = TrainConfig(
        data=(data,),
        out=".",
        summary_tokens=summary_tokens,
        max_doc_tokens=max_doc_tokens,
        gen_batch_size=gen_batch_size,
    )
    jobs = summary_jobs(calm, [(data, r) for r in records], cfg, 1)
    with progress_bar(progress) as bar, tempfile.TemporaryDirectory() as tmp:
        ui = ProgressUi(bar)
        summaries, _ = generate_summaries(calm, jobs, cfg, Path(cache) if cache else Path(tmp) / SUMMARIES_FILE, ui)
        sequences = [
            summary_sequence(
                encode_prompt(calm, j.prompt, summary_tokens), summaries[j.key]["token_ids"], "summary", data
            )
            for j in jobs
            if summaries[j.key]["token_ids"]
        ]
        seconds = time.perf_counter() - t0
        normed = last_state_is_normed(calm.model, calm.adapter, calm.device)
        features = hidden_features(calm.model, calm.adapter, sequences, calm.device, normed, ui)
    return SummaryFeatures(features, len(records), tuple(summaries[j.key]["text"] for j in jobs[:3]), seconds)


def agreement_report(
    checkpoint: str,
    data: str,
    num_docs: int = 50,
    *,
    summary_tokens: int = 48,
    max_doc_tokens: int = 256,
    gen_batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    cache: str | None = None,
) -> dict:
    """Agreement with the final layer on the model's own greedy summaries of the first num_docs
    documents of `data`: the plain shared head (before training) vs the checkpoint's heads (after)."""
    from calm.model import CalmModel

    t0 = time.perf_counter()
    config = read_config(checkpoint)
    calm = CalmModel.from_pretrained(checkpoint, device=device)
    if calm.heads is None:
        raise InputError(f"{checkpoint} has no exit heads to report on")
    found = summary_features(
        calm,
        data,
        num_docs,
        summary_tokens=summary_tokens,
        max_doc_tokens=max_doc_tokens,
        gen_batch_size=gen_batch_size,
        progress=progress,
        cache=cache,
    )
    result = layer_agreement(calm.adapter, calm.heads, found.features)
    result.update(
        {
            "checkpoint": str(checkpoint),
            "backbone": config.backbone,
            "data": str(data),
            "documents": found.documents,
            "summary_tokens": summary_tokens,
            "max_doc_tokens": max_doc_tokens,
            "training": (config.extra or {}).get("training", {}).get("config"),
            "seconds": {"summaries": found.seconds, "total": time.perf_counter() - t0},
            "examples": list(found.examples),
        }
    )
    return result


def agreement_markdown(report: dict) -> str:
    lines = [
        f"# Per-layer agreement with the final layer: {report['checkpoint']}",
        "",
        f"Backbone `{report['backbone']}`; {report['documents']} documents of `{report['data']}`, "
        f"{report['positions']} positions of the model's own greedy summaries (max {report['summary_tokens']} "
        f"new tokens, documents cut to {report['max_doc_tokens']} tokens).",
        "",
        "Agreement = argmax of layer k's next-token prediction equals the final layer's argmax. "
        "*before*: the backbone's own final norm + LM head on layer k's state; *after*: through the trained "
        "low-rank map first. Classifier AUC: exit classifier's score against the *after* agreement label.",
        "",
    ]
    cls = report.get("classifier")
    header = "| layer | before | after | gain |" + (" classifier AUC | acc@0.5 |" if cls else "")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for i, k in enumerate(report["layers"]):
        before, after = report["plain"][i], report["heads"][i]
        row = f"| {k} | {before:.3f} | {after:.3f} | {after - before:+.3f} |"
        if cls:
            auc = cls["auc"][i]
            row += f" {auc:.3f} |" if auc is not None else " – |"
            row += f" {cls['accuracy_at_0.5'][i]:.3f} |"
        lines.append(row)
    mean_b = sum(report["plain"]) / len(report["plain"])
    mean_a = sum(report["heads"]) / len(report["heads"])
    lines += ["", f"Mean over layers: before {mean_b:.3f}, after {mean_a:.3f}.", ""]
    return "\n".join(lines)
