"""`train`: one run of any mode, in named steps.

load the backbone -> build the sequences -> build the mode's `Run` (objective, optimizer, step)
-> resume from the training state -> the step loop, which writes the training state and the calm
checkpoint every `checkpoint_every` steps. Runs on CPU or GPU through accelerate (bf16 autocast
on GPU; `accelerate launch -m calm.training ...` for several GPUs in modes heads and finetune)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calm.adapters import adapter_for
from calm.checkpoints.checkpoint import CheckpointConfig, is_checkpoint, read_config, save_checkpoint
from calm.errors import CheckpointError, InputError, UnsupportedModelError
from calm.training.config import TrainConfig, TrainResult
from calm.training.data import Sequences, TrainingData, read_training_data, training_sequences
from calm.training.features import last_state_is_normed
from calm.training.lora import build_lora
from calm.training.modes import Loaded, Run, build_finetune, build_heads
from calm.training.progress import ProgressUi, progress_bar
from calm.training.state import STATE_FILE, Resumed, resume, save_state, state_meta

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel


# ---- set-up: accelerate, the backbone ---------------------------------------------------


def make_accelerator(config: TrainConfig) -> Accelerator:
    from accelerate import Accelerator

    want_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but torch sees no CUDA GPU")
    return Accelerator(cpu=not want_cuda, mixed_precision="bf16" if want_cuda else "no")


def backbone_ref(model_ref: str) -> str:
    """What load_backbone resolves: a calm checkpoint's own backbone, or the reference itself."""
    if is_checkpoint(model_ref):
        ref = read_config(model_ref).backbone
        if not Path(ref).is_absolute() and (Path(model_ref) / ref).exists():
            ref = str((Path(model_ref) / ref).resolve())
        return ref
    return model_ref


def adapted_backbone(model_ref: str, model: PreTrainedModel) -> PreTrainedModel:
    """The backbone with the LoRA adapter of the model reference (a checkpoint, or an alias's
    shipped assets) merged in, as CalmModel.from_pretrained would load it."""
    from calm.checkpoints.checkpoint import default_checkpoint, with_adapter

    source = Path(model_ref) if is_checkpoint(model_ref) else default_checkpoint(model_ref)
    return with_adapter(source, model) if source is not None else model


def load(config: TrainConfig, accelerator: Accelerator) -> Loaded:
    """The backbone, frozen. Modes heads and finetune start from it as CalmModel loads it (with the
    reference's LoRA adapter merged); lora trains a fresh adapter on the plain backbone."""
    from calm.checkpoints.loading import load_backbone
    from calm.model import CalmModel

    load_ref = backbone_ref(config.model)
    loaded = load_backbone(load_ref, dtype=torch.float32, device=accelerator.device)
    model = loaded.model if config.mode == "lora" else adapted_backbone(config.model, loaded.model)
    if adapter_for(model).is_encoder_decoder:
        raise UnsupportedModelError("calm training supports decoder-only models; this one is an encoder-decoder")
    if loaded.tokenizer is None:
        raise InputError(f"model {config.model!r} has no tokenizer; training reads text and needs one")
    calm = CalmModel(model, loaded.tokenizer, backbone=load_ref)
    model.requires_grad_(False)
    normed_last = last_state_is_normed(model, calm.adapter, accelerator.device)
    if accelerator.is_main_process:
        _warn_calibration(Path(config.out))
    return Loaded(calm, load_ref, normed_last)


def _warn_skipped(data: TrainingData) -> None:
    for entry in data.files:
        if entry.get("skipped_empty_documents_at_lines"):
            lines = entry["skipped_empty_documents_at_lines"]
            print(
                f"warning: {entry['path']}: skipped {len(lines)} record(s) with an empty document "
                f"(line {', '.join(map(str, lines[:10]))}{' ...' if len(lines) > 10 else ''})",
                file=sys.stderr,
            )


def _warn_calibration(out: Path) -> None:
    if not is_checkpoint(out):
        return
    try:
        previous = read_config(out)
    except CheckpointError:  # unreadable: it is overwritten anyway
        return
    if previous.calibration:
        print(
            f"warning: {out} holds a calibration table for its previous heads; the new checkpoint drops it "
            "(calibrate the new heads again)",
            file=sys.stderr,
        )


BUILDERS = {"heads": build_heads, "finetune": build_finetune, "lora": build_lora}


# ---- resume, the loop, the checkpoint -------------------------------------------------------------


def resume_run(config: TrainConfig, accelerator: Accelerator, run: Run, progress: ProgressUi) -> Resumed | None:
    """The saved state restored into `run` (with --resume and a state in the work dir), else None."""
    path, main = config.work_path / STATE_FILE, accelerator.is_main_process
    if not (config.resume and path.is_file()):
        if config.resume and main:
            progress.console.print(f"no training state in {config.work_path}: starting from step 0")
        return None
    resumed = resume(path, config, run.trained, getattr(run.optimizer, "optimizer", run.optimizer), run.counts)
    if resumed.num_processes != accelerator.num_processes:
        progress.console.print(
            f"[yellow]resuming with {accelerator.num_processes} processes; the run was saved "
            f"with {resumed.num_processes}, so its data order changes"
        )
    if main:
        progress.console.print(f"resuming from step {resumed.step} of {config.steps} ({path})")
    return resumed


