#!/usr/bin/env bash
# Build the offline LaTeX OCR sample, LoRA-train a tiny random Qwen2-VL on it (CPU), predict, score, export.
# Usage: bash run.sh [OUT]   (default out/latex_ocr_train_predict; MMDATA, PYTHON, STEPS may be overridden)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MMDATA="${MMDATA:-mmdata}"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-8}"
OUT="${1:-out/latex_ocr_train_predict}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

echo "== 1. mmdata build latex_ocr_sample (40 formulas rendered offline: 36 train, 4 val)"
$MMDATA build latex_ocr_sample --quiet --set output.dir="$OUT/build"
$MMDATA validate "$OUT/build"

echo "== 2. a tiny random Qwen2-VL (about 1 MB; its predictions are noise, it only proves the pipeline)"
$MMDATA make-tiny-model "$OUT/tiny-qwen2vl"

echo "== 3. mmdata train: $STEPS LoRA steps on the CPU, loss logged every step"
$MMDATA train --model "$OUT/tiny-qwen2vl" --dataset "$OUT/build" --output-dir "$OUT/run" \
  --max-steps "$STEPS" --learning-rate 1e-2 --per-device-train-batch-size 4 --gradient-accumulation-steps 1 \
  --logging-steps 1 --save-steps "$STEPS" --max-pixels 20000 --no-gradient-checkpointing --compile false \
  --dataloader-num-workers 0

echo "== 4. mmdata predict on the val split: generated_predictions.jsonl + metrics.json"
$MMDATA predict --model "$OUT/tiny-qwen2vl" --adapter "$OUT/run" --dataset "$OUT/build" --split val \
  --output-dir "$OUT/predict" --max-new-tokens 24 --max-pixels 20000

echo "== 5. mmdata export: adapter merged into the base model, with processor, tokenizer and chat template"
$MMDATA export --model "$OUT/tiny-qwen2vl" --adapter "$OUT/run" --output-dir "$OUT/merged"

echo "== 6. results"
"$PYTHON" "$HERE/show_results.py" "$OUT"
