#!/usr/bin/env bash
# The H200 session behind benchmarks/README.md's run E: one after the other on one GPU, each step's results in
# its own folder under OUT (default bench_out) as soon as it finishes:
#   qwen2vl/  LLaMA-Factory 0.9.5 (padded, packing, neat_packing) on the LaTeX- and Med-shaped builds, mmdata padded
#             and packed (compile_scope layers), the tutorial script: one table, one process after another
#   qwen3vl/  the same contenders on Qwen3-VL-2B's architecture (random weights)
#   profile/  one profiled mmdata micro-batch per dataset (where a step's time goes)
# Needs mmdata's and LLaMA-Factory's packages importable: PYTHONPATH=<mmdata env>, LF_PATH=<LLaMA-Factory env>.
set -u
OUT=$(realpath -m "${1:-bench_out}")
ROOT=${ROOT:-/tmp/bench}
STEPS=${STEPS:-12}
HARNESS="python3 $(dirname "$0")/train_gpu.py"
PEERS="$HARNESS peers --root $ROOT --steps $STEPS --warmup 3 --lf-python python3 --lf-path ${LF_PATH:-}"
mkdir -p "$OUT"

$HARNESS prepare --root "$ROOT" --n 192 > "$OUT/prepare_qwen2vl.log" 2>&1 || exit 1
$PEERS --out "$OUT/qwen2vl" \
    --mmdata latex:16x1:pad:layers,latex:16x1:pack:layers,med:16x1:pad:layers,med:16x1:pack:layers \
    --tutorial latex,med --tutorial-steps 5 > "$OUT/qwen2vl.log" 2>&1

$HARNESS prepare --root "$ROOT" --n 192 --family qwen3_vl > "$OUT/prepare_qwen3vl.log" 2>&1 || exit 1
$PEERS --out "$OUT/qwen3vl" --family qwen3_vl --llamafactory latex:pad,med:pad,med:packing \
    --mmdata latex:16x1:pad:layers,med:16x1:pad:layers,med:16x1:pack:layers --tutorial '' \
    > "$OUT/qwen3vl.log" 2>&1

$PEERS --out "$OUT/profile" --llamafactory '' --mmdata '' --tutorial '' \
    --profile med:16:pad:layers,latex:16:pad:layers > "$OUT/profile.log" 2>&1
touch "$OUT/done"
