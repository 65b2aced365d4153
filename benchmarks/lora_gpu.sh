#!/usr/bin/env bash
# The single-GPU LoRA recipes on one H100 / H200, each on a random base of its shape with synthetic
# tokens: Llama 3 8B's goals (rank-16 adapters on all seven projections, 2 x 4096 tokens, with and
# without activation checkpointing, and QLoRA: an NF4 base, needs torchao; under 8 minutes), then
# experiment=qwen3-8b-lora / -qlora, gemma3-12b-lora / -qlora and qwen3-30b-a3b-lora / -qlora as they
# ship, each peak set against trainer.estimate's. Prints a table; writes benchmarks/results/lora_gpu.json.
#   bash benchmarks/lora_gpu.sh                              # every case, on the GPU machine
#   bash benchmarks/lora_gpu.sh --cases qwen3-30b-a3b-lora   # some of them
#   bash benchmarks/lora_gpu.sh --smoke                      # tiny shapes on the CPU: tests this script
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
python -m benchmarks.lora_gpu --steps "${STEPS:-12}" "$@"
