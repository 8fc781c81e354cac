"""The backbone's hidden states at the training positions, computed once for a frozen backbone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from calm.adapters.base import Adapter

if TYPE_CHECKING:
    from calm.training.data import TrainSequence
    from calm.training.progress import ProgressUi


def forward_hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
    """The model's output with every layer's hidden states (and the logits of the last position only
    where the model supports logits_to_keep)."""
    kwargs = {"input_ids": ids, "output_hidden_states": True, "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask
    try:
        return model(**kwargs, logits_to_keep=1)
    except TypeError:
        return model(**kwargs)


def last_state_is_normed(model: Any, adapter: Adapter, device: torch.device | str) -> bool:
    """Whether transformers' last hidden state already went through the final norm (Llama and GPT-2
    do that; every other entry is a raw layer output): checked against the model's own logits."""
    ids = torch.arange(3, 3 + 6, device=device)[None] % adapter.vocab_size
    with torch.no_grad():
        out = forward_hidden(model, ids)
        last = out.hidden_states[-1][0, -1].float()
        want = out.logits[0, -1].float()
        as_is = (adapter.lm_head(last.to(adapter.dtype)).float() - want).abs().max()
        normed = (adapter.lm_head(adapter.final_norm(last.to(adapter.dtype))).float() - want).abs().max()
    return bool(as_is <= normed)


@dataclass(frozen=True)
class Features:
    exits: torch.Tensor  # [P, L-1, D] raw hidden state after layers 1..L-1
    final: torch.Tensor  # [P, D] the final layer's state after the final norm (the LM head's input)


@torch.no_grad()
def hidden_features(
    model: Any,
    adapter: Adapter,
    sequences: Sequence[TrainSequence],
    device: torch.device | str,
    normed_last: bool,
    progress: ProgressUi | None = None,
    dtype: torch.dtype = torch.float32,
) -> Features:
    """The backbone's hidden states at every sequence's positions, one sequence per forward."""
    L, D = adapter.num_layers, adapter.hidden_size
    total = sum(len(s.positions) for s in sequences)
    exits = torch.empty(total, L - 1, D, dtype=dtype, device=device)
    final = torch.empty(total, D, dtype=dtype, device=device)
    task = progress.add_task("hidden states", total=len(sequences)) if progress is not None and sequences else None
    at = 0
    for seq in sequences:
        hs = forward_hidden(model, torch.tensor([seq.ids], device=device)).hidden_states
        pos = torch.tensor(seq.positions, device=device)
        n = pos.numel()
        for k in range(1, L):
            exits[at : at + n, k - 1] = hs[k][0].index_select(0, pos).to(dtype)
        last = hs[L][0].index_select(0, pos)
        final[at : at + n] = (last if normed_last else adapter.final_norm(last)).to(dtype)
        at += n
        if progress is not None and task is not None:
            progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return Features(exits, final)
