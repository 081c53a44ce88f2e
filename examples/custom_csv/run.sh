#!/usr/bin/env bash
# Your own CSV (image_path,text) -> a validated LLaMA-Factory dataset. Offline; the data is generated here.
# Usage: bash run.sh [OUT]   (default out/custom_csv; MMDATA and PYTHON may be overridden)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MMDATA="${MMDATA:-mmdata}"
PYTHON="${PYTHON:-python3}"
OUT="${1:-out/custom_csv}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

echo "== 1. your data: $OUT/my_dataset/{train.csv,images/}, and the recipe next to the CSV"
"$PYTHON" "$HERE/make_data.py" "$OUT/my_dataset"
cp "$HERE/recipe.yaml" "$OUT/my_dataset/recipe.yaml"

echo "== 2. mmdata build"
$MMDATA build "$OUT/my_dataset/recipe.yaml" --quiet --set output.dir="$OUT/build"

echo "== 3. rejected rows, with the reason (rejects.jsonl)"
cat "$OUT/build/rejects.jsonl"

echo "== 4. mmdata validate"
$MMDATA validate "$OUT/build"
