#!/usr/bin/env bash
# DeepSpeed's own launcher, for people who start DeepSpeed jobs that way. torchrun works as
# well for every strategy, zero1-3 included (DeepSpeed reads torchrun's RANK / WORLD_SIZE /
# MASTER_ADDR variables), and is what single_node.sh, multi_node.sh and slurm/ use.
# Every argument is passed to the trainer as a Hydra override.
#
#   bash launch/deepspeed.sh parallel=zero2                       # this machine, all its GPUs
#   NPROC=2 bash launch/deepspeed.sh parallel=zero3 model=gpt2    # 2 ranks (CPU: 2 processes)
#   HOSTFILE=hosts NNODES=2 MASTER_ADDR=node0 bash launch/deepspeed.sh parallel=zero3 \
#       hydra.run.dir=/shared/runs/z3      # from node0; ssh + pdsh start the other nodes
#   NO_SSH=1 NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=node0 bash launch/deepspeed.sh ...
#                                          # on each node, no ssh (like multi_node.sh)
#
# Variables (all optional):
#   NPROC         processes per node. Default: visible GPUs; on a CPU-only machine 2, with
#                 DS_ACCELERATOR=cpu so DeepSpeed does not look for a GPU.
#   MASTER_ADDR   address of the node that hosts rank 0 (default 127.0.0.1 on one node).
#   MASTER_PORT   its port for torch.distributed's store (default 29500).
#   HOSTFILE      MPI-style hostfile ("node0 slots=8" per line): the launcher starts the other
#                 nodes through pdsh over passwordless ssh. Needs pdsh on the first node.
#   NNODES        how many hosts of HOSTFILE to use, or the node count with NO_SSH=1.
#   NO_SSH=1      launch independently on each node (run this script on every node with its
#                 NODE_RANK, 0 on MASTER_ADDR): no ssh, no pdsh, no hostfile.
#   PYTHON        the interpreter that runs the launcher and the trainer (default: python).
#   OMP_NUM_THREADS  threads per rank; default: CPU cores / NPROC (at least 1). DeepSpeed's
#                 launcher sets none, so without it every rank claims every core.
#
# --no_local_rank: otherwise the launcher appends --local_rank=N to the command line, which is
# not a Hydra override; ranks read LOCAL_RANK from the environment instead.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPUS=$(count_gpus)
if [[ "${GPUS}" -eq 0 ]]; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
if [[ -z "${NPROC:-}" ]]; then
    NPROC=${GPUS}
    if [[ "${NPROC}" -eq 0 ]]; then
        NPROC=2
    fi
fi
set_omp_threads "${NPROC}"
MASTER_PORT=${MASTER_PORT:-29500}

launcher_args=(--num_gpus "${NPROC}" --master_port "${MASTER_PORT}")
if [[ -n "${MASTER_ADDR:-}" ]]; then
    launcher_args+=(--master_addr "${MASTER_ADDR}")
fi
if [[ "${NO_SSH:-0}" == "1" ]]; then
    launcher_args+=(--no_ssh
        --num_nodes "${NNODES:?NO_SSH=1 needs NNODES}"
        --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (0 on MASTER_ADDR)}")
    : "${MASTER_ADDR:?NO_SSH=1 needs MASTER_ADDR, the address of node 0}"
elif [[ -n "${HOSTFILE:-}" ]]; then
    launcher_args+=(--hostfile "${HOSTFILE}")
    if [[ -n "${NNODES:-}" ]]; then
        launcher_args+=(--num_nodes "${NNODES}")
    fi
fi

echo "deepspeed: ${NPROC} processes per node, OMP_NUM_THREADS=${OMP_NUM_THREADS}," \
    "accelerator ${DS_ACCELERATOR:-auto}" >&2

# `python -m deepspeed.launcher.runner` is the `deepspeed` command, run by the chosen interpreter.
exec "${PYTHON}" -m deepspeed.launcher.runner \
    "${launcher_args[@]}" \
    --no_local_rank \
    --module trainer "$@"
