"""Tests for calm.training on a tiny random Llama saved to disk with a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm import training as tr
from calm.cli.train import train_command
from calm.checkpoint import HEADS_FILE, read_config
from calm.errors import InputError
from calm.model import CalmModel
from calm.policy import ExitPolicy
from calm.training import TrainConfig, layer_weights, train

WORDS = ("the council said a new road will open in the town next year after work on the bridge ends "
         "police arrested two men and a woman on friday the club signed a striker from a rival team "
         "scientists found that the river water was warmer than last summer because of the long drought").split()


def _text(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())


def _tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny backbone directory (safetensors + tokenizer) and small training files."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("training")
    corpus = [_text(i, 60) for i in range(40)]
    tok = _tokenizer(corpus)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    backbone = root / "backbone"
    model.save_pretrained(backbone, safe_serialization=True)
    tok.save_pretrained(backbone)
    docs = root / "train.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "document": _text(100 + i, 40), "summary": _text(200 + i, 8)}) + "\n"
                            for i in range(6)))
    text = root / "wiki.txt"
    text.write_text("\n".join(_text(300 + i, 50) for i in range(8)))
    return {"root": root, "backbone": str(backbone), "docs": str(docs), "text": str(text)}


def _config(setup, out, **kw) -> TrainConfig:
    base = dict(data=(setup["docs"], setup["text"]), out=str(out), model=setup["backbone"], steps=6, batch_size=16,
                layers_per_step=2, lr=1e-2, rank=4, summary_tokens=6, max_doc_tokens=48, gen_batch_size=4,
                chunk_tokens=32, max_chunks=6, positions_per_chunk=8, checkpoint_every=2, log_every=1, device="cpu",
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _heads_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / HEADS_FILE))


# ---------------------------------------------------------------------------------------------

def test_losses_decrease(setup, tmp_path):
    result = train(_config(setup, tmp_path / "out", steps=80, lr=3e-2, batch_size=32, log_every=20,
                           checkpoint_every=80), progress=False)
    first, last = result.history[0], result.history[-1]      # means over steps 1-20 and 61-80
    assert last["kl"] < 0.85 * first["kl"]
    assert last["bce"] < 0.95 * first["bce"]
    assert last["agree"] > first["agree"]                    # more layers now predict the final token
    assert result.steps_this_run == 80 and result.num_positions > 0
    assert result.summaries_generated == 6                   # one greedy summary per document
    assert (tmp_path / "out" / "training" / tr.SUMMARIES_FILE).is_file()


def test_frozen_backbone_gets_no_gradient(setup, tmp_path, monkeypatch):
    import calm.loading
    captured = {}
    real = calm.loading.load_backbone

    def spy(*args, **kwargs):
        captured["loaded"] = real(*args, **kwargs)
        captured["before"] = {k: v.clone() for k, v in captured["loaded"].model.state_dict().items()}
        return captured["loaded"]

    monkeypatch.setattr(calm.loading, "load_backbone", spy)
    result = train(_config(setup, tmp_path / "out", steps=4), progress=False)
    model = captured["loaded"].model
    for name, param in model.named_parameters():
        assert param.grad is None, name
        assert not param.requires_grad, name
        assert torch.equal(param.detach(), captured["before"][name]), name
    heads = result.heads
    assert heads.up.abs().sum() > 0                          # B_k started at zero and moved
    assert heads.cls_weight.abs().sum() > 0


def test_heads_objective_sends_gradient_only_to_heads(setup):
    from calm.adapters import adapter_for
    from calm.heads import ExitHeads, HeadsConfig
    from calm.loading import load_backbone
    model = load_backbone(setup["backbone"]).model
    model.requires_grad_(False)
    a = adapter_for(model)
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4))
    with torch.no_grad():
        heads.up.normal_()
    obj = tr.HeadsObjective(heads, a)
    h = torch.randn(6, 64)
    kl, logit, labels = obj(h, torch.tensor([1, 2, 3, 1, 2, 3]), torch.randn(2, 64), torch.tensor([0, 0, 0, 1, 1, 1]))
    (kl.mean() + torch.nn.functional.binary_cross_entropy_with_logits(logit, labels)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert heads.down.grad is not None and heads.up.grad is not None and heads.cls_weight.grad is not None
    assert set(labels.tolist()) <= {0.0, 1.0} and (kl >= -1e-5).all()
    # the vectorised classifier logit is ExitHeads' own
    with torch.no_grad():
        heads.cls_weight.normal_()
        for k in (1, 2, 3):
            rows = torch.tensor([k, k, k, k, k, k])
            torch.testing.assert_close(tr.classifier_logits(heads, h, rows), heads.classifier_logit(h, k))


def test_finetune_layer_weights_follow_layer_index(setup, tmp_path):
    w = layer_weights(4)
    torch.testing.assert_close(w, torch.tensor([1, 2, 3, 4]) / 10.0)
    assert torch.all(w[1:] > w[:-1]) and torch.isclose(w.sum(), torch.tensor(1.0))
    w30 = layer_weights(30)
    torch.testing.assert_close(w30 / w30[0], torch.arange(1, 31, dtype=torch.float32))

    out = tmp_path / "ft"
    result = train(_config(setup, out, mode="finetune", steps=3, batch_size=2, lr=1e-3, checkpoint_every=3), progress=False)
    assert result.heads is None and result.final_losses["loss"] > 0
    # loss = sum_k w_k CE_k, so it lies between the first and the last layer's CE only in mixture; check the record
    cfg = read_config(out)
    assert cfg.backbone == "backbone" and cfg.heads is None
    assert cfg.extra["training"]["mode"] == "finetune"
    tuned = CalmModel.from_pretrained(str(out))
    original = CalmModel.from_pretrained(setup["backbone"])
    changed = [not torch.equal(p, q) for p, q in zip(tuned.model.parameters(), original.model.parameters())]
    assert any(changed)


def test_finetune_objective_is_the_weighted_layer_loss(setup):
    from calm.adapters import adapter_for
    from calm.loading import load_backbone
    model = load_backbone(setup["backbone"]).model
    a = adapter_for(model)
    obj = tr.FinetuneObjective(model, a, tr.last_state_is_normed(model, a, torch.device("cpu")))
    ids = torch.randint(3, 300, (1, 10))
    rows, cols = torch.zeros(9, dtype=torch.long), torch.arange(9)
    per_layer = obj(ids, torch.ones_like(ids), rows, cols, ids[0, 1:])
    assert per_layer.shape == (4,)
    with torch.no_grad():
        full = model(ids).logits[0, :9]
    torch.testing.assert_close(per_layer[-1], torch.nn.functional.cross_entropy(full, ids[0, 1:]), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(setup, tmp_path):
    out = tmp_path / "ckpt"
    result = train(_config(setup, out, steps=4), command="calm train --test", progress=False)
    calm = CalmModel.from_pretrained(str(out))
    loaded = calm.heads.state_dict()
    for name, value in result.heads.state_dict().items():
        assert torch.equal(loaded[name], value), name
    cfg = read_config(out)
    assert cfg.backbone == str(Path(setup["backbone"]).resolve())
    training = cfg.extra["training"]
    assert training["command"] == "calm train --test"
    assert training["steps"] == 4 and training["config"]["rank"] == 4
    assert [d["path"] for d in training["data"]] == [setup["docs"], setup["text"]]
    assert {"kl", "bce"} <= set(training["final_losses"])
    res = calm.generate([[5, 6, 7]], max_new_tokens=4, policy=ExitPolicy(measure="classifier", threshold=0.5))
    assert len(res.token_ids[0]) >= 1


def test_resume_gives_the_same_heads(setup, tmp_path):
    full = train(_config(setup, tmp_path / "a", steps=7, checkpoint_every=2), progress=False)

    class Interrupt(Exception):
        pass

    def stop(step, losses):
        if step == 5:
            raise Interrupt

    cfg = _config(setup, tmp_path / "b", steps=7, checkpoint_every=2)
    with pytest.raises(Interrupt):
        train(cfg, progress=False, callback=stop)
    assert read_config(tmp_path / "b").extra["training"]["steps"] == 4
    resumed = train(TrainConfig(**{**cfg.to_dict(), "data": cfg.data, "resume": True}), progress=False)
    assert resumed.resumed_from == 4 and resumed.steps_this_run == 3
    assert resumed.summaries_generated == 0                  # from the cache in the work dir
    a, b = _heads_tensors(tmp_path / "a"), _heads_tensors(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name                # bitwise on CPU
    assert full.final_losses["kl"] == pytest.approx(resumed.final_losses["kl"], rel=1e-5)


def test_resume_refuses_other_settings(setup, tmp_path):
    cfg = _config(setup, tmp_path / "c", steps=2)
    train(cfg, progress=False)
    with pytest.raises(InputError, match="rank"):
        train(TrainConfig(**{**cfg.to_dict(), "data": cfg.data, "resume": True, "rank": 8}), progress=False)


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", b"", "holds no records"),
    ("blank.jsonl", b'{"document": "  "}\n', "no records with a non-empty document"),
    ("number.jsonl", b'{"document": 3}\n', "not text"),
    ("list.jsonl", b'[1, 2]\n', "expected a JSON object"),
    ("nofield.jsonl", b'{"text": "a story"}\n', "no field 'document'"),
    ("latin1.jsonl", '{"document": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
    ("notjson.jsonl", b"{document: 1}\n", "not valid JSON"),
    ("empty.txt", b"  \n", "is empty"),
    ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), "not UTF-8"),
    ("data.csv", b"a,b\n", "unsupported training data file"),
])
def test_bad_data_is_a_clear_input_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    # the data is read before any model is loaded: the model need not even exist
    with pytest.raises(InputError, match=message):
        train(TrainConfig(data=(str(path),), out=str(tmp_path / "out"), model=str(tmp_path / "no-model")), progress=False)


def test_empty_documents_are_skipped_and_recorded(setup, tmp_path):
    docs = tmp_path / "docs.jsonl"
    lines = Path(setup["docs"]).read_text().splitlines()
    docs.write_text("\n".join(lines[:2] + ['{"id": "g", "document": "", "summary": "a gallery"}'] + lines[2:4]) + "\n")
    data = tr.read_training_data([str(docs)])
    assert len(data.documents) == 4 and data.files[0]["skipped_empty_documents_at_lines"] == [3]
    train(_config(setup, tmp_path / "o", data=(str(docs),), steps=1), progress=False)
    assert read_config(tmp_path / "o").extra["training"]["data"][0]["skipped_empty_documents_at_lines"] == [3]


def test_missing_file_and_bad_settings(tmp_path):
    with pytest.raises(InputError, match="not found"):
        train(TrainConfig(data=(str(tmp_path / "nope.jsonl"),), out=str(tmp_path / "o")), progress=False)
    with pytest.raises(InputError, match="mode"):
        TrainConfig(data=("x.jsonl",), out="o", mode="distill")
    with pytest.raises(InputError, match="steps"):
        TrainConfig(data=("x.jsonl",), out="o", steps=0)
    with pytest.raises(InputError, match="no training data"):
        TrainConfig(data=(), out="o")


def test_sampler_and_schedule_are_deterministic():
    s = tr.EpochSampler(10, seed=1)
    first = torch.cat([s.indices(step, 4) for step in range(5)])
    assert sorted(first[:10].tolist()) == list(range(10))        # one epoch is a permutation
    again = tr.EpochSampler(10, seed=1)
    assert torch.equal(again.indices(3, 4), s.indices(3, 4))       # a function of (seed, step) alone
    cfg = TrainConfig(data=("x.jsonl",), out="o", steps=100, lr=1.0, warmup=0.1)
    lrs = [tr.learning_rate(cfg, i) for i in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1) and lrs[-1] >= 0.1 - 1e-9
    assert max(lrs) <= 1.0 + 1e-9


def test_cli_and_agreement_report(setup, tmp_path):
    from click.testing import CliRunner
    out = tmp_path / "cli"
    args = ["--model", setup["backbone"], "--data", setup["docs"], "--data", setup["text"], "--out", str(out),
            "--steps", "3", "--batch-size", "8", "--rank", "4", "--seed", "1", "--summary-tokens", "5",
            "--max-doc-tokens", "40", "--chunk-tokens", "32", "--max-chunks", "4", "--device", "cpu", "--quiet"]
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "s/step" in res.output
    assert read_config(out).extra["training"]["command"].startswith("train --model ")
    assert read_config(out).extra["training"]["command"].endswith("--device cpu --quiet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"summary": "x"}\n')
    res = CliRunner().invoke(train_command, ["--data", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no field 'document'" in res.output

    report = tr.agreement_report(str(out), setup["docs"], num_docs=3, summary_tokens=5, max_doc_tokens=40,
                                 progress=False)
    assert report["layers"] == [1, 2, 3] and report["positions"] > 0
    assert all(0 <= v <= 1 for v in report["plain"] + report["heads"])
    md = tr.agreement_markdown(report)
    assert "| 3 |" in md and "before" in md
