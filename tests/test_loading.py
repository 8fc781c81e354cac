import pytest

from calm.errors import ModelNotFoundError
from calm.loading import HUB_ID, _gguf_cache_path, cache_dir, load_backbone, smollm2_gguf


def test_the_embedded_gguf_is_found():
    path = smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert _gguf_cache_path(gguf) == _gguf_cache_path(gguf)  # stable key
    assert _gguf_cache_path(gguf).parent == tmp_path / "gguf"


@pytest.mark.parametrize(
    "name, is_hub",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("google/t5-small", True),
        ("smollm2", False),
        ("gpt2", False),
        ("a/b/c", False),
    ],
)
def test_hub_ids_look_like_org_slash_name(name, is_hub):
    assert bool(HUB_ID.match(name)) == is_hub


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_backbone(str(tmp_path))


def test_a_local_model_directory_loads(tmp_path, llama):
    llama.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_backbone(str(tmp_path))
    assert loaded.model.config.num_hidden_layers == 4 and loaded.tokenizer is None and loaded.source == str(tmp_path)
