"""Prompts: the instruction a document goes into, the chat template around it, and how a document is
cut to fit the context. Only the document is ever cut, never the instruction, and every cut is
recorded in the Prompt; cuts that the context forced are also logged (logger "calm"), so that no
caller loses text without a word.

    template = PromptTemplate("Summarize the following article in one sentence.\\n\\n{document}")
    prompt = fit_prompt(PromptFormat.for_model(model, max_new_tokens=64), document, template)
    prompt.text, prompt.truncated, prompt.kept_tokens, prompt.document_tokens
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from calm.errors import InputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from calm.adapters.base import Adapter

PLACEHOLDER = "{document}"
SUMMARY_TEMPLATE = "Summarize the following article in one sentence.\n\n{document}"
CONTEXT, MAX_DOC_TOKENS = "context", "max_doc_tokens"  # what cut a document

logger = logging.getLogger("calm")


class PromptModel(Protocol):
    """What prompts are encoded for: a model's tokenizer, adapter (encoder-decoder or not, vocabulary),
    context length, pad token and device. CalmModel is one."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None: ...

    @property
    def adapter(self) -> Adapter: ...

    @property
    def max_context(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int: ...

    @property
    def device(self) -> torch.device: ...


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction with exactly one {document} placeholder; the rest is kept verbatim (braces too)."""

    text: str = SUMMARY_TEMPLATE

    def __post_init__(self) -> None:
        count = self.text.count(PLACEHOLDER)
        if count != 1:
            found = "has no" if count == 0 else f"has {count}"
            raise InputError(
                f"the prompt template {found} {PLACEHOLDER} placeholder; it needs exactly one, where "
                f'the document goes, e.g. "Summarize this article:\\n\\n{PLACEHOLDER}"'
            )

    def render(self, document: str) -> str:
        return self.text.replace(PLACEHOLDER, document.strip())


DEFAULT_TEMPLATE = PromptTemplate()


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and how much of its document it holds (in the tokenizer's tokens)."""

    text: str
    document_tokens: int
    kept_tokens: int
    cut_by: str | None = None  # None, CONTEXT (to fit the model) or MAX_DOC_TOKENS (asked for)

    @property
    def truncated(self) -> bool:
        return self.kept_tokens < self.document_tokens


@dataclass(frozen=True)
class PromptFormat:
    """How a model reads a prompt: its tokenizer, whether the chat template wraps the text, and how
    many prompt tokens the context holds next to the new tokens (None: no limit, as for T5)."""

    tokenizer: Any
    chat: bool = False
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 0

    @classmethod
    def for_model(cls, model: PromptModel, max_new_tokens: int, chat: bool | None = None) -> PromptFormat:
        if model.tokenizer is None:
            raise InputError("text prompts need a tokenizer: pass one to CalmModel.from_model, or give token ids")
        encoder_decoder = model.adapter.is_encoder_decoder
        context = None if encoder_decoder or model.max_context is None else model.max_context - max_new_tokens
        if context is not None and context < 1:
            raise InputError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {model.max_context}"
            )
        return cls(model.tokenizer, uses_chat(model.tokenizer, encoder_decoder, chat), context, max_new_tokens)

    def ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self.chat)


def uses_chat(tokenizer: Any, encoder_decoder: bool, chat: bool | None = None) -> bool:
    """Whether text prompts get the chat template: as asked, else when the tokenizer has one (decoders)."""
    if chat is not None:
        return chat
    return bool(getattr(tokenizer, "chat_template", None)) and not encoder_decoder


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """The token ids of a text prompt, as one user turn of the chat template when `chat`."""
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text)["input_ids"])


def document_ids(tokenizer: Any, document: str) -> list[int]:
    return tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]


def truncate_document(tokenizer: Any, document: str, max_tokens: int | None) -> str:
    """The document cut to its first max_tokens tokens (decoded back to text); None keeps it whole."""
    if max_tokens is None:
        return document.strip()
    return _first_tokens(tokenizer, document, document_ids(tokenizer, document), max_tokens)


