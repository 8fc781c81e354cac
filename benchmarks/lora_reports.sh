#!/usr/bin/env bash
# After benchmarks/train_smollm2_lora.sh: calibrate the CALM-LoRA checkpoint on the calib split with a
# fixed threshold (tau 0) and with CALM's decay (tau 4), then (once the chosen one is shipped in
# calm/assets/smollm2) every report of the fine-tuned default on the test split.
#
#   benchmarks/lora_reports.sh calibrate        # -> $CK-tau{0,4} (build/smollm2-lora-tau{0,4}), prints both tables
#   benchmarks/lora_reports.sh reports TAU      # after copying the better one into calm/assets/smollm2
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
CALM=${CALM:-.venv/bin/calm}
DATA=${DATA:-../shared/data/xsum}
CK=${CK:-build/smollm2-lora}
GRID=${GRID:-0.99,0.98,0.97,0.96,0.95,0.93,0.9,0.85}
COMMON=(--max-doc-tokens 256 --max-new-tokens 32 --batch-size 8)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

calibrate_one() {
    TAU=$1
    OUT=$CK-tau$TAU
    rm -rf "$OUT" && mkdir -p "$OUT"
    cp "$CK"/calm_config.json "$CK"/exit_heads.safetensors "$CK"/adapter_config.json "$CK"/adapter_model.safetensors "$OUT"/
    OMP_NUM_THREADS=1 "$CALM" calibrate --model "$OUT" --data "$DATA/calib.jsonl" --limit 120 "${COMMON[@]}" \
        --measure classifier --thresholds "$GRID" --decay-tau "$TAU" --delta 0.1 --epsilon 0.05 --out "$OUT" --overwrite \
        --work-dir "build/calibrate-$(basename "$CK")-tau$TAU"
}

calibrate() {      # both schedules side by side, one core each
    calibrate_one 0 > "$CK-calibrate-tau0.log" 2>&1 &
    calibrate_one 4 > "$CK-calibrate-tau4.log" 2>&1 &
    wait
    tail -n 14 "$CK-calibrate-tau0.log" "$CK-calibrate-tau4.log"
}

reports() {
    TAU=$1
    "$CALM" eval --model smollm2-base --data "$DATA/test.jsonl" --limit 100 "${COMMON[@]}" --measure state \
        --thresholds 1.0 --out build/eval-smollm2-base
    "$CALM" eval --model calm/assets/smollm2 --data "$DATA/test.jsonl" --limit 100 "${COMMON[@]}" \
        --measure classifier --thresholds "$GRID" --decay-tau "$TAU" --out build/eval-smollm2-lora
    mkdir -p benchmarks/results/eval_smollm2_lora_cpu
    cp build/eval-smollm2-lora/eval.{json,md} build/eval-smollm2-lora/rouge_vs_*.png benchmarks/results/eval_smollm2_lora_cpu/
    "$PY" benchmarks/calibration_report.py --model calm/assets/smollm2 --data "$DATA/test.jsonl" --limit 100 \
        --deltas 0.05,0.1,0.2 --eval-dir build/eval-smollm2-lora --out benchmarks/results
    "$PY" benchmarks/quality_lora.py --base-eval build/eval-smollm2-base/eval.json \
        --tuned-eval build/eval-smollm2-lora/eval.json --calibration benchmarks/results/calibration_test.json
    "$PY" benchmarks/exit_ceiling.py calm/assets/smollm2 --docs 100 --name exit_ceiling_smollm2_lora \
        --cache build/lora-summaries.jsonl --eval benchmarks/results/eval_smollm2_lora_cpu/eval.json
    "$PY" benchmarks/bench_lora.py --model calm/assets/smollm2 --docs 20 --tolerances 0.05,0.1,0.2
}

"$@"
