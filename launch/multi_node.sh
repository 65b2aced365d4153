#!/usr/bin/env bash
# Several machines: run this script once on every node, with the same variables everywhere.
# torchrun's c10d rendezvous meets at MASTER_ADDR:MASTER_PORT; the agent on that host serves
# the rendezvous store, the others connect to it, and ranks are assigned when NNODES agents
# have joined. Every argument is passed to the trainer as a Hydra override.
#
#   # on each of 2 nodes (node0 is reachable from both):
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 RDZV_ID=run42 \
#       bash launch/multi_node.sh parallel=fsdp hydra.run.dir=runs/run42
#
# Variables:
#   NNODES        number of nodes (torchrun agents) in the job; required. "MIN:MAX" (e.g.
#                 1:4) makes the job elastic: it starts with MIN and admits nodes up to MAX.
#   MASTER_ADDR   host of the rendezvous store: any one node, the same for all; required.
#   MASTER_PORT   TCP port of the rendezvous store on MASTER_ADDR (default 29500).
#   RDZV_ID       a name shared by the nodes of one job and by no other job that meets at the
#                 same address (default: $SLURM_JOB_ID, else "trainer").
#   NPROC         processes per node; default: visible GPUs, or 1 on a CPU-only node.
#   MAX_RESTARTS  how many times the agents restart all workers after a failure or a node
#                 leaving / joining (default 3). The trainer starts from scratch on a restart
#                 until checkpoint resume lands; 0 disables restarts.
#   NODE_RANK     rank of this node; only read by the static backend (RDZV_BACKEND=static).
#                 c10d assigns node ranks itself in the order agents join.
#   RDZV_BACKEND  c10d (default) or static.
#   PYTHON        the interpreter that runs torchrun and the trainer (default: python).
#   OMP_NUM_THREADS  threads per rank; default: CPU cores / NPROC (at least 1).
#
# All nodes must write one run dir: pass hydra.run.dir=<shared path> (the default run dir
# holds a timestamp, which two nodes need not agree on).
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes (or MIN:MAX for an elastic job)}"
: "${MASTER_ADDR:?set MASTER_ADDR, the host of the rendezvous store (one of the nodes)}"
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-trainer}}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
MAX_RESTARTS=${MAX_RESTARTS:-3}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(count_gpus)
    if [[ "${NPROC}" -eq 0 ]]; then
        NPROC=1
    fi
fi
set_omp_threads "${NPROC}"

node_args=()
if [[ "${RDZV_BACKEND}" == "static" ]]; then
    node_args=(--node-rank "${NODE_RANK:?the static backend needs NODE_RANK (0 on MASTER_ADDR)}")
fi

echo "multi_node: $(hostname -s) joins ${RDZV_ID} at ${MASTER_ADDR}:${MASTER_PORT}" \
    "(${NNODES} nodes x ${NPROC} processes, backend ${RDZV_BACKEND}, max restarts ${MAX_RESTARTS})" >&2

# `python -m torch.distributed.run` is torchrun, run by the chosen interpreter.
exec "${PYTHON}" -m torch.distributed.run \
    --nnodes "${NNODES}" \
    --nproc_per_node "${NPROC}" \
    "${node_args[@]}" \
    --rdzv-backend "${RDZV_BACKEND}" \
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv-id "${RDZV_ID}" \
    --max-restarts "${MAX_RESTARTS}" \
    -m trainer "$@"
