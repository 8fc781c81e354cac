"""calm.prompts.encoding: prompts as strings, token ids or a padded tensor with its attention mask, checked and
left-padded into one batch (through CalmModel.generate, which reads them)."""

import pytest
import torch

from calm import CalmModel
from calm.errors import InputError

PAD = 0  # tiny_llama's pad_token_id
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
    assert sum(map(len, out.token_ids)) > len(ROWS)  # decode steps are compared too
    left_ids, left_mask = padded(ROWS, "left")
    hf = llama.generate(
        left_ids, attention_mask=left_mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=1
    )[:, left_ids.shape[1] :].tolist()
    assert [list(r) for r in out.token_ids] == [r[: len(o)] for r, o in zip(hf, out.token_ids)]
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


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(3, 6), "shape"),
        (torch.tensor([[1, 1, 0, 1, 1, 1, 1]] * 3), "between tokens"),
        (torch.full((3, 7), 2), "only 0"),
    ],
)
def test_bad_attention_masks_get_clear_errors(llama, mask, message):
    ids, _ = padded(ROWS, "left")
    with pytest.raises(InputError, match=message):
        CalmModel.from_model(llama).generate(ids, max_new_tokens=4, attention_mask=mask)
    with pytest.raises(InputError, match="tensor"):
        CalmModel.from_model(llama).generate(ROWS, max_new_tokens=4, attention_mask=torch.ones(3, 7))


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([[]], "empty"),
        ("", "tokenizer|empty"),
        ([[5, 999]], "vocabulary"),
        ([], "no prompts"),
        (torch.zeros(3, dtype=torch.long), "batch"),
    ],
)
def test_bad_prompts_get_clear_errors(llama, prompt, message):
    with pytest.raises(InputError, match=message):
        CalmModel.from_model(llama).generate(prompt, max_new_tokens=4)


def test_prompt_longer_than_the_context_is_an_error(llama):
    with pytest.raises(InputError, match="context"):
        CalmModel.from_model(llama).generate([[5] * 60], max_new_tokens=8)  # 64 positions in all
