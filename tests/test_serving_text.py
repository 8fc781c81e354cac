"""Incremental detokenization and stop strings (calm.serving.text): the streamed pieces add up to the whole
text, a character split over tokens is never shown in halves, and text stops before the first stop string
even when the stop string arrives across tokens."""

from __future__ import annotations

import pytest

from calm.serving.text import TextStream


class ByteTokenizer:
    """Token i is byte i, as in byte-level BPE: a multi-byte character takes several tokens. Id 256 is a
    special token (EOS)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def pushed(stream: TextStream, ids: list[int], per_push: int = 1) -> list[str]:
    pieces = [stream.push(ids[i : i + per_push]) for i in range(0, len(ids), per_push)]
    return [*pieces, stream.finish()]


@pytest.mark.parametrize("per_push", [1, 2, 5])
def test_pieces_add_up_to_the_text_and_never_split_a_character(per_push):
    text = "Grüße, 東京! ok"
    pieces = pushed(TextStream(ByteTokenizer()), tokens(text) + [256], per_push)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_stop_string_across_tokens_ends_the_text_before_it():
    stream = TextStream(ByteTokenizer(), stops=["END", "zz"])
    pieces = [stream.push(tokens(c)) for c in "abc EN"]
    assert "".join(pieces) == "abc "  # "EN" could begin "END": held back
    assert not stream.stopped
    assert stream.push(tokens("D")) == "" and stream.stopped
    assert stream.push(tokens("more")) == ""  # nothing after the stop
    assert stream.finish() == ""
    assert stream.text == "abc " and stream.counted_tokens == len("abc END")


def test_the_first_of_several_stop_strings_wins():
    stream = TextStream(ByteTokenizer(), stops=["cd", "b"])
    assert "".join(pushed(stream, tokens("abcde"), per_push=5)) == "a"
    assert stream.stopped


def test_held_back_text_that_was_no_stop_string_comes_out_at_the_end():
    stream = TextStream(ByteTokenizer(), stops=["xyz"])
    pieces = pushed(stream, tokens("abx"))
    assert pieces[-1] == "bx" and "".join(pieces) == "abx"  # the last len("xyz") - 1 characters waited
    assert not stream.stopped


def test_special_tokens_are_not_text():
    stream = TextStream(ByteTokenizer())
    assert "".join(pushed(stream, [256, *tokens("hi"), 256])) == "hi"
