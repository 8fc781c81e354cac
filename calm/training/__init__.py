"""Training exit heads by self-distillation (CALM §5), and CALM fine-tuning of the backbone, whole
or through LoRA adapters.

Mode ``heads`` (default): the backbone stays frozen. Training positions are the predictions the
model itself made while writing greedy summaries of training documents (prompt: the summary prompt
of calm.prompts.documents), plus random positions of plain-text chunks. The backbone runs once per sequence
under no_grad with output_hidden_states=True and the hidden states of every layer at those
positions are kept. Each step then samples a minibatch of positions and a few exit layers per
position (the full-vocabulary LM head is the expensive part on CPU) and trains

- the low-rank maps: KL(final layer's next-token distribution || layer k's, through
  Network.token_logits = lm_head(final_norm(h + (h A_k) B_k))), and
- the exit classifier: class-balanced BCE on the detached hidden state, against the oracle label
  "layer k's (transformed) argmax equals the final layer's argmax". The positive rate of each
  layer is tracked with decayed counts and sets that layer's pos_weight = negatives / positives.

Mode ``finetune``: CALM's fine-tuning of the backbone itself, the average of every layer's LM loss
through the shared final norm and LM head with weights proportional to the layer index
(w_k = k / sum_j j). Targets are the reference summaries where the data has them (the model's own
greedy summaries otherwise) and the next tokens of text chunks.

Mode ``lora``: LoRA adapters of the backbone and the exit heads, distilled from the original model
(calm.training.lora).

Runs on CPU or GPU through accelerate (``accelerate launch -m calm.training ...`` for several GPUs;
bf16 autocast on GPU). Data order is a pure function of (seed, step), and periodic checkpoints
hold the trained weights, the optimizer moments, the step and the RNG state in safetensors (nothing
is pickled), so ``resume`` continues to the same result as an uninterrupted run.

The modules: config (TrainConfig, TrainResult), data (files, the sequences that train), summaries
(the model's own summaries and their cache), order (seeded randomness, the data order), features
(hidden states), objectives (the modes' objectives and losses), modes (what heads and finetune
train, and their steps), lora (mode lora's peft wiring), state (the training
state and resuming), progress (the progress display, below every other module), loop (`train`: load,
build, resume, the step loop, checkpoints) and agreement (the per-layer agreement report).

May import every floor of calm below it, the model facade and bench included; never calm.eval or calm.cli.
"""

from calm.checkpoints.checkpoint import BACKBONE_DIR
from calm.checkpoints.checkpoint import save_backbone as _save_backbone
from calm.training.agreement import (
    SummaryFeatures,
    agreement_markdown,
    agreement_report,
    layer_agreement,
    summary_features,
)
from calm.training.config import MODES, TrainConfig, TrainResult
from calm.training.data import (
    TrainingData,
    TrainSequence,
    lora_sequences,
    read_training_data,
    read_training_jsonl,
    summary_sequence,
    text_chunks,
)
from calm.training.features import Features, hidden_features, last_state_is_normed
from calm.training.loop import adapted_backbone, learning_rate, train
from calm.training.objectives import (
    COUNT_DECAY,
    FinetuneObjective,
    HeadsObjective,
    LoraObjective,
    classifier_logits,
    layer_weights,
)
from calm.training.order import EpochSampler
from calm.training.state import RESUME_FREE, STATE_FILE, check_fingerprint, load_state, save_state
from calm.training.summaries import SUMMARIES_FILE, generate_summaries

__all__ = [
    "BACKBONE_DIR",
    "COUNT_DECAY",
    "MODES",
    "RESUME_FREE",
    "STATE_FILE",
    "SUMMARIES_FILE",
    "EpochSampler",
    "Features",
    "FinetuneObjective",
    "HeadsObjective",
    "LoraObjective",
    "SummaryFeatures",
    "TrainConfig",
    "TrainResult",
    "TrainSequence",
    "TrainingData",
    "_save_backbone",
    "adapted_backbone",
    "agreement_markdown",
    "agreement_report",
    "check_fingerprint",
    "classifier_logits",
    "generate_summaries",
    "hidden_features",
    "last_state_is_normed",
    "layer_agreement",
    "layer_weights",
    "learning_rate",
    "load_state",
    "lora_sequences",
    "read_training_data",
    "read_training_jsonl",
    "save_state",
    "summary_features",
    "summary_sequence",
    "text_chunks",
    "train",
]
