"""calm.training.features: the backbone's hidden states at the training positions."""

from __future__ import annotations

import pytest
import torch

from calm.model import CalmModel
from calm.training import TrainSequence, hidden_features, last_state_is_normed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_state_is_normed_matches_the_architecture(arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                initializer_range=0.2,
            )
        )
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2))
    calm = CalmModel(model.eval())
    assert last_state_is_normed(model, calm.adapter, "cpu")  # transformers norms the last entry of both


def test_last_state_is_normed_tells_a_raw_last_state(training_setup):
    """A model whose last hidden state is the raw layer output (its logits come after the final norm)."""
    from types import SimpleNamespace

    a = CalmModel.from_pretrained(training_setup["backbone"]).adapter
    g = torch.Generator().manual_seed(0)

    def model(normed: bool):
        def forward(input_ids, **kwargs):
            h = 3 * torch.randn(1, input_ids.shape[1], a.hidden_size, generator=g)
            return SimpleNamespace(hidden_states=(h,), logits=a.lm_head(h if normed else a.final_norm(h)))

        return forward

    assert last_state_is_normed(model(True), a, "cpu")
    assert not last_state_is_normed(model(False), a, "cpu")


def test_hidden_features_are_the_states_at_the_positions(training_setup):
    calm = CalmModel.from_pretrained(training_setup["backbone"])
    a = calm.adapter
    sequences = [
        TrainSequence(ids=(5, 6, 7, 8, 9), positions=(1, 3), targets=(7, 9), kind="text", source="x"),
        TrainSequence(ids=(10, 11, 12), positions=(0,), targets=(11,), kind="text", source="x"),
    ]
    features = hidden_features(calm.model, a, sequences, "cpu", normed_last=True)
    assert features.exits.shape == (3, a.num_layers - 1, a.hidden_size) and features.final.shape == (3, a.hidden_size)
    with torch.no_grad():
        out = calm.model(torch.tensor([[5, 6, 7, 8, 9]]), output_hidden_states=True)
    torch.testing.assert_close(features.exits[1, 1], out.hidden_states[2][0, 3])  # layer 2 at position 3
    # the final state is the LM head's input: it gives the model's logits
    torch.testing.assert_close(a.lm_head(features.final[:2]), out.logits[0, [1, 3]], rtol=1e-4, atol=1e-4)
