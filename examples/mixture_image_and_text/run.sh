#!/usr/bin/env bash
# A mixture of an image dataset and a text-only dataset -> one validated LLaMA-Factory dataset. Offline.
# Usage: bash run.sh [OUT]   (default out/mixture_image_and_text; MMDATA may be overridden)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MMDATA="${MMDATA:-mmdata}"
OUT="${1:-out/mixture_image_and_text}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

echo "== 1. mmdata build (30 formula images + 12 text-only records, interleaved by seed; 4 held out)"
$MMDATA build "$HERE/recipe.yaml" --quiet --set output.dir="$OUT/build"

echo "== 2. mmdata validate"
$MMDATA validate "$OUT/build"
