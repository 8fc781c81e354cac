"""Drafts from the context itself: the tokens that followed the last occurrence of the current n-gram.

Speculative decoding at draft layer E = 0 runs no layer to draft. A row's next tokens are guessed by
looking its last few tokens up in its own context (prompt and tokens so far), as prompt-lookup
decoding does: a summary copies names, numbers and phrases from its document. The guesses cost no
model work; verification then runs every layer over the pending token and the guesses at once.
`NgramIndex` keeps, per n-gram, where its latest occurrences were followed (one per distinct next
token), so no step rescans the context, and a row can draft several candidate continuations at once
(verified together as a tree, calm.speculative.tree).

The settings were chosen by replaying greedy outputs of the embedded model on XSum test documents
(benchmarks/results/speculative_smollm2.md): suffixes of 4 tokens down to 1. Where verifying more
positions costs next to nothing (calm.engine.kernels), every match drafts its full length; BatchLookup can
also adapt each row's draft length to its last verification (adaptive=True), which pays only where
each verified position costs.
"""

from __future__ import annotations

from itertools import islice

LOOKUP_MAX_NGRAM = 4  # the longest suffix looked up first
LOOKUP_MIN_NGRAM = 1  # the shortest one


class NgramIndex:
    """A growing token list with, for each n-gram (n = min_ngram..max_ngram), the positions of the tokens
    that followed its occurrences: the latest one for each distinct following token."""

    def __init__(self, tokens: list[int], max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        # n-gram -> {following token: index of its latest occurrence after the n-gram}, oldest first
        self.followers: dict[tuple[int, ...], dict[int, int]] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before `token` now have a follower
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                seen = self.followers.setdefault(tuple(self.tokens[end - n : end]), {})
                seen.pop(token, None)  # re-inserted: the latest occurrence goes last
                seen[token] = end
            self.tokens.append(token)

    def draft(self, max_draft: int) -> list[int]:
        """Up to max_draft tokens that followed the most recent earlier occurrence of the list's last n
        tokens, trying n = max_ngram down to min_ngram; [] when no such suffix occurs before."""
        found = self.candidates(max_draft, 1)
        return found[0] if found else []

    def candidates(self, max_draft: int, count: int) -> list[list[int]]:
        """Up to `count` continuations of the longest suffix (max_ngram down to min_ngram) that occurred
        before, each from the latest occurrence followed by a different token, most recent first."""
        for n in range(min(self.max_ngram, len(self.tokens) - 1), self.min_ngram - 1, -1):
            seen = self.followers.get(tuple(self.tokens[-n:]))
            if seen:
                starts = islice(reversed(seen.values()), count)  # the latest first
                return [self.tokens[at : at + max_draft] for at in starts]
        return []


class BatchLookup:
    """One NgramIndex per row of a batch, over its prompt and then its output as it grows, and each row's
    draft length: max_draft, or with adaptive=True one that drops by one after a verification that
    rejected one of the row's drafts (down to 1) and grows by one after one that kept them all."""

    def __init__(self, prompts: list[list[int]], max_draft: int, adaptive: bool = False) -> None:
        self.indexes = [NgramIndex(p) for p in prompts]
        self.indexed = [0] * len(prompts)  # output tokens each index holds
        self.max_draft, self.adaptive = max_draft, adaptive
        self.lengths = [max_draft] * len(prompts)  # each row's current draft length

    def reset(self, row: int, prompt: list[int]) -> None:
        """A new request took row `row` (a continuous batch's slot): index its prompt, from the full draft length."""
        self.indexes[row] = NgramIndex(prompt)
        self.indexed[row] = 0
        self.lengths[row] = self.max_draft

    def drafts(self, outputs: list[list[int]], limits: list[int]) -> list[list[int]]:
        """Each row's drafts, at most min(its draft length, limits[b]) tokens (0: none), from its prompt
        and outputs[b]."""
        return [found[0] if found else [] for found in self.candidates(outputs, limits, 1)]

    def candidates(self, outputs: list[list[int]], limits: list[int], count: int) -> list[list[list[int]]]:
        """Each row's candidate continuations (NgramIndex.candidates), up to `count`, each at most
        min(its draft length, limits[b]) tokens (0: none)."""
        for b, (index, output) in enumerate(zip(self.indexes, outputs)):
            index.extend(output[self.indexed[b] :])
            self.indexed[b] = len(output)
        caps = [min(n, length) for n, length in zip(limits, self.lengths)]
        return [index.candidates(n, count) if n > 0 else [] for index, n in zip(self.indexes, caps)]

    def verified(self, drafted: list[int], kept: list[int]) -> None:
        """Adapt each row's draft length to its last verification: drafted[b] tokens, kept[b] of them."""
        if not self.adaptive:
            return
        for b, (d, k) in enumerate(zip(drafted, kept)):
            if d:
                grown = self.lengths[b] + 1 if k == d else self.lengths[b] - 1
                self.lengths[b] = max(1, min(self.max_draft, grown))
