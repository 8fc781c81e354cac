import json

import pytest
import torch

from calm import CalmModel, ExitPolicy
from calm.checkpoint import CONFIG_FILE, HEADS_FILE
from calm.errors import CheckpointError, InputError, ModelNotFoundError, PolicyError
from calm.heads import ExitHeads, HeadsConfig
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
    loaded.save(tmp_path / "ckpt", extra={"calibrated": True})              # metadata is merged, not replaced
    assert CalmModel.from_pretrained(str(tmp_path / "ckpt")).extra == {"note": "test", "calibrated": True}
    for name, tensor in model.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[name], tensor)
    policy = ExitPolicy(measure="classifier", threshold=0.5)
    ids = [[5, 6, 7, 8]]
    assert model.generate(ids, 6, policy).exit_layers == loaded.generate(ids, 6, policy).exit_layers


PAD = 0                                           # tiny_llama's pad_token_id
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, T] tensor and its attention mask, as a tokenizer pads with padding_side=side."""
    width = max(map(len, rows))
    ids, mask = torch.full((len(rows), width), PAD), torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_with_attention_mask_generates_as_the_unpadded_rows(llama, side):
    model = CalmModel.from_model(llama)
    ids, mask = padded(ROWS, side)
    out = model.generate(ids, max_new_tokens=6, attention_mask=mask)
    assert out.token_ids == model.generate(ROWS, max_new_tokens=6).token_ids
    assert sum(map(len, out.token_ids)) > len(ROWS)                  # decode steps are compared too
    left_ids, left_mask = padded(ROWS, "left")
    hf = llama.generate(left_ids, attention_mask=left_mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                        eos_token_id=1)[:, left_ids.shape[1]:].tolist()
    assert [list(r) for r in out.token_ids] == [r[:len(o)] for r, o in zip(hf, out.token_ids)]
    assert model.generate(ids, max_new_tokens=6, attention_mask=mask.bool()).token_ids == out.token_ids


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_without_a_mask_is_refused(llama, side):
    ids, _ = padded(ROWS, side)
    with pytest.raises(InputError, match="attention_mask"):
        CalmModel.from_model(llama).generate(ids, max_new_tokens=4)


def test_a_flat_list_of_ids_is_one_prompt(llama):
    model = CalmModel.from_model(llama)
    out = model.generate(ROWS[0], max_new_tokens=5)
    assert out.token_ids == model.generate([ROWS[0]], max_new_tokens=5).token_ids and len(out.token_ids) == 1


@pytest.mark.parametrize("mask, message", [
    (torch.ones(3, 6), "shape"),
    (torch.tensor([[1, 1, 0, 1, 1, 1, 1]] * 3), "between tokens"),
    (torch.full((3, 7), 2), "only 0"),
])
def test_bad_attention_masks_get_clear_errors(llama, mask, message):
    ids, _ = padded(ROWS, "left")
    with pytest.raises(InputError, match=message):
        CalmModel.from_model(llama).generate(ids, max_new_tokens=4, attention_mask=mask)
    with pytest.raises(InputError, match="tensor"):
        CalmModel.from_model(llama).generate(ROWS, max_new_tokens=4, attention_mask=torch.ones(3, 7))


@pytest.mark.parametrize("prompt, message", [([[]], "empty"), ("", "tokenizer|empty"), ([[5, 999]], "vocabulary"),
                                             ([], "no prompts"), (torch.zeros(3, dtype=torch.long), "batch")])
def test_bad_prompts_get_clear_errors(llama, prompt, message):
    with pytest.raises(InputError, match=message):
        CalmModel.from_model(llama).generate(prompt, max_new_tokens=4)


def test_prompt_longer_than_the_context_is_an_error(llama):
    with pytest.raises(InputError, match="context"):
        CalmModel.from_model(llama).generate([[5] * 60], max_new_tokens=8)      # 64 positions in all


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


def test_saving_a_wrapped_model_without_a_name_is_an_error(llama, tmp_path):
    with pytest.raises(InputError, match="from_pretrained"):
        CalmModel.from_model(llama).save(tmp_path / "x")
    assert not (tmp_path / "x").exists()
