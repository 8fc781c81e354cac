"""From a checked request body to the scheduler's Request: the prompt's token ids (the chat template for
chat), the budget within the context, sampling, and the exit policy of the body's `calm` object.

Everything a request can get wrong is found here, before it reaches the engine thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calm.engine.sampling import SamplingConfig
from calm.engine.scheduler import Request
from calm.errors import CalmError
from calm.exits.policy import ExitPolicy
from calm.prompts.templates import prompt_ids
from calm.serving.protocol import ChatRequest, CompletionRequest, Sampling, ServingError

if TYPE_CHECKING:
    from calm.model import CalmModel

LOSSLESS = "lossless: full model (exact)"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass(frozen=True)
class Prepared:
    """A request ready for the engine, and what its response reports about it."""

    request: Request
    mode: str  # "lossless" or "calm"
    decoding: str  # the policy that runs, in words
    prompt_tokens: int


def completion_ids(model: CalmModel, body: CompletionRequest) -> list[int]:
    """/v1/completions: the prompt as given (no chat template); token ids must be in the vocabulary."""
    prompt = body.one_prompt()
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ServingError("this model has no tokenizer: send the prompt as token ids", param="prompt")
        return prompt_ids(model.tokenizer, prompt, chat=False)
    vocab = model.adapter.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ServingError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
    return list(prompt)


def chat_ids(model: CalmModel, body: ChatRequest) -> list[int]:
    """/v1/chat/completions: the messages through the model's chat template, ready for the assistant's turn."""
    tokenizer = model.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ServingError("this model has no chat template: use /v1/completions", param="messages")
    messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
    try:
        ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # the template's own checks (e.g. roles that must alternate)
        raise ServingError(f"the chat template refused the messages: {exc}", param="messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prepare(
    model: CalmModel, body: Sampling, ids: list[int], default_budget: int | None, lossless: str = LOSSLESS
) -> Prepared:
    """The engine request for a body whose prompt is `ids`. default_budget: max_tokens when the body has
    none (None: the rest of the context). lossless: what a lossless request runs, in words."""
    asked = body.budget() if isinstance(body, ChatRequest) else body.max_tokens
    prompt_field = "messages" if isinstance(body, ChatRequest) else "prompt"
    ids, budget = fit_context(
        model, ids, asked if asked is not None else default_budget, body.calm.truncate, prompt_field
    )
    if not ids:
        raise ServingError(f"the {prompt_field} is empty (no tokens)", param=prompt_field)
    policy, mode, decoding = exit_policy(model, body, lossless)
    return Prepared(Request(tuple(ids), budget, policy, sampling(body)), mode, decoding, len(ids))


def fit_context(
    model: CalmModel, ids: list[int], budget: int | None, truncate: bool, prompt_field: str = "prompt"
) -> tuple[list[int], int]:
    """The prompt and the budget within the context: a prompt that leaves no room for max_tokens is a 400,
    or keeps its last tokens when the request asks for truncation (calm.truncate). An encoder-decoder's
    prompt goes to its encoder: no shared context to fit (as calm.prompts.encoding)."""
    context = None if model.adapter.is_encoder_decoder else model.max_context
    if context is None:
        if budget is None:
            raise ServingError("this model has no context length: give max_tokens", param="max_tokens")
        return ids, budget
    if budget is None:
        budget = context - len(ids)
        if budget < 1:
            raise ServingError(f"the {prompt_field} fills the context of {context} tokens", param=prompt_field)
    if budget >= context:
        raise ServingError(
            f"max_tokens={budget} leaves no room for a prompt in the context of {context} tokens", param="max_tokens"
        )
    room = context - budget
    if len(ids) > room:
        if not truncate:
            raise ServingError(
                f"the {prompt_field} has {len(ids)} tokens but only {room} fit in the context of {context} with "
                f"max_tokens={budget}; shorten it, lower max_tokens, or send calm.truncate=true",
                param=prompt_field,
            )
        ids = ids[len(ids) - room :]
    return ids, budget


def sampling(body: Sampling) -> SamplingConfig:
    """temperature 0 (or none given: calm's default is the exact, greedy output) is greedy; above 0 samples."""
    if not body.temperature:
        return SamplingConfig(seed=body.seed)
    return SamplingConfig(do_sample=True, temperature=body.temperature, top_p=body.top_p or 1.0, seed=body.seed)


def exit_policy(model: CalmModel, body: Sampling, lossless: str = LOSSLESS) -> tuple[ExitPolicy, str, str]:
    """The `calm` object's policy, its mode, and what runs in words: lossless is the full model (the
    scheduler may draft and verify, with the same output); calm exits early at the knob's threshold."""
    options = body.calm
    mode = options.resolved_mode()
    if mode == "lossless":
        sampled = body.temperature is not None and body.temperature > 0
        return ExitPolicy.never(), mode, "lossless: full model (exact), sampled" if sampled else lossless
    try:
        policy = model.policy(speed=options.speed, tolerance=options.tolerance, threshold=options.threshold)
    except CalmError as exc:
        knob = next((k for k in ("speed", "tolerance", "threshold") if getattr(options, k) is not None), None)
        raise ServingError(str(exc), param=f"calm.{knob}" if knob else "calm") from None
    return policy, mode, policy.describe()
