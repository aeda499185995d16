#!/usr/bin/env bash
# Start torchrun on this node of a multi-node Slurm step (one srun task per node).
#
# The training rule runs `srun --nodes=N --ntasks-per-node=1 bash scripts/torchrun_slurm.sh G scripts/train.py ...`:
# Snakemake's rule shell has lost SLURM_NNODES and the node list (the plugin's `mpi` mode), so the
# node count goes to srun explicitly; inside the step every task sees the full Slurm environment,
# from which the rendezvous (first node of the step, a port derived from the job id) is built.
#
#   usage: torchrun_slurm.sh GPUS_PER_NODE PYTHON SCRIPT [ARGS...]
set -euo pipefail
gpus_per_node=$1
python=$2
shift 2
: "${SLURM_STEP_NODELIST:=${SLURM_JOB_NODELIST:-}}"
if [[ -z "${SLURM_STEP_NODELIST}" ]]; then
    echo "torchrun_slurm.sh: not inside a Slurm step (no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST)" >&2
    exit 2
fi
head_node=$(scontrol show hostnames "${SLURM_STEP_NODELIST}" | head -n 1)
port=$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))
nnodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
exec "${python}" -m torch.distributed.run \
    --nnodes="${nnodes}" \
    --nproc-per-node="${gpus_per_node}" \
    --node-rank="${SLURM_NODEID:-0}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${head_node}:${port}" \
    --rdzv-id="${SLURM_JOB_ID:-osref}" \
    "$@"
