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
#                 leaving / joining (default 3); a restart continues from the run dir's newest
#                 checkpoint (train.resume=auto, below). 0 disables restarts.
#   NODE_RANK     rank of this node; only read by the static backend (RDZV_BACKEND=static).
#                 c10d assigns node ranks itself in the order agents join.
#   RDZV_BACKEND  c10d (default) or static.
#   PYTHON        the interpreter that runs torchrun and the trainer (default: python).
#   OMP_NUM_THREADS  threads per rank; default: CPU cores / NPROC (at least 1).
#
# All nodes must write one run dir on storage they share: pass hydra.run.dir=<shared path>.
# (Without it, rank 0 picks outputs/torchrun-$RDZV_ID when MAX_RESTARTS > 0, else a timestamped
# outputs/DATE/TIME, relative to each node's working directory.)
#
# Resume: train.resume=auto is added unless an argument sets train.resume, so a restarted group
# (or the same command run again with the same run dir) continues from the newest valid
# checkpoint; a fresh run dir starts from step 0. Checkpoints are written every
# checkpoint.interval steps (default 0: only at the end), so pass e.g. checkpoint.interval=500
# and a failure costs at most that many steps (twice that with checkpoint.async_save=true).
# A new job needs a new run dir (hydra.run.dir, or a new RDZV_ID when relying on the default),
# else it continues the old one.
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

# train.resume=auto unless the caller chose (train.resume=none, or a checkpoint directory).
overrides=("$@")
has_resume=0
for arg in "${overrides[@]}"; do
    [[ "${arg#++}" == train.resume=* ]] && has_resume=1  # also ++train.resume=...
done
if [[ "${has_resume}" -eq 0 ]]; then
    overrides+=("train.resume=auto")
fi

# HSDP across nodes: with parallel=fsdp on several nodes, shard within each node and replicate across
# the nodes (parallel.replicate = the node count: the device mesh (replicate, shard)), so every
# all-gather and reduce-scatter stays on a node's fast links and only the replicas' all-reduce of
# gradient shards crosses nodes. The caller's parallel.replicate or parallel.fsdp_shard_size wins;
# so does a strategy chosen elsewhere (an experiment's config: pass parallel.replicate yourself). With
# parallel.tensor the caller lays out the mesh: tensor parallelism inside a node and FSDP across the
# nodes (torchtitan's 70B: FSDP 32 x TP 8), unless parallel.replicate is given too.
has_fsdp=0
has_mesh=0
for arg in "${overrides[@]}"; do
    [[ "${arg#++}" == parallel=fsdp || "${arg#++}" == parallel.strategy=fsdp ]] && has_fsdp=1
    [[ "${arg#++}" == parallel.replicate=* || "${arg#++}" == parallel.fsdp_shard_size=* ]] && has_mesh=1
    [[ "${arg#++}" == parallel.tensor=* ]] && has_mesh=1
done
# (An elastic NNODES=MIN:MAX keeps flat sharding: its node count, and so the mesh, can change.)
if [[ "${has_fsdp}" -eq 1 && "${has_mesh}" -eq 0 && "${NNODES}" =~ ^[0-9]+$ && "${NNODES}" -gt 1 ]]; then
    overrides+=("parallel.replicate=${NNODES}")
    echo "multi_node: parallel=fsdp on ${NNODES} nodes: HSDP, parallel.replicate=${NNODES} (shard within a node)" >&2
fi

echo "multi_node: $(hostname -s) joins ${RDZV_ID} at ${MASTER_ADDR}:${MASTER_PORT}" \
    "(${NNODES} nodes x ${NPROC} processes, backend ${RDZV_BACKEND}, max restarts ${MAX_RESTARTS})" >&2

# Elastic restarts on several nodes: a fresh store for each rendezvous round (hosted by rank 0 on
# a new port) rather than the agent's store for the whole job. Each agent counts its own restarts,
# so the restart-scoped keys the trainer uses with the agent's store could differ between nodes
# (pytorch/pytorch#135712); set it to 0 to share the agent's store anyway.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# `python -m torch.distributed.run` is torchrun, run by the chosen interpreter.
exec "${PYTHON}" -m torch.distributed.run \
    --nnodes "${NNODES}" \
    --nproc_per_node "${NPROC}" \
    "${node_args[@]}" \
    --rdzv-backend "${RDZV_BACKEND}" \
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv-id "${RDZV_ID}" \
    --max-restarts "${MAX_RESTARTS}" \
    -m trainer "${overrides[@]}"
