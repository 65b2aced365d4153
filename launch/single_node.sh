#!/usr/bin/env bash
# One machine, N processes: torchrun --standalone starts a local rendezvous, so no address,
# port or job id is needed. Every argument is passed to the trainer as a Hydra override.
#
#   bash launch/single_node.sh parallel=ddp train.max_steps=1000
#   NPROC=4 bash launch/single_node.sh parallel=fsdp model=gpt2
#   bash launch/single_node.sh hydra.run.dir=runs/a checkpoint.interval=200 train.resume=auto
#       # the same command again continues runs/a from its newest checkpoint
#
# Variables (all optional):
#   NPROC            processes (ranks) on this machine. Default: the number of visible GPUs
#                    (CUDA_VISIBLE_DEVICES if set, else nvidia-smi), or 2 on a CPU-only machine
#                    (gloo; two ranks exercise every collective without oversubscribing 2 cores).
#   PYTHON           the interpreter that runs torchrun and the trainer (default: python), so a
#                    virtual environment or pyenv version is used consistently.
#   OMP_NUM_THREADS  intra-op threads per rank. Default: CPU cores / NPROC (at least 1), so the
#                    ranks share the machine instead of each claiming every core.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(count_gpus)
    if [[ "${NPROC}" -eq 0 ]]; then
        NPROC=2
    fi
fi
set_omp_threads "${NPROC}"

echo "single_node: ${NPROC} processes, OMP_NUM_THREADS=${OMP_NUM_THREADS}, python ${PYTHON}" >&2

# `python -m torch.distributed.run` is torchrun, run by the chosen interpreter.
exec "${PYTHON}" -m torch.distributed.run \
    --standalone \
    --nproc_per_node "${NPROC}" \
    -m trainer "$@"
