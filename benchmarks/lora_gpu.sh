#!/usr/bin/env bash
# The LoRA issue's single-GPU goals on one H100 / H200 (under 8 minutes): a random Llama-3-8B-shaped
# base in bf16, rank-16 adapters on all seven projections, 2 x 4096 tokens, with and without
# activation checkpointing, and QLoRA (NF4 base; needs torchao). Prints a table; writes
# benchmarks/results/lora_gpu.json.
#   bash benchmarks/lora_gpu.sh            # on the GPU machine
#   bash benchmarks/lora_gpu.sh --smoke    # a tiny shape on the CPU: tests this script
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
python -m benchmarks.lora_gpu --steps "${STEPS:-12}" "$@"
