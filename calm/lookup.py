"""Drafts from the context itself: the tokens that followed the last occurrence of the current n-gram.

Speculative decoding at draft layer E = 0 runs no layer to draft. A row's next tokens are guessed by
looking its last few tokens up in its own context (prompt and tokens so far), as prompt-lookup
decoding does: a summary copies names, numbers and phrases from its document. The guesses cost no
model work; verification then runs every layer over the pending token and the guesses at once.
`NgramIndex` keeps, per n-gram, where its latest occurrence was followed, so no step rescans the context.

The settings were chosen by replaying greedy outputs of the embedded model on XSum test documents
(benchmarks/results/speculative_smollm2.md): suffixes of 4 tokens down to 1, where a 1-token match
drafts a single token (a unigram match is right about a third of the time, a longer one about half),
and a per-row draft length that adapts to the row's last verification (BatchLookup).
"""

from __future__ import annotations

LOOKUP_MAX_NGRAM = 4  # the longest suffix looked up first
LOOKUP_MIN_NGRAM = 1  # the shortest one
SHORT_MATCH = 1  # a match of this many tokens or fewer drafts at most SHORT_MATCH_DRAFT tokens
SHORT_MATCH_DRAFT = 1  # past its first token, what follows a one-token match is rarely right


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
        tokens, trying n = max_ngram down to min_ngram (a match of SHORT_MATCH tokens drafts at most
        SHORT_MATCH_DRAFT); [] when no such suffix occurs before."""
        for n in range(min(self.max_ngram, len(self.tokens) - 1), self.min_ngram - 1, -1):
            at = self.follower.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + (max_draft if n > SHORT_MATCH else min(max_draft, SHORT_MATCH_DRAFT))]
        return []


class BatchLookup:
    """One NgramIndex per row of a batch, over its prompt and then its output as it grows, and each row's
    draft length: it starts at max_draft, drops by one after a verification that rejected one of the
    row's drafts (down to 1) and grows by one after one that kept them all."""

    def __init__(self, prompts: list[list[int]], max_draft: int) -> None:
        self.indexes = [NgramIndex(p) for p in prompts]
        self.indexed = [0] * len(prompts)  # output tokens each index holds
        self.max_draft = max_draft
        self.lengths = [max_draft] * len(prompts)  # each row's current draft length

    def drafts(self, outputs: list[list[int]], limits: list[int]) -> list[list[int]]:
        """Each row's drafts, at most min(its draft length, limits[b]) tokens (0: none), from its prompt
        and outputs[b]."""
        for b, (index, output) in enumerate(zip(self.indexes, outputs)):
            index.extend(output[self.indexed[b] :])
            self.indexed[b] = len(output)
        caps = [min(n, length) for n, length in zip(limits, self.lengths)]
        return [index.draft(n) if n > 0 else [] for index, n in zip(self.indexes, caps)]

    def verified(self, drafted: list[int], kept: list[int]) -> None:
        """Adapt each row's draft length to its last verification: drafted[b] tokens, kept[b] of them."""
        for b, (d, k) in enumerate(zip(drafted, kept)):
            if d:
                grown = self.lengths[b] + 1 if k == d else self.lengths[b] - 1
                self.lengths[b] = max(1, min(self.max_draft, grown))
