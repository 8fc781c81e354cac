"""CalmModel: a Hugging Face decoder (or encoder-decoder) with early-exit generation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from calm.adapters import adapter_for
from calm.checkpoint import CheckpointConfig, is_checkpoint, load_heads, read_config, save_checkpoint
from calm.decode import Network
from calm.data import truncate_document
from calm.errors import InputError
from calm.generation import GenerationConfig, GenerationResult, PromptBatch, generate_tokens
from calm.heads import ExitHeads
from calm.lm_head import CertifiedArgmax
from calm.loading import load_backbone
from calm.policy import ExitPolicy
from calm.sampling import SamplingConfig

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


class CalmModel:
    """A transformers model wrapped for confident early exit.

    >>> calm = CalmModel.from_pretrained("smollm2")
    >>> out = calm.generate("Summarize: ...", max_new_tokens=48, policy=ExitPolicy(measure="state", threshold=0.95))
    >>> out.texts[0], out.avg_layers
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, heads: ExitHeads | None = None,
                 backbone: str | None = None, calibration: dict | None = None, extra: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter_for(model)
        self.heads = heads.to(device=self.adapter.device) if heads is not None else None
        self.backbone = backbone
        self.calibration = calibration
        self.extra = dict(extra or {})              # checkpoint metadata (training, calibration commands)
        self._argmax = CertifiedArgmax.for_head(self.adapter.head_module)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer=None, heads: ExitHeads | None = None) -> "CalmModel":
        """Wrap an already loaded transformers model (and its tokenizer, for text prompts)."""
        return cls(model, tokenizer, heads=heads)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> "CalmModel":
        """Load 'smollm2', a .gguf file, a local transformers directory, a hub id, or a calm checkpoint."""
        dtype = _parse_dtype(dtype)
        device = _parse_device(device)
        if is_checkpoint(name_or_path):
            return cls._from_checkpoint(Path(name_or_path), device, dtype)
        loaded = load_backbone(name_or_path, dtype=dtype, device=device)
        default = _default_checkpoint(name_or_path)
        if default is not None:
            config = read_config(default)
            heads = _heads_for(default, config, loaded.model)
            return cls(loaded.model, loaded.tokenizer, heads=heads, backbone=name_or_path, calibration=config.calibration,
                       extra=config.extra)
        return cls(loaded.model, loaded.tokenizer, backbone=name_or_path)

    @classmethod
    def _from_checkpoint(cls, path: Path, device, dtype) -> "CalmModel":
        config = read_config(path)
        backbone_ref = config.backbone
        if not Path(backbone_ref).is_absolute() and (path / backbone_ref).exists():
            backbone_ref = str(path / backbone_ref)
        loaded = load_backbone(backbone_ref, dtype=dtype, device=device)
        return cls(loaded.model, loaded.tokenizer, heads=_heads_for(path, config, loaded.model),
                   backbone=config.backbone, calibration=config.calibration, extra=config.extra)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write a calm checkpoint (exit heads + config naming the backbone); `extra` is merged into the
        metadata this model was loaded with."""
        if self.backbone is None:
            raise InputError("this model was wrapped with from_model, so calm cannot name its backbone in a "
                             "checkpoint; load it with CalmModel.from_pretrained(name) first")
        config = CheckpointConfig(backbone=self.backbone, heads=self.heads.config if self.heads else None,
                                  calibration=self.calibration, extra={**self.extra, **(extra or {})})
        save_checkpoint(path, config, self.heads)

    # ---- properties ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def network(self) -> Network:
        return Network(self.adapter, self.heads, self._argmax)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts: Prompts, max_new_tokens: int = 64, policy: ExitPolicy | None = None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool | None = None, truncate: bool = False,
                 engine: str = "auto", compile: bool | str = False, sync_every: int = 8) -> GenerationResult:
        """Generate for one prompt or a batch. Prompts are strings (the chat template is applied
        for instruct models unless chat=False), lists of token ids, or a [B, T] tensor.

        engine: "dynamic" (the host skips exited rows' work; the CPU default), "static" (no host sync
        inside a decode step; the GPU default) or "auto". compile: run the static step through
        torch.compile(fullgraph=True) (a string names the backend). sync_every: the static engine
        checks for finished rows every this many tokens (its one host sync)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        policy = policy or ExitPolicy.never()
        policy.allowed_layers(self.num_layers)                                  # range check up front
        batch = self.encode_prompts(prompts, max_new_tokens, chat=chat, truncate=truncate)
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=self.eos_token_ids,
                                  pad_token_id=self.pad_token_id,
                                  sampling=SamplingConfig(do_sample, temperature, top_k, top_p, seed),
                                  engine=engine, compile=compile, sync_every=sync_every)
        result = generate_tokens(self.network, batch, policy, config)
        if self.tokenizer is None:
            return result
        texts = tuple(self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result.token_ids)
        return replace(result, texts=texts)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    @property
    def pad_token_id(self) -> int:
        for source in (self.tokenizer, self.model.config):
            pad = getattr(source, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return None

    def encode_prompts(self, prompts: Prompts, max_new_tokens: int, chat: bool | None = None,
                       truncate: bool = False) -> PromptBatch:
        """Token ids of the prompts, left-padded into one batch."""
        rows = self._token_rows(prompts, max_new_tokens, chat, truncate)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = True
        return PromptBatch(ids=ids.to(self.device), mask=mask.to(self.device))

    def _token_rows(self, prompts: Prompts, max_new_tokens: int, chat: bool | None, truncate: bool) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise InputError(f"a tensor of prompts must be [batch, tokens], got shape {tuple(prompts.shape)}")
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise InputError("no prompts given")
        budget = None if self.max_context is None or self.adapter.is_encoder_decoder else self.max_context - max_new_tokens
        if budget is not None and budget < 1:
            raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {self.max_context}")
        rows = [self._tokenize(p, chat, truncate, budget) for p in prompts]
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise InputError(f"prompt {i} is empty")
            if any((not isinstance(t, int)) or t < 0 or t >= self.adapter.vocab_size for t in row):
                raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {self.adapter.vocab_size})")
            if budget is not None and len(row) > budget:
                raise InputError(f"prompt {i} has {len(row)} tokens but only {budget} fit in the context of "
                                 f"{self.max_context} with max_new_tokens={max_new_tokens}; shorten it or pass truncate=True")
        return rows

    def _tokenize(self, prompt, chat: bool | None, truncate: bool, budget: int | None) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if not prompt.strip():
            raise InputError("empty prompt: give some text to generate from")
        if self.tokenizer is None:
            raise InputError("text prompts need a tokenizer: pass one to CalmModel.from_model, or give token ids")
        use_chat = chat if chat is not None else bool(getattr(self.tokenizer, "chat_template", None)) \
            and not self.adapter.is_encoder_decoder
        if truncate and budget is not None:
            prompt = truncate_document(self.tokenizer, prompt, max(1, budget - len(self._template("", use_chat))))
        return self._template(prompt, use_chat)

    def _template(self, text: str, use_chat: bool) -> list[int]:
        if use_chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer(text)["input_ids"])


def _heads_for(path: Path, config: CheckpointConfig, model: torch.nn.Module) -> ExitHeads | None:
    if config.heads is None:
        return None
    adapter = adapter_for(model)
    return load_heads(path, config.heads, adapter.num_layers, adapter.hidden_size)


def _default_checkpoint(name: str) -> Path | None:
    """The shipped heads and calibration for a built-in alias, if any are packaged."""
    from importlib.resources import files
    path = Path(str(files("calm") / "assets" / name))
    return path if is_checkpoint(path) else None


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def _parse_device(device) -> torch.device | None:
    if device in (None, "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device)
