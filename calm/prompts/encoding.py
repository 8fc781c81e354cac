"""What CalmModel.generate accepts as prompts (strings, token ids, a [B, T] tensor with its attention mask),
checked and tokenized into one left-padded PromptBatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from calm.engine.generation import PromptBatch
from calm.errors import InputError
from calm.prompts.templates import PromptModel, prompt_ids, truncate_document, uses_chat

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def encode_prompts(
    model: PromptModel,
    prompts: Prompts,
    max_new_tokens: int,
    chat: bool | None = None,
    truncate: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> PromptBatch:
    """Token ids of the prompts, left-padded into one batch on the model's device."""
    rows = token_rows(model, prompt_list(prompts, attention_mask, model.pad_token_id), max_new_tokens, chat, truncate)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = True
    return PromptBatch(ids=ids.to(model.device), mask=mask.to(model.device))


def token_rows(
    model: PromptModel, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, chat: bool | None, truncate: bool
) -> list[list[int]]:
    """Each prompt's token ids, checked: not empty, in the vocabulary, and within the context next to
    max_new_tokens (text prompts are cut to fit when truncate is set)."""
    if len(prompts) == 0:
        raise InputError("no prompts given")
    context = model.max_context
    budget = None if context is None or model.adapter.is_encoder_decoder else context - max_new_tokens
    if budget is not None and budget < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {context}")
    rows = [_tokenize(model, p, chat, truncate, budget) for p in prompts]
    vocab = model.adapter.vocab_size
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise InputError(f"prompt {i} is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in row):
            raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
        if budget is not None and len(row) > budget:
            raise InputError(
                f"prompt {i} has {len(row)} tokens but only {budget} fit in the context of "
                f"{context} with max_new_tokens={max_new_tokens}; shorten it or pass truncate=True"
            )
    return rows


def _tokenize(
    model: PromptModel, prompt: str | Sequence[int], chat: bool | None, truncate: bool, budget: int | None
) -> list[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if not prompt.strip():
        raise InputError("empty prompt: give some text to generate from")
    if model.tokenizer is None:
        raise InputError("text prompts need a tokenizer: pass one to CalmModel.from_model, or give token ids")
    use_chat = uses_chat(model.tokenizer, model.adapter.is_encoder_decoder, chat)
    if truncate and budget is not None:
        overhead = len(prompt_ids(model.tokenizer, "", use_chat))
        prompt = truncate_document(model.tokenizer, prompt, max(1, budget - overhead))
    return prompt_ids(model.tokenizer, prompt, use_chat)


def prompt_list(prompts: Prompts, attention_mask: torch.Tensor | None, pad_token_id: int) -> list[str | Sequence[int]]:
    """One entry per prompt: a string or a list of token ids (a flat list of ints is one prompt)."""
    if isinstance(prompts, torch.Tensor):
        return list(tensor_rows(prompts, attention_mask, pad_token_id))
    if attention_mask is not None:
        raise InputError("attention_mask goes with a [batch, tokens] tensor of prompts; lists need no mask")
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)  # user input: token_rows checks every entry
    if items and all(isinstance(t, int) for t in items):
        return [items]
    return items


def tensor_rows(ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int) -> list[list[int]]:
    """The real tokens of each row of a [B, T] tensor: those attention_mask keeps (left or right padding).
    Without a mask every token is real, so a row that starts or ends with the pad id is refused."""
    if ids.dim() != 2:
        raise InputError(f"a tensor of prompts must be [batch, tokens], got shape {tuple(ids.shape)}")
    if attention_mask is None:
        edges = torch.cat([ids[:, :1], ids[:, -1:]], 1) == pad_token_id  # [B, 2]
        if ids.numel() and bool(edges.any()):
            row = int(edges.any(1).nonzero()[0, 0])
            raise InputError(
                f"prompt {row} starts or ends with the pad token id {pad_token_id}: pass the "
                "tokenizer's attention_mask (generate(ids, attention_mask=mask)) so that padding is not "
                "read as input"
            )
        return ids.tolist()
    if tuple(attention_mask.shape) != tuple(ids.shape):
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)} but the prompts {tuple(ids.shape)}")
    mask = attention_mask.to(device=ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.bool()
    blocks = mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)  # runs of tokens per row
    if bool((blocks > 1).any()):
        row = int((blocks > 1).nonzero()[0, 0])
        raise InputError(
            f"attention_mask row {row} has padding between tokens; only left or right padding is supported"
        )
    return [r[m].tolist() for r, m in zip(ids, mask)]
