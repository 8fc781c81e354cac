"""Drafts from the context itself: the tokens that followed the last occurrence of the current n-gram.

Speculative decoding at draft layer E = 0 runs no layer to draft. A row's next tokens are guessed by
looking its last few tokens up in its own context (prompt and tokens so far), as prompt-lookup
decoding does: a summary copies names, numbers and phrases from its document. The guesses cost no
model work; verification then runs every layer over the pending token and the guesses at once.
"""

from __future__ import annotations

LOOKUP_MAX_NGRAM = 3  # the longest suffix looked up first
LOOKUP_MIN_NGRAM = 2  # shorter suffixes match too often by chance to be worth verifying


def lookup_draft(
    context: list[int], max_draft: int, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM
) -> list[int]:
    """Up to max_draft tokens that followed the most recent earlier occurrence of the context's last
    n tokens, trying n = max_ngram down to min_ngram; [] when no suffix occurs before."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + max_draft]
    return []
