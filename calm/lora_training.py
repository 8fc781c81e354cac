"""CALM fine-tuning with LoRA: make the backbone exit-ready while its full-depth output stays put.

Self-distillation toward the original model. Per step, for a batch of sequences:
- the teacher is the original model (peft's adapters disabled), run once under no_grad: its
  final-layer next-token distribution at the loss positions;
- a rotating subset of exit layers (`layers_per_step` of min_exit_layer..L-1, LayerSkip-style)
  reads each layer's state through its exit head (low-rank map, then the shared final norm and
  LM head) and is pulled toward the teacher by KL, weighted as in CALM (w_k proportional to k);
- the anchor: KL of the adapted model's own final layer to the teacher, weighted by `anchor`,
  keeps the full model where it was;
- the exit classifier learns, on the detached states, whether layer k's token equals the adapted
  model's final token (class-balanced by decayed per-layer counts).

Loss positions are the reference summary's positions plus `doc_positions` random positions of the
document (and random positions of text chunks), so the vocabulary-sized work stays small. Only
the LoRA matrices and the exit heads train. The state (adapters, heads, AdamW moments, step, RNG)
is saved in safetensors every `checkpoint_every` steps; a resume continues bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from calm import lora
from calm.adapters import adapter_for
from calm.checkpoint import CheckpointConfig, is_checkpoint, load_heads, read_config, save_checkpoint
from calm.data import summary_prompt, truncate_document
from calm.errors import InputError, UnsupportedModelError
from calm.heads import ExitHeads, HeadsConfig
from calm import training as tr

ANCHOR_NAME = "anchor"


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor        # [B, T] long, right-padded
    mask: torch.Tensor       # [B, T] long
    rows: torch.Tensor       # [P] long: loss positions (rows, cols)
    cols: torch.Tensor       # [P] long


def lora_spec(config: "tr.TrainConfig") -> lora.LoraSpec:
    layers = None
    if config.lora_layers:
        first, _, last = config.lora_layers.partition("-")
        layers = tuple(range(int(first), int(last or first) + 1))
    return lora.LoraSpec(rank=config.lora_rank, alpha=2.0 * config.lora_rank, layers=layers)


def lora_sequences(calm, data: "tr.TrainingData", config: "tr.TrainConfig") -> list["tr.TrainSequence"]:
    """Prompt + reference summary of every document with a summary (loss on the summary and on
    doc_positions random document positions), and the text chunks."""
    eos = calm.eos_token_ids[:1]
    out = []
    for number, (source, record) in enumerate(data.documents):
        if not (isinstance(record.summary, str) and record.summary.strip()):
            continue
        prompt = summary_prompt(truncate_document(calm.tokenizer, record.document, config.max_doc_tokens))
        prompt_ids = tr._prompt_ids(calm, prompt, config.summary_tokens)
        target = calm.tokenizer(record.summary.strip(), add_special_tokens=False)["input_ids"] + list(eos)
        seq = tr.summary_sequence(prompt_ids, target, "reference", source)
        doc = torch.randperm(len(prompt_ids) - 1, generator=tr._generator(config.seed, "doc", number))
        extra = sorted(doc[:config.doc_positions].tolist())
        positions = tuple(extra) + seq.positions
        out.append(tr.TrainSequence(ids=seq.ids, positions=positions, targets=tuple(seq.ids[p + 1] for p in positions),
                                    kind="reference", source=source))
    return out + tr.text_chunks(calm.tokenizer, data.texts, config)


def make_batch(sequences: Sequence["tr.TrainSequence"], device: torch.device) -> Batch:
    width = max(len(s.ids) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    rows, cols = [], []
    for r, s in enumerate(sequences):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        mask[r, :len(s.ids)] = 1
        rows += [r] * len(s.positions)
        cols += list(s.positions)
    return Batch(ids.to(device), mask.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device))


class LoraObjective(nn.Module):
    """KL of sampled exit layers and of the final layer to the original model, and the classifier."""

    def __init__(self, peft_model: nn.Module, heads: ExitHeads, normed_last: bool):
        super().__init__()
        self.model = peft_model
        self.heads = heads
        self.adapter = adapter_for(peft_model.get_base_model())
        self.normed_last = normed_last

    def _log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h [P, D] after `layer` layers -> log-probabilities [P, V] through the exit head."""
        a = self.adapter
        if layer < a.num_layers:
            h = a.final_norm(self.heads.transform(h, torch.full((h.shape[0],), layer, device=h.device)))
        elif not self.normed_last:
            h = a.final_norm(h)
        return a.lm_head(h).float().log_softmax(-1)

    def teacher(self, batch: Batch) -> torch.Tensor:
        """The original model's final-layer log-probabilities at the loss positions [P, V]."""
        with torch.no_grad(), self.model.disable_adapter():
            hs = tr._forward(self.model, batch.ids, batch.mask).hidden_states
            return self._log_probs(hs[-1][batch.rows, batch.cols], self.adapter.num_layers)

    def forward(self, batch: Batch, layers: Sequence[int], teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per sampled layer: KL [k], classifier logits and labels [k, P]; the anchor KL []."""
        hs = tr._forward(self.model, batch.ids, batch.mask).hidden_states
        final = self._log_probs(hs[-1][batch.rows, batch.cols], self.adapter.num_layers)          # [P, V]
        final_top = final.detach().argmax(-1)
        kls, logits, labels = [], [], []
        for layer in layers:
            h = hs[layer][batch.rows, batch.cols]                                                 # [P, D]
            student = self._log_probs(h, layer)
            kls.append(F.kl_div(student, teacher, reduction="batchmean", log_target=True))
            labels.append((student.detach().argmax(-1) == final_top).float())
            layer_ids = torch.full((h.shape[0],), layer, device=h.device)
            logits.append(tr.classifier_logits(self.heads, h.detach(), layer_ids))
        anchor = F.kl_div(final, teacher, reduction="batchmean", log_target=True)
        return {"kl": torch.stack(kls), "logits": torch.stack(logits), "labels": torch.stack(labels),
                ANCHOR_NAME: anchor, "final_agree": (final_top == teacher.argmax(-1)).float().mean()}


class Trainable(nn.Module):
    """The trained tensors only (LoRA matrices and exit heads), under stable names, for the state file."""

    def __init__(self, peft_model: nn.Module, heads: ExitHeads):
        super().__init__()
        named = [(f"lora.{n}", p) for n, p in peft_model.named_parameters() if p.requires_grad]
        named += [(f"heads.{n}", p) for n, p in heads.named_parameters() if p.requires_grad]
        for name, p in named:
            self.register_parameter(name.replace(".", "__"), p)


def sample_layers(config: "tr.TrainConfig", num_layers: int, step: int) -> list[int]:
    """The exit layers trained at `step`: a seeded subset of min_exit_layer..L-1 (LayerSkip's rotation)."""
    first = min(config.min_exit_layer, num_layers - 1)
    candidates = torch.arange(first, num_layers)
    k = min(config.layers_per_step, candidates.numel())
    order = torch.randperm(candidates.numel(), generator=tr._generator(config.seed, "lora-layers", step))
    return sorted(candidates[order[:k]].tolist())


def step_loss(config: "tr.TrainConfig", out: dict[str, torch.Tensor], layers: Sequence[int],
              counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss and its metrics. counts [2, L-1] float64: decayed positive / all label counts per layer."""
    idx = torch.tensor(layers) - 1
    weights = torch.tensor(layers, dtype=torch.float32, device=out["kl"].device)
    exit_kl = (out["kl"] * weights).sum() / weights.sum()
    labels = out["labels"]                                                                       # [k, P]
    counts.mul_(tr.COUNT_DECAY)
    counts[0].index_add_(0, idx, labels.sum(1).double().cpu())
    counts[1].index_add_(0, idx, torch.full((len(layers),), float(labels.shape[1]), dtype=torch.float64))
    pos_weight = ((counts[1] - counts[0] + 1) / (counts[0] + 1)).clamp(0.01, 100.0).float()[idx]
    bce = F.binary_cross_entropy_with_logits(out["logits"], labels,
                                             pos_weight=pos_weight[:, None].to(labels.device).expand_as(labels))
    loss = exit_kl + config.anchor * out[ANCHOR_NAME] + bce
    metrics = {"exit_kl": exit_kl.item(), "anchor_kl": out[ANCHOR_NAME].item(), "bce": bce.item(),
               "agree": labels.mean().item(), "final_agree": out["final_agree"].item()}
    return loss, metrics


def initial_heads(model_ref: str, num_layers: int, hidden: int, config: "tr.TrainConfig") -> ExitHeads:
    """Exit heads to start from: the model reference's own (a checkpoint, or an alias's shipped ones)
    when they fit, else fresh ones."""
    from calm.model import default_checkpoint
    source = Path(model_ref) if is_checkpoint(model_ref) else default_checkpoint(model_ref)
    fresh = HeadsConfig(num_layers=num_layers, hidden_size=hidden, rank=config.rank,
                        min_layer=config.min_exit_layer)
    if source is not None:
        stored = read_config(source).heads
        if stored is not None and stored.rank == config.rank:
            heads = load_heads(source, stored, num_layers, hidden)
            fresh_heads = ExitHeads(fresh)
            fresh_heads.load_state_dict(heads.state_dict())
            return fresh_heads
    return ExitHeads(fresh)


def train_lora(config: "tr.TrainConfig", *, command: str | None = None, progress: bool = True,
               callback: Callable[[int, dict], None] | None = None) -> "tr.TrainResult":
    """Mode 'lora' of calm.training.train."""
    from calm.loading import load_backbone
    from calm.model import CalmModel

    t_start = time.perf_counter()
    data = tr.read_training_data(config.data, config.max_docs)
    out, work = Path(config.out), config.work_path
    accelerator = tr._accelerator(config)
    if accelerator.num_processes > 1:
        raise InputError("LoRA training runs in one process (several GPUs: use mode finetune)")
    load_ref = tr._backbone_refs(config.model)
    loaded = load_backbone(load_ref, dtype=torch.float32, device=accelerator.device)
    base, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(base)
    if adapter.is_encoder_decoder or tokenizer is None:
        raise UnsupportedModelError("LoRA training supports decoder-only models with a tokenizer")
    calm = CalmModel(base, tokenizer, backbone=load_ref)
    normed_last = tr.last_state_is_normed(base, adapter, accelerator.device)
    sequences = [s for s in lora_sequences(calm, data, config) if s.positions]
    if not sequences:
        raise InputError("the training data produced no usable positions (no summaries, too little text)")
    torch.manual_seed(config.seed)
    heads = initial_heads(config.model, adapter.num_layers, adapter.hidden_size, config).to(accelerator.device)
    peft_model = lora.attach(base, lora_spec(config), adapter.num_layers)
    objective = LoraObjective(peft_model, heads, normed_last)
    trainable = Trainable(peft_model, heads)
    params = list(trainable.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8, foreach=False)
    sampler = tr.EpochSampler(len(sequences), config.seed)
    counts = torch.zeros(2, adapter.num_layers - 1, dtype=torch.float64)
    state_path = work / tr.STATE_FILE
    start, history_before = _resume(config, state_path, trainable, optimizer, counts)
    t_loaded = time.perf_counter()

    history: list[dict] = []
    window: dict[str, list[float]] = {}

    def checkpoint(step: int) -> None:
        meta = {"fingerprint": tr._fingerprint(config), "num_processes": 1, "history": history_before + history,
                "config": config.to_dict()}
        tr.save_state(state_path, trainable, optimizer, step, meta, {"counts": counts})
        _write_checkpoint(out, config, peft_model, heads, load_ref, data, step, history_before + history, command,
                          len(sequences))

    bar = tr._progress(progress)
    with bar:
        ui = tr._Progress(bar)
        task = ui.add_task("lora", total=config.steps)
        ui.update(task, completed=start)
        peft_model.train()
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = tr.learning_rate(config, step)
            batch = make_batch([sequences[i] for i in sampler.indices(step, config.batch_size).tolist()],
                               accelerator.device)
            layers = sample_layers(config, adapter.num_layers, step)
            with accelerator.autocast():
                out_ = objective(batch, layers, objective.teacher(batch))
                loss, metrics = step_loss(config, out_, layers, counts)
            accelerator.backward(loss)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                entry = {"step": done, "lr": optimizer.param_groups[0]["lr"],
                         **{k: sum(v) / len(v) for k, v in window.items()}}
                history.append(entry)
                window = {}
                ui.console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in entry.items()))
            ui.advance(task)
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpoint(done)
            if callback is not None:
                callback(done, dict(history[-1]) if history else {})
        if start >= config.steps:
            checkpoint(config.steps)
    t_end = time.perf_counter()
    steps_run = max(0, config.steps - start)
    timings = {"load": t_loaded - t_start, "summaries": 0.0, "features": 0.0, "train": t_end - t_loaded,
               "total": t_end - t_start, "per_step": (t_end - t_loaded) / steps_run if steps_run else float("nan"),
               "per_summary": float("nan")}
    return tr.TrainResult(out=out, mode="lora", steps=config.steps, steps_this_run=steps_run,
                          resumed_from=start or None, final_losses=dict(history[-1]) if history else {},
                          history=tuple(history), num_positions=sum(len(s.positions) for s in sequences),
                          num_sequences=len(sequences), summaries_generated=0, timings=timings,
                          heads=heads.cpu().eval())


def _resume(config, state_path: Path, trainable: nn.Module, optimizer, counts: torch.Tensor) -> tuple[int, list]:
    if not (config.resume and state_path.is_file()):
        return 0, []
    tensors, metadata = tr.load_state(state_path)
    meta = json.loads(metadata["meta"])
    tr.check_fingerprint(meta.get("fingerprint", {}), config)
    extras = tr._restore(tensors, metadata, trainable, optimizer)
    counts.copy_(extras["counts"])
    return int(metadata["step"]), meta.get("history", [])


def _write_checkpoint(out: Path, config, peft_model, heads: ExitHeads, load_ref: str, data, step: int,
                      history: list, command: str | None, num_sequences: int) -> None:
    stored_ref = tr.stored_backbone_ref(load_ref, out)
    lora.save_adapter(peft_model, out, base_ref=stored_ref)
    extra = {"training": {
        "command": command or f"calm.training.train({config!r})", "mode": "lora", "config": config.to_dict(),
        "data": list(data.files), "steps": step, "total_steps": config.steps,
        "final_losses": history[-1] if history else {}, "sequences": num_sequences,
        "backbone_source": config.model, "torch": torch.__version__}}
    save_checkpoint(out, CheckpointConfig(backbone=stored_ref, heads=heads.config,
                                          extra=extra), heads)
