"""The OpenAI response shapes, whole and streamed (chunks), for completions and chat, and the `calm`
object each carries: the mode, what ran, the mean exit layer and, where speculative cycles ran, how many
tokens each gave."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from calm.serving.engine_loop import Update
from calm.serving.prepare import Prepared


@dataclass
class Progress:
    """What a request has made so far (its handler's side): exit layers, speculative cycles, why it ended."""

    prepared: Prepared
    num_layers: int
    exit_layers: list[int] = field(default_factory=list)
    cycles: int = 0  # speculative cycles that gave this request tokens
    cycle_tokens: int = 0
    drafted: int = 0  # drafts those cycles verified for it
    finish_reason: str | None = None

    def record(self, update: Update, counted: int) -> None:
        """Count an update's tokens, up to `counted` in all (tokens after a stop string do not count)."""
        keep = max(0, counted - len(self.exit_layers))
        layers = update.exit_layers[:keep]
        self.exit_layers.extend(layers)
        if update.speculative and layers:
            self.cycles += 1
            self.cycle_tokens += len(layers)
            self.drafted += update.drafted

    @property
    def completion_tokens(self) -> int:
        return len(self.exit_layers)

    def usage(self) -> dict:
        prompt = self.prepared.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    def calm(self) -> dict:
        tokens = self.completion_tokens
        out: dict = {
            "mode": self.prepared.mode,
            "decoding": self.decoding(),
            "avg_layers": round(sum(self.exit_layers) / tokens, 3) if tokens else None,
            "num_layers": self.num_layers,
        }
        if self.cycles:  # each cycle gives the full model's next token and the drafts it accepted
            accepted = self.cycle_tokens - self.cycles
            out["speculative"] = {
                "cycles": self.cycles,
                "tokens": self.cycle_tokens,
                "drafted": self.drafted,
                "accepted_drafts": accepted,
                "acceptance": round(accepted / self.drafted, 3) if self.drafted else None,
                "tokens_per_cycle": round(self.cycle_tokens / self.cycles, 3),
            }
        return out

    def decoding(self) -> str:
        if not self.cycles and self.prepared.decoding.startswith("lossless: speculative"):
            return self.prepared.decoding + " (no cycle ran for this request: the full model made every token)"
        return self.prepared.decoding


@dataclass(frozen=True)
class Shape:
    """One response's identity: chat or completion, its id, creation time and model name."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, chat: bool, model: str) -> Shape:
        return cls(chat, model, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])

    def head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, progress: Progress) -> dict:
        """The non-streamed response."""
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": progress.finish_reason}
        return {**self.head(False), "choices": [choice], "usage": progress.usage(), "calm": progress.calm()}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """A streamed chunk with new text (chat: a delta; the first carries the role)."""
        if self.chat:
            delta: dict = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head(True), "choices": [choice]}

    def last_chunk(self, progress: Progress) -> dict:
        return {**self.chunk(None, progress.finish_reason), "calm": progress.calm()}

    def usage_chunk(self, progress: Progress) -> dict:
        return {**self.head(True), "choices": [], "usage": progress.usage()}
