#!/usr/bin/env bash
# The preference and RL recipes on one H100 / H200, each on a random base of its shape (no checkpoint there)
# with records the script writes: experiment=llama3-8b-dpo-lora on synthetic pairs, qwen3-8b-grpo-lora on
# synthetic prompts (benchmarks/preference_gpu.py). STEPS steps each (default 3; the first is left out of the
# medians): step time, tokens/s (rows' and completions'), peak memory against trainer.estimate's, and for GRPO
# the generation's time and share of the step. About 5 minutes on an H100 at the recipes' shapes (not yet
# measured: a random base never stops early, so every GRPO rollout runs 1024 new tokens for 64 rows).
# Prints a table; writes $OUT/preference_gpu.json (with the runs' stderr beside it) or benchmarks/results/.
#   bash benchmarks/preference_gpu.sh                                  # both recipes, on the GPU machine
#   STEPS=2 bash benchmarks/preference_gpu.sh --cases qwen3-8b-grpo-lora --set objective.max_new_tokens=256
#   bash benchmarks/preference_gpu.sh --tiny                           # tiny shapes on the CPU: tests this script
# A GPU machine with PyTorch but without hydra-core / omegaconf and no network: make their (pure-Python) wheels
# beforehand, `pip wheel --no-deps -w .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3`,
# carry .whl, and run `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
# PYTHONPATH=/tmp/site bash benchmarks/preference_gpu.sh` (trl, transformers, wandb are not imported by the run).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
runs="${TMPDIR:-/tmp}/preference_gpu_runs"
status=0
python -m benchmarks.preference_gpu --steps "${STEPS:-3}" --out "$results/preference_gpu.json" --runs "$runs" "$@" \
  || status=$?
if [[ -n "${OUT:-}" ]]; then  # the runs' logs come back with the JSON (the device returns only $OUT)
  for log in "$runs"/*/stderr.log; do
    [[ -f "$log" ]] && cp "$log" "$OUT/$(basename "$(dirname "$log")").stderr.log"
  done
fi
exit "$status"
