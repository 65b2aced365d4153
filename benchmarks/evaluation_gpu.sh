#!/usr/bin/env bash
# In-loop downstream evaluation of an 8B model on one H100 / H200: experiment=llama3-8b-lora on a random base
# of Llama-3-8B's shape (no checkpoint there) with byte-level text the script writes, evaluating lm_eval's
# shipped tiny tasks (multiple choice, generation to a stop string, rolling log-likelihood) and a held-out
# file's perplexity at each of STEPS steps (default 2; the first holds CUDA's warm-up)
# (benchmarks/evaluation_gpu.py). Not yet run on a GPU.
# Prints a table; writes $OUT/evaluation_gpu.json (with the run's stderr beside it) or benchmarks/results/.
#   bash benchmarks/evaluation_gpu.sh                     # on the GPU machine
#   bash benchmarks/evaluation_gpu.sh --batch-size 32     # eval.batch_size
#   bash benchmarks/evaluation_gpu.sh --tiny              # tiny shapes on the CPU: tests this script
# Needs lm_eval (and its dependencies) besides what benchmarks/preference_gpu.sh needs: make the wheels
# beforehand (`pip download -d .whl "lm_eval>=0.4.13,<0.5"` plus hydra-core / omegaconf as there), carry .whl,
# and run `python3 -m pip install -q --no-index --find-links .whl --target /tmp/site lm_eval hydra-core &&
# PYTHONPATH=/tmp/site bash benchmarks/evaluation_gpu.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
runs="${TMPDIR:-/tmp}/evaluation_gpu_runs"
status=0
python -m benchmarks.evaluation_gpu --steps "${STEPS:-2}" --out "$results/evaluation_gpu.json" --runs "$runs" "$@" \
  || status=$?
if [[ -n "${OUT:-}" && -f "$runs/llama3-8b-lora/stderr.log" ]]; then
  cp "$runs/llama3-8b-lora/stderr.log" "$OUT/evaluation_gpu.stderr.log"
fi
exit "$status"
