#!/bin/bash
# Stage 1 of PTMRec on SLURM: `ptmrec stage1` (a base recommender on frozen CLIP features, BPR,
# DeepSpeed, early stopping on valid) as one srun step, one task per GPU (or per CPU-only node).
# Requeued after a checkpoint-and-stop.
#
# Submit from the repository root; everything after the script is passed to `ptmrec stage1`:
#   sbatch slurm/stage1.sh --config configs/amazon-baby.yaml --features runs/features \
#       --model vbpr --out runs/s1 [--data D] [key=value ...]
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 slurm/stage1.sh ...
# Stage 1 stops at the end of the running epoch when signalled: keep the --signal lead time
# (below: 300 s) longer than one epoch, or lower stage1.checkpoint_every.
# Variables (PYTHON, RESUME, MAX_REQUEUES, EXIT_WAIT, MASTER_PORT, TORCH_EXTENSIONS_DIR): see
# slurm/_common.sh.
#SBATCH --job-name=ptmrec-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=ptmrec-%x-%j.out
set -uo pipefail
source "${PTMREC_SLURM_DIR:-${SLURM_SUBMIT_DIR:-.}/slurm}/_common.sh" || {
    echo "ptmrec slurm: slurm/_common.sh not found: submit from the repository root or set PTMREC_SLURM_DIR" >&2; exit 2; }
ptmrec_setup
ptmrec_launch stage1 "$@" $(ptmrec_resume_flag)
ptmrec_finish $?
