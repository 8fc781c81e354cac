"""The calm.training tests' tiny backbone (a random 4-layer Llama with a byte-level BPE tokenizer saved
to disk), their data files, and the settings of short runs on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from calm.training import TrainConfig
from helpers import DOCS, write_jsonl

WORDS = (
    "the council said a new road will open in the town next year after work on the bridge ends "
    "police arrested two men and a woman on friday the club signed a striker from a rival team "
    "scientists found that the river water was warmer than last summer because of the long drought"
).split()


def text(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())


def _tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def build_training_setup(root: Path) -> dict[str, str]:
    """A tiny backbone directory (safetensors + tokenizer), 6 documents with summaries and a text file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer([text(i, 60) for i in range(40)])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    backbone = root / "backbone"
    LlamaForCausalLM(cfg).eval().save_pretrained(backbone, safe_serialization=True)
    tok.save_pretrained(backbone)
    docs = root / "train.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": str(i), "document": text(100 + i, 40), "summary": text(200 + i, 8)}) + "\n"
            for i in range(6)
        )
    )
    wiki = root / "wiki.txt"
    wiki.write_text("\n".join(text(300 + i, 50) for i in range(8)))
    return {"root": str(root), "backbone": str(backbone), "docs": str(docs), "text": str(wiki)}


def training_config(setup: dict[str, str], out: Path, **kw) -> TrainConfig:
    """A short run (mode heads unless kw says otherwise) on the tiny backbone."""
    base = dict(
        data=(setup["docs"], setup["text"]),
        out=str(out),
        model=setup["backbone"],
        steps=6,
        batch_size=16,
        layers_per_step=2,
        lr=1e-2,
        rank=4,
        summary_tokens=6,
        max_doc_tokens=48,
        gen_batch_size=4,
        chunk_tokens=32,
        max_chunks=6,
        positions_per_chunk=8,
        checkpoint_every=2,
        log_every=1,
        device="cpu",
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def lora_config(model: str, tmp_path: Path, **kw) -> TrainConfig:
    """A short mode-lora run on helpers.build_tiny_model's model, with DOCS as the data."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", DOCS)
    base = dict(
        data=(str(data),),
        out=str(tmp_path / "out"),
        model=model,
        mode="lora",
        steps=12,
        batch_size=2,
        layers_per_step=2,
        lr=3e-3,
        rank=4,
        lora_rank=4,
        min_exit_layer=1,
        doc_positions=4,
        max_doc_tokens=48,
        summary_tokens=8,
        checkpoint_every=4,
        log_every=1,
        device="cpu",
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)