@dataclass(frozen=True)
class Record:
    """What the checkpoint says about the run that wrote it."""

    config: TrainConfig
    data: TrainingData
    sequences: Sequences
    command: str | None


def write_checkpoint(
    record: Record, accelerator: Accelerator, run: Run, step: int, history: list[dict], last_losses: dict
) -> None:
    """The training state (for a resume) and the calm checkpoint, as of `step` steps."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    config, world, out = record.config, accelerator.num_processes, Path(record.config.out)
    save_state(
        config.work_path / STATE_FILE,
        run.trained,
        getattr(run.optimizer, "optimizer", run.optimizer),
        step,
        state_meta(config, world, history),
        run.counts,
    )
    sequences = record.sequences.all
    extra = {
        "training": {
            "command": record.command or f"calm.training.train({config!r})",
            "mode": config.mode,
            "config": config.to_dict(),
            "data": list(record.data.files),
            "steps": step,
            "total_steps": config.steps,
            "final_losses": last_losses,
            "positions": record.sequences.num_positions,
            "sequences": len(sequences),
            "summaries": sum(1 for s in sequences if s.kind == "summary"),
            "backbone_source": config.model,
            "torch": torch.__version__,
            "num_processes": world,
        }
    }
    if run.save_backbone is not None:
        run.save_backbone(out)
    heads_config = run.heads.config if run.heads is not None else None
    save_checkpoint(out, CheckpointConfig(backbone=run.backbone, heads=heads_config, extra=extra), run.heads)


Save = Callable[[int, "list[dict]", dict], None]  # (step, history, last losses): write the checkpoint


def run_steps(
    config: TrainConfig,
    accelerator: Accelerator,
    run: Run,
    resumed: Resumed | None,
    progress: ProgressUi,
    save: Save,
    callback: Callable[[int, dict], None] | None,
) -> tuple[list[dict], dict]:
    """Steps from the resumed one (or 0) to config.steps; the log windows of this run, and the last one."""
    start, before = (resumed.step, list(resumed.history)) if resumed else (0, [])
    history: list[dict] = []
    window: dict[str, list[float]] = {}
    last: dict = before[-1] if before else {}
    task = progress.add_task(config.mode, total=config.steps)
    progress.update(task, completed=start)
    for step in range(start, config.steps):
        lr = learning_rate(config, step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, metrics = run.step(step)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(run.params, config.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            last = {"step": done, "lr": lr, **{k: sum(v) / len(v) for k, v in window.items()}}
            history.append(last)
            window = {}
            if accelerator.is_main_process:
                progress.console.print(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items())
                )
        progress.advance(task)
        progress.update(task, info=" ".join(f"{k}={v[-1]:.3f}" for k, v in window.items()) if window else "")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done, before + history, last)
        if callback is not None:
            callback(done, dict(last))
    if start >= config.steps:
        save(config.steps, before + history, last)  # a resume of a finished run rewrites its checkpoint
    return history, last


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to 10 % of the peak."""
    peak = config.learning_rate
    warm = int(config.warmup * config.steps)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---- the entry point ------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    command: str | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train exit heads (mode 'heads'), fine-tune the backbone (mode 'finetune') or train LoRA adapters
    and the exit heads (mode 'lora'); see calm.training.

    callback(step, losses) runs after every step once its checkpoint (if any) is written; raising
    from it interrupts training like a crash would (the tests use that to check resuming).
    """
    t_start = time.perf_counter()
    data = read_training_data(config.data, config.max_docs)
    _warn_skipped(data)
    accelerator = make_accelerator(config)
    if config.mode == "lora" and accelerator.num_processes > 1:
        raise InputError("LoRA training runs in one process (several GPUs: use mode finetune)")
    loaded = load(config, accelerator)
    t_loaded = time.perf_counter()
    with progress_bar(progress and accelerator.is_main_process) as bar:
        ui = ProgressUi(bar)
        sequences = training_sequences(loaded.calm, data, config, accelerator, ui)
        torch.manual_seed(config.seed)
        t_build = time.perf_counter()
        run = BUILDERS[config.mode](config, accelerator, loaded, sequences, ui)
        resumed = resume_run(config, accelerator, run, ui)
        t_train = time.perf_counter()
        save = partial(write_checkpoint, Record(config, data, sequences, command), accelerator, run)
        history, last = run_steps(config, accelerator, run, resumed, ui, save, callback)
        t_end = time.perf_counter()
    steps_run = config.steps - resumed.step if resumed else config.steps
    timings = {
        "load": t_loaded - t_start,
        "summaries": sequences.summaries_seconds,
        "features": t_train - t_build,
        "train": t_end - t_train,
        "total": t_end - t_start,
        "per_step": (t_end - t_train) / steps_run if steps_run > 0 else float("nan"),
        "per_summary": sequences.summaries_seconds / sequences.summaries_generated
        if sequences.summaries_generated
        else float("nan"),
    }
    return TrainResult(
        out=Path(config.out),
        mode=config.mode,
        steps=config.steps,
        steps_this_run=max(0, steps_run),
        resumed_from=resumed.step if resumed else None,
        final_losses=dict(last),
        history=tuple(history),
        num_positions=sequences.num_positions,
        num_sequences=len(sequences.all),
        summaries_generated=sequences.summaries_generated,
        timings=timings,
        heads=run.heads.cpu().eval() if run.heads is not None else None,
    )
