"""CalmModel: a Hugging Face decoder (or encoder-decoder) with early-exit generation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calm.adapters import adapter_for
from calm.calibration.knob import resolve_policy, warn_outside_calibration
from calm.calibration.table import CalibrationTable
from calm.checkpoints.checkpoint import (
    BACKBONE_DIR,
    INCLUDED,
    CheckpointConfig,
    Components,
    backbone_location,
    check_adapter_target,
    default_checkpoint,
    is_checkpoint,
    load_checkpoint,
    load_parts,
    name_backbone,
    read_config,
    save_checkpoint,
)
from calm.checkpoints.checkpoint import backbone_kind as backbone_kind_of
from calm.checkpoints.devices import parse_dtype, resolve_device, warn_slow_dtype
from calm.checkpoints.loading import check_model_name, is_loadable, load_backbone
from calm.checkpoints.native import WeightsChoice, apply_weights, choose_weights, format_note, native_lossless
from calm.continuous import DEFAULT_MAX_BATCH, continuous_generate, runs_continuous
from calm.engine.decode import Network
from calm.engine.generation import GenerationConfig, GenerationResult, PromptBatch, generate_tokens
from calm.engine.lm_head import CertifiedArgmax
from calm.engine.options import EngineOptions
from calm.engine.sampling import SamplingConfig
from calm.errors import InputError
from calm.exits.heads import ExitHeads
from calm.exits.policy import ExitPolicy
from calm.generate_policy import generation_policy, knob_for
from calm.options import engine_options, sampling_options, speculative_options
from calm.prompts.encoding import Prompts, encode_prompts
from calm.speculative.loop import generate_speculative
from calm.speculative.lossless import LOSSLESS, pick_mode, resolve_mode, run_description
from calm.speculative.options import SpeculativeOptions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class CalmModel:
    """A transformers model wrapped for confident early exit.

    >>> calm = CalmModel.from_pretrained("smollm2")
    >>> out = calm.generate("Summarize: ...", max_new_tokens=48, policy=ExitPolicy(measure="state", threshold=0.95))
    >>> out.texts[0], out.avg_layers
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        heads: ExitHeads | None = None,
        backbone: str | None = None,
        calibration: CalibrationTable | None = None,
        extra: dict | None = None,
        backbone_kind: str | None = None,
        merged_adapter: Path | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter_for(model)
        self.heads = heads.to(device=self.adapter.device) if heads is not None else None
        self.backbone = backbone  # where the backbone was loaded from; None: wrapped in memory
        self.backbone_kind = (
            backbone_kind if backbone_kind is not None or backbone is None else backbone_kind_of(backbone)
        )
        self.merged_adapter = merged_adapter  # the checkpoint whose LoRA adapter is merged into model
        self.calibration = calibration
        self.extra = dict(extra or {})  # checkpoint metadata (training, calibration commands)
        self._argmax = CertifiedArgmax.for_head(self.adapter.head_module)
        dtype = str(self.adapter.dtype).removeprefix("torch.")
        self.weights = WeightsChoice(dtype, self.adapter.dtype, "wrapped as loaded")  # from_pretrained: its choice

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_model(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, heads: ExitHeads | None = None
    ) -> CalmModel:
        """Wrap an already loaded transformers model (and its tokenizer, for text prompts)."""
        return cls(model, tokenizer, heads=heads)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        weights: str | None = None,
    ) -> CalmModel:
        """Load 'smollm2', a .gguf file, a local transformers directory, a hub id, or a calm checkpoint.
        weights: "auto" (the default: the format stored as fastest for this checkpoint, else float32),
        "native" (compute on a GGUF file's own 4-bit blocks), "float32" or "bfloat16" (calm.checkpoints.native)."""
        name_or_path = check_model_name(str(name_or_path))
        dtype = parse_dtype(dtype)
        device = resolve_device(device)
        config: CheckpointConfig | None
        if is_checkpoint(name_or_path):
            config = read_config(name_or_path)
            location = backbone_location(name_or_path, config)
        else:
            default = default_checkpoint(name_or_path)
            config = read_config(default) if default is not None else None
            location = name_or_path
        choice = choose_weights(weights, dtype, location, device, config.extra if config else None)
        warn_slow_dtype(choice.dtype, device)
        if is_checkpoint(name_or_path):
            config, parts, location = load_checkpoint(name_or_path, dtype=choice.dtype, device=device)
        else:
            loaded = load_backbone(name_or_path, dtype=choice.dtype, device=device)
            parts = Components(loaded.model, loaded.tokenizer)
            if default is not None and config is not None:
                parts = load_parts(default, config, parts)
        apply_weights(parts.backbone(), choice, location, merged_adapter=parts.adapter is not None)
        model = cls(
            parts.backbone(),
            parts.tokenizer,
            heads=parts.heads,
            backbone=location,
            calibration=config.calibration if config else None,
            extra=config.extra if config else None,
            backbone_kind=config.backbone_kind if config and is_checkpoint(name_or_path) else None,
            merged_adapter=parts.adapter,
        )
        model.weights = choice
        return model

    def save_pretrained(
        self, save_directory: str | Path, *, include_backbone: bool = False, extra: dict | None = None
    ) -> None:
        """Write a calm checkpoint: the exit heads and calibration, and a config that names the backbone.

        include_backbone=True also writes the backbone (safetensors, its config and tokenizer) into
        the checkpoint, which then loads anywhere. Otherwise the config names the backbone this model
        was loaded from (an alias, hub id or path; for a model wrapped with from_model, its
        config._name_or_path), and its weights are not saved: after changing them, include it. A LoRA
        adapter merged at load goes along: its files, or merged into the included backbone.
        `extra` is merged into the metadata this model was loaded with."""
        path = Path(save_directory)
        ref, kind = (BACKBONE_DIR, INCLUDED) if include_backbone else self._backbone_reference(path)
        check_adapter_target(path, self.merged_adapter, include_backbone)
        config = CheckpointConfig(
            backbone=ref,
            heads=self.heads.config if self.heads else None,
            calibration=self.calibration,
            extra={**self.extra, **(extra or {})},
            backbone_kind=kind,
        )
        save_checkpoint(
            path,
            config,
            self.heads,
            backbone=(self.model, self.tokenizer) if include_backbone else None,
            adapter=self.merged_adapter,
        )

    save = save_pretrained

    def _backbone_reference(self, checkpoint: Path) -> tuple[str, str]:
        ref = self.backbone
        if ref is None:
            ref = getattr(self.model.config, "_name_or_path", None) or ""
            if not is_loadable(ref):
                raise InputError(
                    f"this model was wrapped with from_model and its config names no hub id or local "
                    f"model (config._name_or_path={ref!r}), so a checkpoint cannot name its backbone; "
                    "pass include_backbone=True to save the backbone into the checkpoint"
                )
        ref = name_backbone(ref, checkpoint)
        return ref, backbone_kind_of(ref, checkpoint)

    # ---- exit policies -------------------------------------------------------------------
    def policy(
        self,
        *,
        speed: float | None = None,
        tolerance: float | None = None,
        threshold: float | None = None,
        measure: str | None = None,
        min_exit_layer: int | None = None,
        decay_tau: float | None = None,
        consistency: str | None = None,
    ) -> ExitPolicy:
        """The exit policy for a knob: a speed in [0, 1] (0 = full model, 1 = fastest certified) or a
        risk tolerance δ, both read off the calibration, or an explicit threshold λ (any model). With
        none of them, the model's default: speed 0.5 when it is calibrated, else the full model.
        A knob runs the decay schedule the calibration was certified with; a threshold runs
        `decay_tau` (default ExitPolicy.decay_tau), so threshold=λ with the table's τ is the same
        policy as the knob that lands on λ. consistency: the objective the knob follows, "textual" (the
        default: the output stays within δ of the full model's) or "risk" (ROUGE-L against the references
        no worse than the full model's by more than δ; needs a table calibrated with references)."""
        return resolve_policy(
            self,
            threshold=threshold,
            measure=measure,
            min_exit_layer=min_exit_layer,
            speed=speed,
            tolerance=tolerance,
            decay_tau=decay_tau,
            consistency=consistency,
        ).policy

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
    def generate(  # long: one docstring for every option of generate
        self,
        prompts: Prompts,
        max_new_tokens: int = 64,
        policy: ExitPolicy | None = None,
        *,
        speed: float | None = None,
        tolerance: float | None = None,
        consistency: str | None = None,
        attention_mask: torch.Tensor | None = None,
        chat: bool | None = None,
        truncate: bool = False,
        sampling: SamplingConfig | None = None,
        engine: str | EngineOptions = "auto",
        speculative: SpeculativeOptions | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        compile: bool | str | None = None,
        sync_every: int | None = None,
        mode: str | None = None,
        draft_layer: int | None = None,
        max_draft: int | None = None,
        lookup: bool | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> GenerationResult:
        """Generate for one prompt or a batch. Prompts are strings (the chat template is applied
        for instruct models unless chat=False), token ids (one list, or a list of lists), or a [B, T]
        tensor; a padded tensor (left or right) needs its attention_mask [B, T] (1 = token, 0 = padding).

        mode: "lossless" (the default with no policy, knob or engine): exactly the full model's output,
        by speculative decoding with the setting this checkpoint measured fastest for the row count, or the
        full model where nothing stored pays (calm.speculative.lossless; `result.decoding` says which ran and why).
        "calm": exits follow `policy`, or the calibrated knob `speed` or `tolerance` (`policy()`, `consistency`).
        "speculative": always speculative: layers 1..draft_layer (default: stored, else L/2) draft up to
        max_draft tokens (stored, else 4) while the policy's measure is confident (stored controller, else
        classifier λ=0.7 or always), and the full model verifies them (calm.speculative.drafting); draft_layer=0:
        drafts looked up in the prompt and output (calm.speculative.lookup); lookup=True: those first, else layer E's;
        SpeculativeOptions(candidates=N): N looked-up continuations per row verified at once (calm.speculative.tree).

        Several prompts (dynamic engine, calm or lossless mode) run as one continuous batch of max_batch slots
        (calm.engine.scheduler, calm.continuous): each prompt is prefilled alone and takes the slot of a row
        that ended; each row's output is its solo run's.

        engine: "dynamic" (the host skips exited rows' work; the CPU default), "static" (no host sync
        inside a decode step; the GPU default) or "auto". compile: run the static step through
        torch.compile(fullgraph=True) (a string names the backend). sync_every: the static engine
        checks for finished rows every this many tokens (its one host sync).

        The options come in one object per concern, sampling= (SamplingConfig), engine= (EngineOptions, or
        just its name) and speculative= (SpeculativeOptions), or as the keyword shortcuts above; a shortcut
        given beside its object must agree with it (calm.options)."""
        if max_new_tokens < 1 or max_batch < 1:
            raise InputError(f"max_new_tokens and max_batch must be >= 1, got {max_new_tokens} and {max_batch}")
        engine = engine_options(engine, compile=compile, sync_every=sync_every)
        spec = speculative_options(speculative, mode=mode, draft_layer=draft_layer, max_draft=max_draft, lookup=lookup)
        knob = knob_for(self, policy, speed, tolerance, consistency, spec.mode)
        if knob is not None:  # the calibrated knob: its policy, or lossless where no certified threshold pays
            speed = tolerance = consistency = None
            spec = replace(spec, mode=LOSSLESS) if knob.lossless else spec
            policy = None if knob.lossless else knob.policy
            if knob.calibrated:
                warn_outside_calibration(self.calibration, max_new_tokens)
        asked = policy is not None or speed is not None or tolerance is not None or engine.chosen
        mode = pick_mode(spec.mode, asked)
        batch = self.encode_prompts(
            prompts, max_new_tokens, chat=chat, truncate=truncate, attention_mask=attention_mask
        )
        rows = batch.ids.shape[0]
        run = resolve_mode(
            self,
            mode,
            False,
            spec.draft_layer,
            spec.max_draft,
            lookup=spec.lookup,
            batch_size=rows,
            candidates=spec.candidates,
            goodput=spec.goodput,
            twin=spec.twin,
        )
        run = native_lossless(self.weights.weights, mode, run)
        policy = generation_policy(self, policy, speed, tolerance, run, consistency, spec.mode == "calm")
        sampling = sampling_options(
            sampling, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        config = GenerationConfig(max_new_tokens, self.eos_token_ids, self.pad_token_id, sampling, *engine.settings)
        if runs_continuous(self.network, rows, config, mode, spec):  # max_batch=1: one prompt at a time
            drafts = self.weights.weights != "native"  # as native_lossless
            result, decoding = continuous_generate(self, batch, policy, config, mode, max_batch, drafts, spec.twin)
            return replace(self._with_texts(result), decoding=decoding)
        if run is None or run.spec is None:
            result = generate_tokens(self.network, batch, policy, config)
        else:
            result = generate_speculative(self.network, batch, policy, config, run.spec)
        stored = run is not None and run.spec is not None and "measured" in run.description
        knobbed = knob is not None and not knob.lossless
        note = format_note(self.weights.weights, knob=knobbed, stored_setting=stored)
        return replace(
            self._with_texts(result), decoding=run_description(run, result.speculative, policy.describe()) + note
        )

    def _with_texts(self, result: GenerationResult) -> GenerationResult:
        """The result with each row's finish reason and text (decoded without special tokens, given a tokenizer)."""
        eos = set(self.eos_token_ids)
        reasons = tuple("stop" if ids and ids[-1] in eos else "length" for ids in result.token_ids)
        result = replace(result, finish_reasons=reasons)
        if self.tokenizer is None:
            return result
        decoded = self.tokenizer.batch_decode([list(ids) for ids in result.token_ids], skip_special_tokens=True)
        return replace(result, texts=tuple(text.strip() for text in decoded))

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

    def encode_prompts(
        self,
        prompts: Prompts,
        max_new_tokens: int,
        chat: bool | None = None,
        truncate: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> PromptBatch:
        """Token ids of the prompts, left-padded into one batch (calm.prompts.encoding)."""
        return encode_prompts(self, prompts, max_new_tokens, chat, truncate, attention_mask)
