"""Drafts as a tree: each drafted slot follows one earlier slot of its row, so one verification pass can
check several candidate continuations at once.

A row's verified slots are its pending token (slot 0) and its drafted tokens (slots 1..m). `parents`
[B, m] says which slot each drafted slot continues: a chain (one candidate, or drafts from the exit
heads) has parents 0, 1, .., m-1; two candidates of the context lookup, a and b, laid out as
[pending, a1, a2, b1, b2], have parents [0, 1, 0, 3]. A slot attends to its ancestors only (the
`ancestors` mask), sits at the position of its depth, and is kept when every slot on its path drafted
the token the full model chose after its parent. The deepest kept slot wins (the earliest on a tie);
the slots off its path leave the cache as masked holes, as rejected drafts of a chain do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accepted:
    """What one verification kept, per row."""

    last: torch.Tensor  # [B] the deepest kept slot (0: the pending token alone)
    count: torch.Tensor  # [B] drafted tokens kept: the depth of `last`
    following: torch.Tensor  # [B] the full model's token after `last`


def chain(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """The parents [B, m] of one chain of m = width - 1 drafts."""
    return torch.arange(width - 1, device=device).expand(rows, width - 1)


def depths(parents: torch.Tensor) -> torch.Tensor:
    """Each slot's depth [B, m+1]: 0 for the pending token, its parent's + 1 for a drafted slot."""
    b, m = parents.shape
    depth = parents.new_zeros(b, m + 1)
    for s in range(m):
        depth[:, s + 1] = depth.gather(1, parents[:, s : s + 1])[:, 0] + 1
    return depth


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """[B, m+1, m+1] bool: slot i's row holds True at i and at every slot on its path to the pending token."""
    b, m = parents.shape
    eye = torch.eye(m + 1, dtype=torch.bool, device=parents.device)
    anc = eye.expand(b, m + 1, m + 1).clone()
    for s in range(m):
        parent_row = anc.gather(1, parents[:, s, None, None].expand(b, 1, m + 1))[:, 0]  # [B, m+1]
        anc[:, s + 1] = parent_row | eye[s + 1]
    return anc


def accept(tokens: torch.Tensor, parents: torch.Tensor, counts: torch.Tensor, targets: torch.Tensor) -> Accepted:
    """Greedy acceptance on a tree: drafted slot s+1 holds tokens[:, s] and is kept when its parent is and
    the full model's token after its parent (targets [B, m+1]) equals it; only the first counts [B] drafted
    slots count."""
    b, m = tokens.shape
    kept = torch.zeros(b, m + 1, dtype=torch.bool, device=tokens.device)
    kept[:, 0] = True
    for s in range(m):
        parent = parents[:, s : s + 1]
        matches = tokens[:, s] == targets.gather(1, parent)[:, 0]
        kept[:, s + 1] = kept.gather(1, parent)[:, 0] & matches & (s < counts)
    depth = depths(parents)
    score = torch.where(kept, depth, -1)  # [B, m+1]
    last = score.argmax(1)  # the first of the deepest
    return Accepted(last, depth.gather(1, last[:, None])[:, 0], targets.gather(1, last[:, None])[:, 0])


def path(parents: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, m+1] bool: the slots on each row's path from the pending token to `last` [B]."""
    anc = ancestors(parents)
    return anc.gather(1, last[:, None, None].expand(-1, 1, anc.shape[-1]))[:, 0]
