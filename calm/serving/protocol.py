"""The OpenAI request bodies calm serve accepts (pydantic, strict: a wrong type is refused, never coerced),
the OpenAI-shaped error body, and the per-request `calm` object.

Unknown fields are refused (400 naming the field), and so are OpenAI parameters calm does not implement
(`n` > 1, `logprobs`, tools, ...), unless they hold the value that means "off": nothing is silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from calm.errors import InputError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ServingError(InputError):
    """A request the server refuses: the HTTP status, the field at fault (OpenAI's `param`) and its type."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class CalmOptions(Strict):
    """calm's own settings, in the body's `calm` object (the openai client's extra_body={"calm": {...}})."""

    mode: Literal["lossless", "calm"] | None = None  # None: "calm" when a knob is given, else "lossless"
    speed: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    tolerance: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    threshold: Probability | None = None
    truncate: bool = False  # a prompt longer than the context keeps its last tokens instead of a 400

    def resolved_mode(self) -> str:
        knob = [name for name in ("speed", "tolerance", "threshold") if getattr(self, name) is not None]
        if self.mode == "lossless" and knob:
            raise ServingError(
                f"calm.{knob[0]} sets calm's early exit, but calm.mode is 'lossless' (exact output); "
                "use mode 'calm' or leave the knob out",
                param=f"calm.{knob[0]}",
            )
        if len(knob) > 1:
            raise ServingError(f"give one of calm.speed, calm.tolerance and calm.threshold, not {knob}", param="calm")
        return self.mode or ("calm" if knob else "lossless")


class StreamOptions(Strict):
    include_usage: bool = False


# Parameters OpenAI defines that calm does not implement, with the value that means "not used".
UNSUPPORTED: dict[str, Any] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, False),
}


class Sampling(Strict):
    """What both endpoints share: the budget, sampling, stop strings and streaming."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None  # 0: greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    calm: CalmOptions = Field(default_factory=CalmOptions)
    # the unsupported ones, refused by `refuse_unsupported` unless "off"
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def refuse_unsupported(self) -> None:
        """400 naming the first OpenAI parameter given that calm does not implement."""
        for name, off in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value is not None and value not in off:
                raise ServingError(f"{name} is not supported by calm serve (got {value!r})", param=name)
        if self.n is not None and self.n != 1:
            raise ServingError(f"n={self.n} is not supported: calm serve returns one choice (n=1)", param="n")

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # the validator made it a list


class CompletionRequest(Sampling):
    """POST /v1/completions: one prompt, as text or as token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("calm serve takes one prompt per request (send one request each)")
            return prompt[0]
        return prompt

    def one_prompt(self) -> str | list[int]:
        """The prompt, as text or token ids (the validator took the one prompt out of a list of one)."""
        return cast("str | list[int]", self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    """POST /v1/chat/completions: the messages go through the model's chat template."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None

    def budget(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ServingError("max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def field_name(loc: tuple | list) -> str:
    """A pydantic error location as a dotted field name (without "body" and the union branch names)."""
    parts = [str(p) for p in loc if p != "body"]
    keep = [p for p in parts if p not in UNION_TAGS and not p.startswith(("list[", "function-"))]
    return ".".join(keep) or "body"


UNION_TAGS = {"str", "int", "float", "bool", "TextPart"}  # the branch names pydantic puts in a union's location
