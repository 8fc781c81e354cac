"""calm.options and the options objects generate() takes (SamplingConfig, EngineOptions, SpeculativeOptions):
an object and the keyword shortcuts give the same run, and a shortcut that disagrees with its object is refused."""

import pytest

from calm import CalmModel
from calm.engine.options import EngineOptions
from calm.engine.sampling import SamplingConfig
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.options import engine_options, sampling_options, speculative_options, with_shortcuts
from calm.speculative.drafting import SpeculativeConfig
from calm.speculative.options import SpeculativeOptions

PROMPT = [[5, 6, 7, 8]]


def test_shortcuts_fill_the_default_and_must_agree_with_an_object():
    assert sampling_options(None, temperature=0.5, seed=None) == SamplingConfig(temperature=0.5)
    given = SamplingConfig(do_sample=True, seed=3)
    assert sampling_options(given, do_sample=True, seed=3) is given
    with pytest.raises(ValueError, match=r"sampling= says seed=3 but seed=4 was also given"):
        sampling_options(given, seed=4)
    with pytest.raises(InputError, match="speculative= says mode='calm'"):
        speculative_options(SpeculativeOptions(mode="calm"), mode="speculative")
    assert with_shortcuts("speculative", None, SpeculativeOptions(), lookup=True) == SpeculativeOptions(lookup=True)


def test_engine_takes_a_name_or_an_object():
    assert engine_options("static", compile=True, sync_every=None) == EngineOptions("static", True, 8)
    assert engine_options(EngineOptions("dynamic"), sync_every=8) == EngineOptions("dynamic")
    with pytest.raises(ValueError, match="engine= says compile=False but compile=True"):
        engine_options(EngineOptions("static"), compile=True)
    assert EngineOptions.from_spec("static+compile") == EngineOptions("static", True)
    assert [EngineOptions.from_spec(s).spec for s in ("auto", "static+compile")] == ["auto", "static+compile"]
    assert not EngineOptions().chosen and EngineOptions(compile=True).chosen and EngineOptions("dynamic").chosen
    with pytest.raises(InputError, match="unknown engine"):
        EngineOptions.from_spec("fast")


def test_speculative_options_of_a_setting():
    assert SpeculativeOptions.running(None) is None
    assert SpeculativeOptions.running(SpeculativeConfig(2, 3, lookup=True)) == SpeculativeOptions(
        "speculative", 2, 3, True, 1, twin=False
    )
    twin = SpeculativeOptions.running(SpeculativeConfig(2, 3, lookup=True, goodput=True, twin=True))
    assert twin == SpeculativeOptions("speculative", 2, 3, True, 1, goodput=True, twin=True)  # asks for exactly it


def test_candidate_context_drafts_through_the_options_object(llama):
    """SpeculativeOptions(candidates=N) reaches the run: N looked-up continuations per row, verified as a
    tree, and the output is still the full model's."""
    model = CalmModel.from_model(llama)
    prompt = [[5, 6, 7, 8, 5, 6, 9, 5, 6, 7, 5, 6]]  # [5, 6] was followed by 7 and by 9
    full = model.generate(prompt, max_new_tokens=8, mode="calm", policy=ExitPolicy.never())
    tree = model.generate(prompt, max_new_tokens=8, speculative=SpeculativeOptions("speculative", 0, 3, candidates=2))
    assert tree.token_ids == full.token_ids
    assert "2 candidates verified as a tree" in tree.decoding


def test_objects_and_shortcuts_generate_the_same(llama):
    model = CalmModel.from_model(llama)
    shortcuts = model.generate(
        PROMPT, max_new_tokens=5, do_sample=True, seed=7, engine="dynamic", mode="speculative", draft_layer=1
    )
    objects = model.generate(
        PROMPT,
        max_new_tokens=5,
        sampling=SamplingConfig(do_sample=True, seed=7),
        engine=EngineOptions("dynamic"),
        speculative=SpeculativeOptions(mode="speculative", draft_layer=1),
    )
    assert objects.token_ids == shortcuts.token_ids and objects.decoding == shortcuts.decoding
    with pytest.raises(ValueError, match="engine= says compile=False but compile=True"):
        model.generate(PROMPT, max_new_tokens=2, engine=EngineOptions("dynamic"), compile=True)


def test_an_engine_object_asks_for_exits_as_its_name_does(llama):
    model = CalmModel.from_model(llama)
    by_name = model.generate(PROMPT, max_new_tokens=3, engine="static")
    by_object = model.generate(PROMPT, max_new_tokens=3, engine=EngineOptions("static"))
    assert by_object.decoding == by_name.decoding and by_object.token_ids == by_name.token_ids
