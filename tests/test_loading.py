import pytest

from calm.checkpoints.loading import HUB_ID, cache_dir, gguf_cache_path, load_backbone, smollm2_gguf
from calm.errors import ModelNotFoundError


def test_the_embedded_gguf_is_found():
    path = smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert gguf_cache_path(gguf) == gguf_cache_path(gguf)  # stable key
    assert gguf_cache_path(gguf).parent == tmp_path / "gguf"


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


# ---- issue 20, item 8: a hub id with no hub answers at once ---------------------------------------------


def _unreachable(*args, **kwargs):
    raise OSError(101, "Network is unreachable")


@pytest.mark.parametrize("how", ["probe", "HF_HUB_OFFLINE"])
def test_an_unreachable_hub_is_said_at_once(monkeypatch, tmp_path, how):
    import socket
    import time

    from huggingface_hub import constants

    from helpers import assert_clean_error, invoke

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    if how == "probe":
        monkeypatch.setattr(socket, "create_connection", _unreachable)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed while offline"))
    start = time.perf_counter()
    result = invoke("info", "org/does-not-exist")
    assert time.perf_counter() - start < 5
    assert_clean_error(result, "the hub cannot be reached", "HF_HUB_OFFLINE" if how != "probe" else "unreachable")


def test_the_gguf_cache_is_keyed_by_content_not_by_install(monkeypatch, tmp_path):
    """Issue 20, item 11: two installs of the same GGUF file share one converted copy."""
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))
    first, second, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for file, content in ((first, b"same bytes"), (second, b"same bytes"), (other, b"other bytes")):
        file.parent.mkdir()
        file.write_bytes(content)
    assert gguf_cache_path(first) == gguf_cache_path(second) != gguf_cache_path(other)
    assert gguf_cache_path(first) == gguf_cache_path(first)  # remembered, same answer
