import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from calm import CalmModel, ExitPolicy
from calm.calibration.table import CalibrationRow, CalibrationTable
from calm.checkpoints.checkpoint import CONFIG_FILE, HEADS_FILE
from calm.errors import CheckpointError, InputError, ModelNotFoundError, PolicyError
from calm.exits.heads import ExitHeads, HeadsConfig
from helpers import tiny_llama


@pytest.fixture
def backbone_dir(tmp_path):
    path = tmp_path / "backbone"
    tiny_llama().save_pretrained(path, safe_serialization=True)
    return path


def trained_heads(seed=3):
    torch.manual_seed(seed)
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    return heads


def test_generate_from_token_ids_matches_transformers(llama):
    model = CalmModel.from_model(llama)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=8)
    hf = llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=1)[0, 6:].tolist()
    assert list(out.token_ids[0]) == hf[: len(out.token_ids[0])]
    assert out.avg_layers == 4.0 and out.texts == ()


def test_save_and_load_checkpoint_round_trip(backbone_dir, tmp_path):
    model = CalmModel.from_pretrained(str(backbone_dir))
    model.heads = trained_heads()
    model.save(tmp_path / "ckpt", extra={"note": "test"})
    loaded = CalmModel.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.extra == {"note": "test"}
    loaded.save(tmp_path / "ckpt", extra={"calibrated": True})  # metadata is merged, not replaced
    assert CalmModel.from_pretrained(str(tmp_path / "ckpt")).extra == {"note": "test", "calibrated": True}
    for name, tensor in model.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[name], tensor)
    policy = ExitPolicy(measure="classifier", threshold=0.5)
    ids = [[5, 6, 7, 8]]
    assert model.generate(ids, 6, policy).exit_layers == loaded.generate(ids, 6, policy).exit_layers


def test_policy_out_of_range_is_an_error_before_any_work(llama):
    with pytest.raises(PolicyError, match="out of range"):
        CalmModel.from_model(llama).generate([[5, 6]], 4, ExitPolicy.fixed(4))
    with pytest.raises(InputError):
        CalmModel.from_model(llama).generate([[5, 6]], 0)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/dir/model.gguf", "/nonexistent/path"])
def test_unknown_models_are_reported(name):
    with pytest.raises(ModelNotFoundError):
        CalmModel.from_pretrained(name)


