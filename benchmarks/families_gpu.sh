#!/usr/bin/env bash
# The model-families issue's GPU check (one H100 / H200): the later families' kernels against their
# references (sliding-window and soft-capped attention, the MoE grouped matmul: benchmarks/families_gpu.py),
# then the shipped recipes experiment=qwen3-8b-lora / -qlora, gemma3-12b-lora / -qlora and
# qwen3-30b-a3b-lora / -qlora on random bases of their shapes, each peak against trainer.estimate's
# (benchmarks/lora_gpu.sh). Writes benchmarks/results/families_gpu.json and lora_gpu_recipes.json.
#   bash benchmarks/families_gpu.sh            # on the GPU machine
#   bash benchmarks/families_gpu.sh --smoke    # tiny shapes on the CPU: tests this script
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
recipes=(qwen3-8b-lora qwen3-8b-qlora gemma3-12b-lora gemma3-12b-qlora qwen3-30b-a3b-lora qwen3-30b-a3b-qlora)
if [[ "${1:-}" == "--smoke" ]]; then
  python -m benchmarks.families_gpu --smoke --out "${OUT:-/tmp}/families_gpu_smoke.json"
  bash benchmarks/lora_gpu.sh --smoke --steps 2 --cases "${recipes[@]}" --out "${OUT:-/tmp}/lora_gpu_recipes_smoke.json" \
    --runs "${OUT:-/tmp}/lora_gpu_recipes_runs"
  exit 0
fi
python -m benchmarks.families_gpu --out benchmarks/results/families_gpu.json
bash benchmarks/lora_gpu.sh --cases "${recipes[@]}" --out benchmarks/results/lora_gpu_recipes.json
