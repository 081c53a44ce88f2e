#!/usr/bin/env bash
# MedTrinity-25M (25M_demo shape) -> a validated LLaMA-Factory dataset + train/predict/merge YAMLs. Offline.
# Usage: bash run.sh [OUT]   (default out/medtrinity_to_llamafactory; MMDATA, PYTHON and MODEL may be overridden)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MMDATA="${MMDATA:-mmdata}"
PYTHON="${PYTHON:-python3}"
MODEL="${MODEL:-Qwen/Qwen2-VL-2B-Instruct}"
OUT="${1:-out/medtrinity_to_llamafactory}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

echo "== 1. a 24-row offline stand-in for the gated hub dataset, in hub layout"
"$PYTHON" "$HERE/make_medtrinity_copy.py" "$OUT/hub" --rows 24

echo "== 2. mmdata build: the built-in medtrinity_demo recipe, pointed at the local copy, 4 records held out"
$MMDATA build medtrinity_demo --quiet \
  --set source.path="$OUT/hub/UCSC-VLAA--MedTrinity-25M" --set split.val=4 --set output.dir="$OUT/build"

echo "== 3. mmdata validate"
$MMDATA validate "$OUT/build"

echo "== 4. mmdata llamafactory: train_lora.yaml, predict.yaml, merge.yaml"
$MMDATA llamafactory "$OUT/build" --model "$MODEL"

cat > "$OUT/llamafactory_commands.sh" <<CMDS
# Run on a machine with LLaMA-Factory 0.9.5 and a GPU (see README.md):
llamafactory-cli train $OUT/build/train_lora.yaml
llamafactory-cli train $OUT/build/predict.yaml
llamafactory-cli export $OUT/build/merge.yaml
CMDS
echo "== 5. LLaMA-Factory commands (also in $OUT/llamafactory_commands.sh)"
cat "$OUT/llamafactory_commands.sh"
