#!/usr/bin/env bash
# SLURM, multi-node GPU: one JAX process per node driving all of its GPUs; `jax.distributed.initialize()` reads the
# coordinator, process count and id from SLURM's environment (ttm_jax/runtime/mesh.py).
#
#   sbatch launch/slurm_gpu.sh configs/stage2.py:wan1.3b /shared/ttm/stage2
#
# Preemption / time limit: SLURM sends SIGTERM 300 s before the end (--signal); every process checkpoints at its
# current step and exits 0, and --requeue starts the job again, which resumes from the workdir.
#SBATCH --job-name=ttm-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG[:variant] WORKDIR [extra flags]}
WORKDIR=${2:?usage: sbatch launch/slurm_gpu.sh CONFIG[:variant] WORKDIR [extra flags]}
shift 2

cd "${SLURM_SUBMIT_DIR:-.}"
# a virtual environment next to the checkout, if there is one (pip install -e .[torch] with jax[cuda12])
[[ -f .venv/bin/activate ]] && source .venv/bin/activate

# GPU collectives overlap with compute; let XLA take most of the memory up front.
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# `exec srun` so the TERM from --signal reaches the Python processes directly.
exec srun --kill-on-bad-exit=1 python -m ttm_jax.main --mode=train --config="$CONFIG" --workdir="$WORKDIR" "$@"