def decode_text(tokenizer: PreTrainedTokenizerBase | None, ids: Sequence[int]) -> str:
    """One sequence of token ids as text, without special tokens. (transformers types `decode` as
    str | list[str]: one sequence of ids decodes to one str.)"""
    if tokenizer is None:
        raise InputError("decoding token ids needs a tokenizer")
    return cast(str, tokenizer.decode(list(ids), skip_special_tokens=True))


def summary_prompt(document: str) -> str:
    """The default summarisation prompt around a whole document."""
    return DEFAULT_TEMPLATE.render(document)


def fit_prompt(
    fmt: PromptFormat,
    document: str,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    max_doc_tokens: int | None = None,
    truncate: bool = True,
    name: str = "document",
) -> Prompt:
    """The template around as much of the document as fits: at most max_doc_tokens, and what the
    context leaves after the instruction and the new tokens. A document that does not fit the context
    is cut (truncate) or refused with an InputError naming `name`."""
    ids = document_ids(fmt.tokenizer, document)
    keep, cut_by = len(ids), None
    if max_doc_tokens is not None and keep > max_doc_tokens:
        keep, cut_by = max_doc_tokens, MAX_DOC_TOKENS
    room = _document_room(fmt, template)
    while True:
        if room is not None and keep > room:
            if not truncate:
                raise InputError(_too_long(fmt, name, len(ids), room))
            keep, cut_by = room, CONTEXT
        text = template.render(document if keep == len(ids) else _first_tokens(fmt.tokenizer, document, ids, keep))
        excess = 0 if fmt.max_prompt_tokens is None else len(fmt.ids(text)) - fmt.max_prompt_tokens
        if excess <= 0:
            return Prompt(text, len(ids), keep, cut_by)
        room = keep - excess  # the document tokenizes a little longer inside the prompt
        if room < 1:
            raise InputError(_too_long(fmt, name, len(ids), 0))


def fit_prompts(
    fmt: PromptFormat,
    documents: Sequence[tuple[str, str]],
    template: PromptTemplate = DEFAULT_TEMPLATE,
    max_doc_tokens: int | None = None,
    truncate: bool = True,
) -> list[Prompt]:
    """fit_prompt for each (name, document); every cut the context forced is logged as a warning."""
    prompts = [fit_prompt(fmt, doc, template, max_doc_tokens, truncate, name) for name, doc in documents]
    for (name, _), prompt in zip(documents, prompts):
        if prompt.cut_by == CONTEXT:
            logger.warning(truncation_note(name, prompt))
    return prompts


def truncation_note(name: str, prompt: Prompt) -> str:
    """e.g. 'document 3: kept the first 8,176 of 42,059 tokens'."""
    return f"{name}: kept the first {prompt.kept_tokens:,} of {prompt.document_tokens:,} tokens"


def _document_room(fmt: PromptFormat, template: PromptTemplate) -> int | None:
    """Document tokens the context leaves next to the instruction (None: no limit)."""
    if fmt.max_prompt_tokens is None:
        return None
    instruction = len(fmt.ids(template.render("")))
    room = fmt.max_prompt_tokens - instruction
    if room < 1:
        raise InputError(
            f"the prompt template alone takes {instruction:,} tokens, which leaves no room for a "
            f"document in a context of {fmt.max_prompt_tokens + fmt.max_new_tokens:,} tokens with "
            f"max_new_tokens={fmt.max_new_tokens}; shorten the template or lower max_new_tokens"
        )
    return room


def _too_long(fmt: PromptFormat, name: str, tokens: int, room: int) -> str:
    context = (fmt.max_prompt_tokens or 0) + fmt.max_new_tokens
    return (
        f"{name} has {tokens:,} tokens, but a context of {context:,} holds only {room:,} of them with "
        f"max_new_tokens={fmt.max_new_tokens}; shorten it or lower max_new_tokens"
    )


def _first_tokens(tokenizer: Any, document: str, ids: Sequence[int], keep: int) -> str:
    if keep >= len(ids):
        return document.strip()
    return tokenizer.decode(list(ids[: max(0, keep)]), skip_special_tokens=True).strip()
