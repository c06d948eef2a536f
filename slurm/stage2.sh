#!/bin/bash
# Stage 2 of PTMRec on SLURM: `ptmrec stage2` (deep prompts / LoRA / IA3 in both CLIP towers +
# the recommender, BPR + in-batch KT against the stage-1 teacher, DeepSpeed ZeRO) as one srun
# step, one task per GPU (or one per CPU-only node, gloo). Requeued after a checkpoint-and-stop.
#
# Submit from the repository root; everything after the script is passed to `ptmrec stage2`:
#   sbatch slurm/stage2.sh --config configs/vit-b16.yaml --teacher runs/s1 --out runs/s2 \
#       [--data D --shards S --features F --backbone B] [key=value ...]
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 8 \
#       slurm/stage2.sh --config configs/vit-l14.yaml ...                 # 32 GPUs, nccl
#   sbatch --nodes 2 --ntasks-per-node 1 slurm/stage2.sh ...              # 2 CPU nodes, gloo
# Nodes, tasks per node and GPUs per node are sbatch options (command line or the lines below).
# Preemption: SLURM sends USR1 120 s before the time limit (--signal), SIGTERM on requeue or
# preemption; the trainer checkpoints at the next optimizer step and exits 3; this script then
# requeues the job, which continues with --resume (see docs/cluster.md).
# Variables (PYTHON, RESUME, MAX_REQUEUES, EXIT_WAIT, MASTER_PORT, TORCH_EXTENSIONS_DIR): see
# slurm/_common.sh.
#SBATCH --job-name=ptmrec-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=ptmrec-%x-%j.out
set -uo pipefail
source "${PTMREC_SLURM_DIR:-${SLURM_SUBMIT_DIR:-.}/slurm}/_common.sh" || {
    echo "ptmrec slurm: slurm/_common.sh not found: submit from the repository root or set PTMREC_SLURM_DIR" >&2; exit 2; }
ptmrec_setup
ptmrec_launch stage2 "$@" $(ptmrec_resume_flag)
ptmrec_finish $?
