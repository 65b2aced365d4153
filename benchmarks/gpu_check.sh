#!/usr/bin/env bash
# The performance issue's GPU check (one H100 / H200, a few minutes): training throughput of the
# harness, eager and compiled, against a plain PyTorch loop, transformers' model and
# transformers.Trainer, for GPT-2 124M at seq 1024 and llama-1b at seq 2048 in bf16; a profile of
# the GPT-2 step (top kernels, host syncs between log steps under set_sync_debug_mode); then the
# Llama 3 8B LoRA goals (benchmarks/lora_gpu.sh's three Llama cases; the families' recipes and
# kernels are benchmarks/families_gpu.sh). Writes benchmarks/results/gpu_throughput_{gpt2,llama1b}.json,
# gpu_profile_gpt2{,_compile}.json and lora_gpu.json.
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke     # tiny shapes on the CPU: tests this script
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
if [[ "${1:-}" == "--smoke" ]]; then
  shape=(--n-layer 2 --n-embd 32 --n-head 2 --vocab-size 256 --seq-len 16 --micro-batch 2 --warmup 1 --steps 2 --repeats 1 --device cpu)
  python -m benchmarks.throughput "${shape[@]}" --precisions bf16 --out "${OUT:-/tmp}/gpu_throughput_smoke.json" \
    --systems trainer trainer_compile plain_torch hf_loop hf_trainer
  python -m benchmarks.profile_step --n-layer 2 --n-embd 32 --n-head 2 --seq-len 16 --micro-batch 2 --device cpu \
    --warmup 1 --steps 2 --out "${OUT:-/tmp}/gpu_profile_smoke.json"
  bash benchmarks/lora_gpu.sh --smoke --steps 4 --out "${OUT:-/tmp}/lora_gpu_smoke.json" --runs "${OUT:-/tmp}/lora_gpu_runs"
  exit 0
fi
systems=(--systems trainer trainer_compile plain_torch hf_loop hf_trainer)
python -m benchmarks.throughput --model gpt2 --seq-len 1024 --micro-batch 16 --precisions bf16 "${systems[@]}" \
  --out benchmarks/results/gpu_throughput_gpt2.json
python -m benchmarks.throughput --model llama-1b --seq-len 2048 --micro-batch 4 --precisions bf16 "${systems[@]}" \
  --out benchmarks/results/gpu_throughput_llama1b.json
python -m benchmarks.profile_step --model gpt2 --seq-len 1024 --micro-batch 16 \
  --out benchmarks/results/gpu_profile_gpt2.json
python -m benchmarks.profile_step --model gpt2 --seq-len 1024 --micro-batch 16 --compile \
  --out benchmarks/results/gpu_profile_gpt2_compile.json
bash benchmarks/lora_gpu.sh --cases lora_checkpointed lora_no_checkpointing qlora_checkpointed
