"""Confidence measures for the exit decision, all computed in float32.

softmax: top-1 minus top-2 probability of the exit layer's next-token distribution (needs the
    LM head: the costly measure, as the CALM paper notes; its logits are reused for the token).
state: cosine similarity between a layer's output and its input (cheap: no vocabulary).
classifier: the learned exit classifier of calm.exits.heads (cheap: one dot product per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> p(top-1) - p(top-2) [R]."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def state_similarity(h_out: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """h_out, h_in [R, D] -> cosine similarity [R]."""
    return F.cosine_similarity(h_out.float(), h_in.float(), dim=-1)


def softmax_check_layers(model: torch.nn.Module, head: torch.nn.Module, num_layers: int) -> float:
    """What one softmax check costs, in decoder layers of work: the LM head's weights (vocabulary x hidden)
    over one layer's (the backbone's weights less its embedding and head, shared once, over its layers).
    SmolLM2-135M: about 8 layers per check, so checking at every layer costs more than exiting saves."""
    head_params = {id(p): p.numel() for p in head.parameters()}
    embedding: torch.nn.Module | None = getattr(model, "get_input_embeddings", lambda: None)()
    shared = {**head_params, **({id(p): p.numel() for p in embedding.parameters()} if embedding is not None else {})}
    body = sum(p.numel() for p in model.parameters() if id(p) not in shared)
    return sum(head_params.values()) / max(body / num_layers, 1.0)


def check_overhead(
    exit_layers: list[list[int]], allowed: list[int], num_layers: int, check_layers: float
) -> tuple[float, float, float]:
    """(checks per token, layers they cost, layers exits saved) per decoded token, for tokens that exit at
    exit_layers (per row, the first token, made by the prefill, left out) with checks at `allowed` layers."""
    checks = saved = tokens = 0
    for row in exit_layers:
        for layer in row[1:]:
            checks += sum(1 for k in allowed if k <= layer)
            saved += num_layers - layer
            tokens += 1
    if not tokens:
        return 0.0, 0.0, 0.0
    return checks / tokens, checks * check_layers / tokens, saved / tokens
