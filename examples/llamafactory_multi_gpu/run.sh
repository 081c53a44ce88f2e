#!/usr/bin/env bash
# Multi-GPU LLaMA-Factory configs for one build: ZeRO-2 (7B), ZeRO-3 (72B) and the 72B batch-inference YAML.
# Writes and checks files only; nothing is trained here. Offline.
# Usage: bash run.sh [OUT]   (default out/llamafactory_multi_gpu; MMDATA may be overridden)
set -euo pipefail
MMDATA="${MMDATA:-mmdata}"
OUT="${1:-out/llamafactory_multi_gpu}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

echo "== 1. mmdata build latex_ocr_sample (offline; 36 train, 4 val)"
$MMDATA build latex_ocr_sample --quiet --set output.dir="$OUT/build"
$MMDATA validate "$OUT/build"

echo "== 2. Qwen2-VL-7B, LoRA, DeepSpeed ZeRO-2 (optimizer state and gradients sharded)"
$MMDATA llamafactory "$OUT/build" --model Qwen/Qwen2-VL-7B-Instruct --deepspeed 2 \
  --out-dir "$OUT/zero2_7b" --output-dir "$OUT/saves/zero2_7b/lora_sft" --batch-size 2 --grad-accum 4

echo "== 3. Qwen2-VL-72B, LoRA, DeepSpeed ZeRO-3 (weights sharded too); its predict.yaml is the batch inference"
$MMDATA llamafactory "$OUT/build" --model Qwen/Qwen2-VL-72B-Instruct --deepspeed 3 \
  --out-dir "$OUT/zero3_72b" --output-dir "$OUT/saves/zero3_72b/lora_sft" --batch-size 1 --grad-accum 8

cat > "$OUT/llamafactory_commands.sh" <<CMDS
# On one node with 8 GPUs, LLaMA-Factory 0.9.5 and deepspeed installed (pip install deepspeed):
FORCE_TORCHRUN=1 NPROC_PER_NODE=8 llamafactory-cli train $OUT/zero2_7b/train_lora.yaml
FORCE_TORCHRUN=1 NPROC_PER_NODE=8 llamafactory-cli train $OUT/zero3_72b/train_lora.yaml
# Batch inference of the 72B adapter on the val split: no DeepSpeed, one full model copy per GPU
# (~145 GB in bf16; on 80 GB GPUs use vLLM instead, see README.md):
llamafactory-cli train $OUT/zero3_72b/predict.yaml
llamafactory-cli export $OUT/zero3_72b/merge.yaml
CMDS
echo "== 4. LLaMA-Factory commands (also in $OUT/llamafactory_commands.sh)"
cat "$OUT/llamafactory_commands.sh"
