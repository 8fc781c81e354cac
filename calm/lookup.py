"""Drafts from the context itself: the tokens that followed the last occurrence of the current n-gram.

Speculative decoding at draft layer E = 0 runs no layer to draft. A row's next tokens are guessed by
looking its last few tokens up in its own context (prompt and tokens so far), as prompt-lookup
decoding does: a summary copies names, numbers and phrases from its document. The guesses cost no
model work; verification then runs every layer over the pending token and the guesses at once.
`NgramIndex` keeps, per n-gram, where its latest occurrence was followed, so no step rescans the context.
"""

from __future__ import annotations

LOOKUP_MAX_NGRAM = 3  # the longest suffix looked up first
LOOKUP_MIN_NGRAM = 2  # shorter suffixes match too often by chance to be worth verifying


class NgramIndex:
    """A growing token list with, for each n-gram (n = min_ngram..max_ngram), the position of the token
    that followed its latest occurrence."""

    def __init__(self, tokens: list[int], max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before `token` now have a follower
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.follower[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def draft(self, max_draft: int) -> list[int]:
        """Up to max_draft tokens that followed the most recent earlier occurrence of the list's last n
        tokens, trying n = max_ngram down to min_ngram; [] when no such suffix occurs before."""
        for n in range(min(self.max_ngram, len(self.tokens) - 1), self.min_ngram - 1, -1):
            at = self.follower.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + max_draft]
        return []


class BatchLookup:
    """One NgramIndex per row of a batch, over its prompt and then its output as it grows."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self.indexes = [NgramIndex(p) for p in prompts]
        self.indexed = [0] * len(prompts)  # output tokens each index holds

    def drafts(self, outputs: list[list[int]], limits: list[int]) -> list[list[int]]:
        """Each row's drafts, at most limits[b] tokens (0: none), from its prompt and outputs[b]."""
        for b, (index, output) in enumerate(zip(self.indexes, outputs)):
            index.extend(output[self.indexed[b] :])
            self.indexed[b] = len(output)
        return [index.draft(n) if n > 0 else [] for index, n in zip(self.indexes, limits)]
