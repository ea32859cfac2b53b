#!/usr/bin/env bash
# Multi-host GPU job: one task per node, every GPU of the node visible to it; JAX reads the coordinator,
# process count and id from SLURM (config.distributed.auto=True).
#SBATCH --job-name=recogdrive-jax
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
# Usage: sbatch launch/slurm.sh configs/recogdrive_8b/sft.py gs://bucket/runs/sft8b [--config.x=y ...], e.g.
#   sbatch launch/slurm.sh configs/recogdrive_8b/sft.py gs://bucket/runs/sft8b \
#       --config.model.init_from=gs://bucket/ckpt/InternVL3-8B --config.data.meta_path=/data/recogdrive_pretrain.json
# A gs:// workdir needs `pip install 'recogdrive_jax[gcs]'` and Google credentials on every node (the start-up check
# fails in one line otherwise); the meta JSON and its images are read from a local or shared path on every node.
# The next stage reads the run back: configs/recogdrive_8b/cache.py gs://bucket/runs/cache8b
#   --config.model.init_from=gs://bucket/runs/sft8b (README "Remote workdirs" lists the stages that take gs://).
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
srun --kill-on-bad-exit=1 python -m recogdrive_jax.main --config="$config" --workdir="$workdir" \
  --config.distributed.auto=True "$@"
