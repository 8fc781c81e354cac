#!/usr/bin/env bash
# CALM fine-tuning of SmolLM2-135M-Instruct with LoRA: the adapter + exit heads shipped in
# calm/assets/smollm2 (the default checkpoint of the `smollm2` alias).
#
#   benchmarks/train_smollm2_lora.sh             # from the repository root; add --resume to continue
#   STEPS=640 LORA_RANK=32 LORA_LAYERS=all ANCHOR=4 WORK=build/train-smollm2-lora-r32 OUT=build/smollm2-lora-r32 \
#       benchmarks/train_smollm2_lora.sh             # the second run: every layer, a larger rank, a lighter anchor
#
# Data: XSum *train* reference summaries (prompt = the summary prompt of the document cut to 256
# tokens) and WikiText-2 valid.txt chunks. Never the calib or test splits. The teacher is the
# original model (peft's adapters disabled); the exit heads start from the shipped frozen-backbone
# heads. Settings from benchmarks/results/lora_sweep_smollm2.md. On the 2-core CPU a step of 2
# sequences takes about 5.5 s with the machine to itself (~110 training tokens/s).
# The state (adapters, heads, AdamW moments, step, RNG) is saved every 50 steps in the work dir
# (safetensors), so `--resume` after an interruption ends with the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
WORK=${WORK:-build/train-smollm2-lora}
OUT=${OUT:-build/smollm2-lora}
STEPS=${STEPS:-800}
LR=${LR:-6e-4}
ANCHOR=${ANCHOR:-8}
LORA_RANK=${LORA_RANK:-16}
LORA_LAYERS=${LORA_LAYERS:-0-19}          # "all": every decoder layer
LAYER_ARGS=()
[ "$LORA_LAYERS" = all ] || LAYER_ARGS=(--lora-layers "$LORA_LAYERS")
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

exec "$PY" -m calm.training \
    --model smollm2 \
    --data "$DATA/xsum/train.jsonl" \
    --data "$DATA/wikitext-2/valid.txt" \
    --out "$OUT" \
    --work-dir "$WORK" \
    --mode lora \
    --steps "$STEPS" \
    --batch-size 2 \
    --layers-per-step 4 \
    --lr "$LR" \
    --anchor "$ANCHOR" \
    --lora-rank "$LORA_RANK" \
    "${LAYER_ARGS[@]}" \
    --rank 32 \
    --min-exit-layer 8 \
    --doc-positions 16 \
    --max-doc-tokens 256 \
    --max-chunks 200 \
    --chunk-tokens 256 \
    --positions-per-chunk 32 \
    --seed 0 \
    --checkpoint-every 50 \
    --log-every 25 \
    --device cpu \
    "$@"
