#!/usr/bin/env bash
# Regenerate every committed report in benchmarks/results/ (CPU, the embedded SmolLM2 model).
# Run from the repository root after `make setup`, on a quiet machine; each step resumes if stopped.
#
#   1. engine: calm vs transformers generate at full depth, and a forced exit at layer 15 (issue 2)
#   2. heads:  benchmarks/train_smollm2_heads.sh (not re-run here: ~40 min), then the agreement report
#   3. calibrate the shipped checkpoint on the calib split (never test), fixed threshold (τ = 0) (issue 4)
#   4. eval sweep on the test split: ROUGE vs layers and speedup, tables and plots        (issues 3, 5)
#   4b. the same sweep with a fixed threshold (no CALM decay): the layers at ROUGE-L(early, full) >= 0.9 (issue 3)
#   4c. the exit replay: the oracle's layers with these heads, layers vs token errors per measure, and
#       whether richer head shapes (full-rank, MLP) would help, and what CALM fine-tuning costs here (issue 3)
#   5. certified thresholds for δ in {0.05, 0.1, 0.2} checked on the test split           (issue 4)
#   5b. adaptive vs static exits vs lossless on test; 50 calib/test splits, textual and risk consistency (issue 19)
#   6. bench: tokens/s at batch sizes 1, 8, 32, full depth vs exit policies vs transformers (issue 5),
#      on documents cut to 256 tokens and, at batch 1 and 8, to 1024 tokens
#   7. the static decode path: host syncs per token, dynamic vs static, and dynamic vs static vs
#      static+compile at batch 1 and 8, full depth and fixed:15 (issue 12; the compiles take long)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CALM=${CALM:-.venv/bin/calm}
DATA=${DATA:-../shared/data/xsum}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
GRID=0.9999,0.999,0.995,0.99,0.97,0.95

"$PY" benchmarks/bench_engine.py --docs 8 --repeats 3 --new-tokens 32 --out benchmarks/results
"$PY" benchmarks/agreement.py calm/assets/smollm2 --docs 100 --out-dir benchmarks/results \
    --cache build/agreement-summaries.jsonl
"$CALM" calibrate --model calm/assets/smollm2 --data "$DATA/calib.jsonl" --limit 120 --max-doc-tokens 256 \
    --max-new-tokens 32 --measure classifier --thresholds 0.99,0.98,0.97,0.96,0.95 --decay-tau 0 \
    --delta 0.1 --epsilon 0.05 --out calm/assets/smollm2 --overwrite --work-dir build/calibrate-smollm2
"$CALM" eval --model calm/assets/smollm2 --data "$DATA/test.jsonl" --limit 100 --max-doc-tokens 256 \
    --max-new-tokens 32 --measure classifier --thresholds "$GRID" --out build/eval-smollm2-test
mkdir -p benchmarks/results/eval_smollm2_cpu
cp build/eval-smollm2-test/eval.{json,md} build/eval-smollm2-test/rouge_vs_*.png benchmarks/results/eval_smollm2_cpu/
"$CALM" eval --model calm/assets/smollm2 --data "$DATA/test.jsonl" --limit 100 --max-doc-tokens 256 \
    --max-new-tokens 32 --measure classifier --thresholds 0.99,0.97,0.95,0.9 --decay-tau 0 --out build/eval-smollm2-test-tau0
mkdir -p benchmarks/results/eval_smollm2_cpu_tau0
cp build/eval-smollm2-test-tau0/eval.{json,md} build/eval-smollm2-test-tau0/rouge_vs_*.png benchmarks/results/eval_smollm2_cpu_tau0/
"$PY" benchmarks/exit_ceiling.py calm/assets/smollm2 --docs 100 --cache build/agreement-summaries.jsonl \
    --eval benchmarks/results/eval_smollm2_cpu_tau0/eval.json
"$PY" benchmarks/head_capacity.py --layers 15,20
"$PY" benchmarks/finetune_cost.py --steps 4
# 5b. adaptive vs static exits vs lossless on test (the calibration's τ), then CALM's validation protocol:
#     50 random 80/20 splits of calib ∪ test for textual and risk consistency, reusing both sweeps' caches (issue 19)
"$CALM" eval --model calm/assets/smollm2 --data "$DATA/test.jsonl" --limit 100 --max-doc-tokens 256 \
    --max-new-tokens 32 --measure classifier --thresholds 0.99,0.98,0.97,0.96,0.95 --static-layers 12,18,24 \
    --no-transformers --out build/eval-smollm2-test-risk
mkdir -p benchmarks/results/eval_smollm2_static
cp build/eval-smollm2-test-risk/eval.{json,md} build/eval-smollm2-test-risk/rouge_vs_*.png benchmarks/results/eval_smollm2_static/
"$PY" benchmarks/calibration_splits.py --model calm/assets/smollm2 --calib "$DATA/calib.jsonl" --calib-limit 120 \
    --calib-dir build/calibrate-smollm2 --test "$DATA/test.jsonl" --test-limit 100 \
    --test-dir build/eval-smollm2-test-risk --out benchmarks/results
"$PY" benchmarks/calibration_report.py --model calm/assets/smollm2 --data "$DATA/test.jsonl" --limit 100 \
    --deltas 0.05,0.1,0.2 --eval-dir build/eval-smollm2-test-tau0 --out benchmarks/results
"$CALM" bench --model calm/assets/smollm2 --data "$DATA/test.jsonl" --batch-sizes 1,8,32 --new-tokens 32 \
    --repeats 3 --max-doc-tokens 256 --policy fixed:15,classifier:0.5 --out benchmarks/results/bench_smollm2_cpu
"$CALM" bench --model calm/assets/smollm2 --data "$DATA/test.jsonl" --batch-sizes 1,8 --new-tokens 32 \
    --repeats 3 --max-doc-tokens 1024 --policy fixed:15,classifier:0.5 --out benchmarks/results/bench_smollm2_cpu_doc1024
"$PY" benchmarks/sync_count.py --batch-sizes 1,8 --policies full,fixed:15,classifier:0.5,softmax:0.9
"$PY" benchmarks/static_engine.py --batch-sizes 1,8 --policies full,fixed:15 --repeats 5
# 7. lossless speculative decoding: full depth, transformers generate and assistant_early_exit, calm speculative at
#    E in {8, 12, 15, 20} x k in {2, 4, 6}; the best batch-1 setting is stored with the shipped checkpoint (issue 13)
"$PY" benchmarks/bench_speculative.py --out benchmarks/results --store calm/assets/smollm2
