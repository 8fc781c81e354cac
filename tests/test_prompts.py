"""calm.prompts.templates: the template, the chat template, and cutting documents (never the instruction) to fit,
with every cut recorded and the context's cuts logged."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from calm.errors import InputError
from calm.prompts.documents import summary_prompt as data_summary_prompt
from calm.prompts.documents import truncate_document as data_truncate_document
from calm.prompts.templates import (
    CONTEXT,
    MAX_DOC_TOKENS,
    SUMMARY_TEMPLATE,
    Prompt,
    PromptFormat,
    PromptTemplate,
    fit_prompt,
    fit_prompts,
    summary_prompt,
    truncate_document,
    truncation_note,
)

WORDS = ["the", "cat", "sat", "on", "the", "mat", ".", "a", "dog", "ran", "in", "the", "park"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def doc(n: int) -> str:
    """n words of the tiny vocabulary: n tokens for its word-level tokenizer."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def fmt(tokenizer, max_prompt_tokens: int | None = 60, max_new_tokens: int = 4) -> PromptFormat:
    return PromptFormat(tokenizer, chat=False, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)


def test_template_needs_exactly_one_placeholder():
    assert PromptTemplate().text == SUMMARY_TEMPLATE
    for text in ("Summarize:", "{document} and {document}"):
        with pytest.raises(InputError, match=r"\{document\}"):
            PromptTemplate(text)
    template = PromptTemplate('Reply as JSON {"summary": ...}:\n{document}')
    assert template.render("  the cat  ") == 'Reply as JSON {"summary": ...}:\nthe cat'  # braces stay as they are


def test_the_old_names_still_work():
    assert data_summary_prompt is summary_prompt and data_truncate_document is truncate_document
    assert summary_prompt("  An article.  ") == "Summarize the following article in one sentence.\n\nAn article."


def test_a_document_that_fits_is_kept_whole(tokenizer):
    prompt = fit_prompt(fmt(tokenizer), "  " + doc(10) + " ")
    assert prompt == Prompt(summary_prompt(doc(10)), 10, 10, None)
    assert not prompt.truncated


def test_max_doc_tokens_cuts_as_truncate_document_does(tokenizer):
    prompt = fit_prompt(fmt(tokenizer), doc(20), max_doc_tokens=6)
    assert prompt.text == summary_prompt(truncate_document(tokenizer, doc(20), 6)) == summary_prompt(doc(6))
    assert (prompt.kept_tokens, prompt.document_tokens, prompt.cut_by, prompt.truncated) == (
        6,
        20,
        MAX_DOC_TOKENS,
        True,
    )


def test_the_context_cuts_the_document_and_never_the_instruction(tokenizer):
    template = PromptTemplate("{document} . Summarize the following article in one sentence .")
    f = fmt(tokenizer, max_prompt_tokens=30)
    instruction = len(f.ids(template.render("")))
    prompt = fit_prompt(f, doc(100), template)
    assert prompt.cut_by == CONTEXT and prompt.document_tokens == 100
    assert prompt.kept_tokens == 30 - instruction
    assert len(f.ids(prompt.text)) <= 30
    assert prompt.text == template.render(doc(30 - instruction))  # the first tokens, then the whole instruction


def test_no_limit_for_encoder_decoders(tokenizer):
    prompt = fit_prompt(fmt(tokenizer, max_prompt_tokens=None), doc(500))
    assert prompt.kept_tokens == prompt.document_tokens == 500


def test_refusing_to_cut(tokenizer):
    with pytest.raises(InputError, match=r"document 7 has 100 tokens, but a context of 34 holds only \d+ of them"):
        fit_prompt(fmt(tokenizer, max_prompt_tokens=30), doc(100), truncate=False, name="document 7")
    assert fit_prompt(fmt(tokenizer, max_prompt_tokens=30), doc(5), truncate=False).kept_tokens == 5


def test_a_template_that_fills_the_context_alone(tokenizer):
    template = PromptTemplate(doc(40) + " {document}")
    with pytest.raises(InputError, match="the prompt template alone takes"):
        fit_prompt(fmt(tokenizer, max_prompt_tokens=30), doc(3), template)


def test_the_context_cuts_are_logged_and_asked_for_cuts_are_not(tokenizer, caplog):
    f = fmt(tokenizer, max_prompt_tokens=30)
    with caplog.at_level(logging.WARNING, logger="calm"):
        prompts = fit_prompts(f, [("document a", doc(5)), ("document b", doc(100))])
        prompts += fit_prompts(f, [("document c", doc(20))], max_doc_tokens=12)
    assert [p.cut_by for p in prompts] == [None, CONTEXT, MAX_DOC_TOKENS]
    assert [r.getMessage() for r in caplog.records] == [
        f"document b: kept the first {prompts[1].kept_tokens} of 100 tokens"
    ]


def test_truncation_note_format():
    assert truncation_note("document 3", Prompt("", 42059, 8176)) == "document 3: kept the first 8,176 of 42,059 tokens"


def test_format_for_a_model(tiny_model):
    from calm.model import CalmModel

    model = CalmModel.from_pretrained(tiny_model)
    f = PromptFormat.for_model(model, max_new_tokens=56)
    assert f.max_prompt_tokens == 256 - 56 and not f.chat
    prompt = fit_prompt(f, doc(400))
    batch = model.encode_prompts(prompt.text, 56)  # fits exactly: no error, nothing more to cut
    assert batch.ids.shape[1] == 200 and prompt.truncated
    with pytest.raises(InputError, match="leaves no room"):
        PromptFormat.for_model(model, max_new_tokens=256)
