"""Shared test helpers: tiny random models and a word-level tokenizer, JSONL files, the CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from calm.cli.main import cli

# Where the parity tests run: the CPU, or CALM_TEST_DEVICE=cuda (benchmarks/device_check.sh on a GPU machine).
TEST_DEVICE = torch.device(os.environ.get("CALM_TEST_DEVICE", "cpu"))


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    """A random 4-layer Llama (hidden 64, vocab 128) whose greedy choices are not near-ties."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


NUM_LAYERS = 4
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>"]
WORDS = (
    "Summarize the following article in one sentence . a an cat sat on mat dog ran park council said new plan "
    "for city school children home police man woman was is were had has two three year years after before "
    "match game team won lost goal week people government minister report"
).split()
DOCS = [
    {"id": "a", "document": "the cat sat on the mat . a dog ran in the park", "summary": "cat sat on mat"},
    {"id": "b", "document": "the council said a new plan for the city school", "summary": "council plan for school"},
    {"id": "c", "document": "police said a man was home after the match", "summary": "man was home after match"},
    {"id": "d", "document": "the team won the game after two goal in one week", "summary": "team won game"},
]


def build_tiny_model(path: Path, initializer_range: float = 0.02) -> Path:
    """A 4-layer random Llama (hidden 64) and a WordLevel tokenizer, saved as safetensors in `path`.
    A larger initializer_range gives peaked (non-uniform) next-token distributions."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["[PAD]"],
        initializer_range=initializer_range,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_clean_error(result, *fragments: str) -> None:
    """Non-zero exit, a one-line 'Error: ...' naming the problem, and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], result.output
