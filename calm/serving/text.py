"""Token ids to text as they come: incremental detokenization and stop strings.

Text is decoded over a sliding window of the latest tokens (as vLLM's detokenizer does), so that a token
whose bytes complete a character only with the next one is held back until it does (no U+FFFD halves),
and a word's leading space is decoded against its neighbour. Text that could be the start of a stop string
is held back too; at the first stop string the text ends (the stop string is not part of it) and the
request is over. Streamed and whole responses come from the same TextStream, so their texts are equal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class TextStream:
    """Feed token ids with `push`; each call returns the new text that may be shown."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.prefix = 0  # the window decoded against: ids[prefix:read] is text already counted
        self.read = 0
        self.text = ""  # all text decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of text handed out
        self.stopped = False  # a stop string was found: the request is over
        self.counted_tokens = 0  # tokens that made the text (those after a stop string do not count)
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def push(self, tokens: Sequence[int]) -> str:
        """The text newly visible after these tokens ("" once stopped)."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        self.counted_tokens = len(self.ids)
        self.text += self._decode_new()
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the request (what the window or the stop check held back)."""
        if not self.stopped:
            whole = self._decode(self.ids)
            if whole.startswith(self.text):  # characters the window still held (an unfinished UTF-8 tail)
                self.text = whole
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _decode_new(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing yet, or a character cut in half: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _release(self, final: bool) -> str:
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped, final = self.text[: max(cut, self.sent)], True, True
        limit = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : limit], limit
        return delta

    def _first_stop(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None
