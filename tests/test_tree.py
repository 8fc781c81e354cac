"""calm.speculative.tree: depths, ancestors, greedy acceptance and the kept path of drafts laid out as a tree."""

from __future__ import annotations

import torch

from calm.speculative.tree import accept, ancestors, chain, depths, path

# one row: [pending, a1, a2, b1, b2] (two candidates of two tokens); one chain of four drafts
TREE = torch.tensor([[0, 1, 0, 3]])
CHAIN = chain(1, 5, torch.device("cpu"))


def test_a_chain_and_a_tree_have_the_depths_and_ancestors_of_their_layout():
    assert CHAIN.tolist() == [[0, 1, 2, 3]]
    assert depths(CHAIN).tolist() == [[0, 1, 2, 3, 4]]
    assert depths(TREE).tolist() == [[0, 1, 2, 1, 2]]
    assert ancestors(CHAIN)[0].tolist() == torch.ones(5, 5, dtype=torch.bool).tril().tolist()
    assert ancestors(TREE)[0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1],
    ]


def _targets(after: dict[int, int]) -> torch.Tensor:
    """The full model's token after each of the 5 slots (default 0)."""
    return torch.tensor([[after.get(s, 0) for s in range(5)]])


def test_the_deepest_right_path_wins_and_the_first_on_a_tie():
    tokens, counts = torch.tensor([[7, 8, 9, 4]]), torch.tensor([4])
    # the model says 9 after the pending token, 4 after b1, 6 after b2: candidate b is right whole
    acc = accept(tokens, TREE, counts, _targets({0: 9, 3: 4, 4: 6}))
    assert (acc.last.item(), acc.count.item(), acc.following.item()) == (4, 2, 6)
    assert path(TREE, acc.last).int().tolist() == [[1, 0, 0, 1, 1]]
    # both candidates start right (a1 = 7 would need 7 after pending: a tie at depth 1 goes to the first)
    tokens = torch.tensor([[7, 8, 7, 4]])
    acc = accept(tokens, TREE, counts, _targets({0: 7, 1: 5, 3: 5}))
    assert (acc.last.item(), acc.count.item(), acc.following.item()) == (1, 1, 5)
    # nothing right: the pending token alone, and the model's token after it
    acc = accept(tokens, TREE, counts, _targets({0: 3}))
    assert (acc.last.item(), acc.count.item(), acc.following.item()) == (0, 0, 3)


def test_a_chain_keeps_its_longest_right_prefix_within_its_count():
    tokens = torch.tensor([[5, 6, 7, 8]])
    targets = _targets({0: 5, 1: 6, 2: 7, 3: 8, 4: 2})
    acc = accept(tokens, CHAIN, torch.tensor([4]), targets)
    assert (acc.count.item(), acc.following.item()) == (4, 2)
    acc = accept(tokens, CHAIN, torch.tensor([2]), targets)  # slots past the row's count are not drafts
    assert (acc.last.item(), acc.count.item(), acc.following.item()) == (2, 2, 7)
    assert path(CHAIN, acc.last).int().tolist() == [[1, 1, 1, 0, 0]]
