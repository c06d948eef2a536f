#!/bin/bash
# Frozen CLIP features of every item on SLURM: `ptmrec extract` as one srun step, one task per
# GPU (or per CPU-only node); each rank streams its share of the shards. A signal stops it with
# exit code 3 and the job is requeued; finished shards are kept (OUT/parts/) and not redone.
#
# Submit from the repository root; everything after the script is passed to `ptmrec extract`:
#   sbatch slurm/extract.sh --shards shards/baby --backbone openai/clip-vit-large-patch14 \
#       --out runs/features [--config C] [key=value ...]
#   sbatch --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 slurm/extract.sh ...
# OUT must be on storage that every node shares. Variables (PYTHON, MAX_REQUEUES, EXIT_WAIT,
# MASTER_PORT): see slurm/_common.sh (extract always continues where it stopped: no --resume).
#SBATCH --job-name=ptmrec-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=USR1@60
#SBATCH --open-mode=append
#SBATCH --output=ptmrec-%x-%j.out
set -uo pipefail
source "${PTMREC_SLURM_DIR:-${SLURM_SUBMIT_DIR:-.}/slurm}/_common.sh" || {
    echo "ptmrec slurm: slurm/_common.sh not found: submit from the repository root or set PTMREC_SLURM_DIR" >&2; exit 2; }
ptmrec_setup
ptmrec_launch extract "$@"
ptmrec_finish $?
