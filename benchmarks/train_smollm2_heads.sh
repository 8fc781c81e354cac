#!/usr/bin/env bash
# Train the exit heads shipped in calm/assets/smollm2 (the default checkpoint of the `smollm2` alias).
#
#   benchmarks/train_smollm2_heads.sh            # from the repository root; add --resume to continue
#
# Data: the XSum *train* split (its documents, summarised by the model itself) and WikiText-2
# valid.txt chunks. Never the calib or test splits: calibration and every reported number depend
# on that. Sized for the 2-core CPU box, where it takes about 40-50 minutes with another job on the
# machine (about 25-30 when the machine is free):
#   399 greedy summaries (48 tokens, documents cut to 256 tokens)    ~2 s each   -> ~13 min
#   559 backbone forwards for hidden states (399 summaries + 160 chunks) ~0.9 s  ->  ~8 min
#   1200 steps of 64 positions x 4 exit layers                          ~0.93 s  -> ~19 min
# The summaries and the training state (every 100 steps) live in the work dir, so `--resume`
# after an interruption regenerates nothing and ends with the same heads.
# On a GPU, add `--device cuda` (or run it under `accelerate launch -m calm.training`).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
WORK=${WORK:-build/train-smollm2-heads}     # build/ is git-ignored: the cache and state are not shipped
# With another process on one of the two cores, OpenMP threads that spin while they wait make torch
# up to 10x slower; passive waiting keeps two threads at least as fast as one.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

exec "$PY" -m calm.training \
    --model smollm2 \
    --data "$DATA/xsum/train.jsonl" \
    --data "$DATA/wikitext-2/valid.txt" \
    --out calm/assets/smollm2 \
    --work-dir "$WORK" \
    --mode heads \
    --steps 1200 \
    --batch-size 64 \
    --layers-per-step 4 \
    --lr 3e-3 \
    --rank 32 \
    --min-exit-layer 10 \
    --seed 0 \
    --summaries-per-doc 1 \
    --summary-tokens 48 \
    --max-doc-tokens 256 \
    --gen-batch-size 16 \
    --max-chunks 160 \
    --chunk-tokens 256 \
    --positions-per-chunk 32 \
    --checkpoint-every 100 \
    --log-every 25 \
    --device cpu \
    "$@"