def test_missing_and_corrupt_checkpoints(backbone_dir, tmp_path):
    model = CalmModel.from_pretrained(str(backbone_dir))
    model.heads = trained_heads()
    ckpt = tmp_path / "ckpt"
    model.save(ckpt)

    (ckpt / HEADS_FILE).write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        CalmModel.from_pretrained(str(ckpt))

    (ckpt / HEADS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CalmModel.from_pretrained(str(ckpt))

    (ckpt / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        CalmModel.from_pretrained(str(ckpt))

    (ckpt / CONFIG_FILE).write_text(json.dumps({"format": "calm-checkpoint", "version": 99, "backbone": "x"}))
    with pytest.raises(CheckpointError, match="version"):
        CalmModel.from_pretrained(str(ckpt))


def test_heads_for_another_backbone_are_refused(backbone_dir, tmp_path):
    model = CalmModel.from_pretrained(str(backbone_dir))
    model.heads = ExitHeads(HeadsConfig(num_layers=6, hidden_size=64, rank=4))
    model.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="trained for 6 layers"):
        CalmModel.from_pretrained(str(tmp_path / "ckpt"))


# ---- save_pretrained / from_pretrained -------------------------------------------------------------

POLICY = ExitPolicy(measure="classifier", threshold=0.5)


def random_model_with_tokenizer(tiny_model):
    """A random Llama made in memory (config._name_or_path is empty) with the tiny word-level tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def same_outputs(a: CalmModel, b: CalmModel, prompts) -> None:
    for policy in (None, POLICY):
        out_a, out_b = a.generate(prompts, 6, policy), b.generate(prompts, 6, policy)
        assert out_a.token_ids == out_b.token_ids and out_a.exit_layers == out_b.exit_layers
        assert out_a.texts == out_b.texts


def test_a_wrapped_model_saved_with_its_backbone_round_trips(tiny_model, tmp_path):
    model, tokenizer = random_model_with_tokenizer(tiny_model)
    wrapped = CalmModel.from_model(model, tokenizer, heads=trained_heads())
    wrapped.save_pretrained(tmp_path / "ckpt", include_backbone=True)
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert (config["backbone"], config["backbone_kind"]) == ("backbone", "included")
    files = {p.name for p in (tmp_path / "ckpt" / "backbone").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and not any(
        f.endswith(".bin") for f in files
    )
    loaded = CalmModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.backbone_kind == "included" and loaded.tokenizer is not None
    same_outputs(wrapped, loaded, ["the cat sat on the mat", "a dog ran in the park after the game"])


def test_a_wrapped_model_saved_by_name_round_trips(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(Path(tiny_model).parent)
    model = AutoModelForCausalLM.from_pretrained(Path(tiny_model).name)  # config._name_or_path: a relative dir
    wrapped = CalmModel.from_model(model, AutoTokenizer.from_pretrained(tiny_model), heads=trained_heads())
    wrapped.save(tmp_path / "ckpt")  # save is save_pretrained
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert (config["backbone"], config["backbone_kind"]) == (str(Path(tiny_model).resolve()), "path")
    assert not (tmp_path / "ckpt" / "backbone").exists()
    monkeypatch.chdir(tmp_path)
    loaded = CalmModel.from_pretrained(tmp_path / "ckpt")
    same_outputs(wrapped, loaded, ["the cat sat on the mat"])


def test_a_wrapped_hub_model_is_saved_naming_its_hub_id(llama, tmp_path):
    llama.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    CalmModel.from_model(llama, heads=trained_heads()).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert (config["backbone"], config["backbone_kind"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub")
    assert (tmp_path / "ckpt" / HEADS_FILE).is_file()


def test_saving_a_wrapped_model_without_a_name_is_an_error(llama, tmp_path):
    with pytest.raises(InputError, match="include_backbone=True"):
        CalmModel.from_model(llama).save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_included_backbone_stays_included_or_is_named_by_path(tiny_model, tmp_path):
    model, tokenizer = random_model_with_tokenizer(tiny_model)
    CalmModel.from_model(model, tokenizer, heads=trained_heads()).save_pretrained(tmp_path / "a", include_backbone=True)
    loaded = CalmModel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "a", extra={"calibrated": True})  # e.g. calm calibrate --out the same dir
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["backbone_kind"] == "included"
    loaded.save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert (config["backbone"], config["backbone_kind"]) == (str((tmp_path / "a" / "backbone").resolve()), "path")
    same_outputs(loaded, CalmModel.from_pretrained(tmp_path / "b"), ["the cat sat on the mat"])


def test_a_relative_backbone_path_is_saved_absolute(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(tiny_model).parent)
    model = CalmModel.from_pretrained(Path(tiny_model).name)
    assert model.backbone_kind == "path"
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["backbone"] == str(Path(tiny_model).resolve())


def test_the_calibration_is_typed_and_saved_as_its_dict(backbone_dir, tmp_path):
    model = CalmModel.from_pretrained(str(backbone_dir))
    rows = (
        CalibrationRow(0.9, 0.0, 0.0, 0.0, 0.0, 4.0, 1.0, 0.0),
        CalibrationRow(0.5, 0.1, 0.0, 0.2, 0.3, 2.0, 1.5, 0.2),
    )
    model.calibration = CalibrationTable(rows, 0, 0.1, 0.05, 100, "hb", measure="state", decay_tau=0.0)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["calibration"] == model.calibration.to_dict()
    assert CalmModel.from_pretrained(tmp_path / "ckpt").calibration == model.calibration


def lora_checkpoint(tiny_model: str, path: Path) -> Path:
    """A calm checkpoint naming the tiny backbone, with a random (non-zero) LoRA adapter and exit heads."""
    from calm.checkpoints import lora
    from calm.checkpoints.checkpoint import CheckpointConfig, save_checkpoint
    from calm.checkpoints.loading import load_backbone

    torch.manual_seed(5)
    peft_model = lora.attach(load_backbone(tiny_model).model, lora.LoraSpec(rank=2), 4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    lora.save_adapter(peft_model, path, base_ref=tiny_model)
    heads = trained_heads()
    save_checkpoint(path, CheckpointConfig(backbone=tiny_model, heads=heads.config), heads)
    return path


def test_a_merged_lora_adapter_goes_along_when_saved(tiny_model, tmp_path):
    from calm.checkpoints import lora

    adapted = CalmModel.from_pretrained(lora_checkpoint(tiny_model, tmp_path / "lora"))
    assert adapted.merged_adapter == tmp_path / "lora"
    plain = CalmModel.from_pretrained(tiny_model)
    prompts = ["the cat sat on the mat", "the council said a new plan for the city school"]
    assert plain.generate(prompts, 6).token_ids != adapted.generate(prompts, 6).token_ids  # the adapter matters
    adapted.save_pretrained(tmp_path / "named")  # e.g. calm calibrate --out elsewhere
    assert lora.has_adapter(tmp_path / "named")
    adapted.save_pretrained(tmp_path / "full", include_backbone=True)  # merged into the included backbone
    assert not lora.has_adapter(tmp_path / "full")
    for copy in ("named", "full"):
        same_outputs(adapted, CalmModel.from_pretrained(tmp_path / copy), prompts)
    adapted.save_pretrained(tmp_path / "lora", extra={"calibrated": True})  # into its own directory: kept as is
    same_outputs(adapted, CalmModel.from_pretrained(tmp_path / "lora"), prompts)


def test_a_save_never_leaves_a_foreign_or_doubled_adapter(tiny_model, tmp_path):
    path = lora_checkpoint(tiny_model, tmp_path / "lora")
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="does not have"):
        CalmModel.from_pretrained(tiny_model).save_pretrained(path)
    with pytest.raises(CheckpointError, match="second time"):
        CalmModel.from_pretrained(path).save_pretrained(path, include_backbone=True)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    assert not (path / "backbone").exists()
