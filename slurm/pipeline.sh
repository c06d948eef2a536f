#!/bin/bash
# The whole PTMRec flow on SLURM: submits extract -> stage1 -> stage2 as three jobs chained with
# --dependency=afterok, prints their job ids, and (with --wait) follows them to the end.
# Run it on the login node, from anywhere (it is not an sbatch script itself):
#
#   slurm/pipeline.sh --config configs/vit-b16.yaml --out runs/b16 [--wait] \
#       [--shards S] [--backbone B] [--data D] [--model M] [key=value ...]
#
# Outputs: OUT/features (extract), OUT/stage1 (the teacher), OUT/stage2 (PTMRec), and each job's
# log in OUT/logs/ptmrec-<stage>-<jobid>.out. key=value overrides go to all three stages.
# Per-stage sbatch options (nodes, GPUs, time, partition) come from these variables, split on
# spaces: SBATCH_EXTRACT, SBATCH_STAGE1, SBATCH_STAGE2, e.g.
#   SBATCH_STAGE2="--nodes 4 --ntasks-per-node 8 --gpus-per-node 8 --time 24:00:00"
# and options for all three from sbatch's own variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...).
# PYTHON, RESUME, MAX_REQUEUES, ...: see slurm/_common.sh (exported to the jobs).
#
# When a stage fails, the stages after it can never start: they are submitted with
# --kill-on-invalid-dep=yes, so SLURM cancels them at once (state CANCELLED, reason
# DependencyNeverSatisfied) instead of leaving them pending forever. With --wait this script
# prints every state change, then one line per stage (state, exit code, log file), and exits 0
# only if all three completed; otherwise 1, naming the stage that failed and its log.
# A requeued stage (checkpoint-and-stop, exit 3) is not a failure: its dependants wait for it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "pipeline.sh: $*" >&2; exit 2; }

config="" out="" shards="" backbone="" data="" model="" wait=0 overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config|-c) config=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --shards) shards=${2:?}; shift 2 ;;
        --backbone) backbone=${2:?}; shift 2 ;;
        --data) data=${2:?}; shift 2 ;;
        --model) model=${2:?}; shift 2 ;;
        --wait) wait=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *=*) overrides+=("$1"); shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ -n "$config" ] || die "--config is required"
[ -n "$out" ] || die "--out is required"
[ -f "$config" ] || die "$config: no such config file"
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
export PTMREC_SLURM_DIR=$here      # the jobs find slurm/_common.sh here

opt() { [ -n "$2" ] && printf '%s\n%s\n' "$1" "$2" || true; }
mapfile -t ex_args < <(opt --shards "$shards"; opt --backbone "$backbone")
mapfile -t s1_args < <(opt --data "$data"; opt --model "$model")
mapfile -t s2_args < <(opt --data "$data"; opt --shards "$shards"; opt --backbone "$backbone")

submit() {   # submit NAME DEPENDENCY SCRIPT ARGS... -> job id
    local name=$1 dep=$2 script=$3 extra_var
    shift 3
    extra_var="SBATCH_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    local -a extra=()
    read -r -a extra <<< "${!extra_var:-}"
    local -a cmd=(sbatch --parsable --output "$out/logs/ptmrec-$name-%j.out" "${extra[@]}")
    [ -n "$dep" ] && cmd+=(--dependency "afterok:$dep" --kill-on-invalid-dep=yes)
    "${cmd[@]}" "$here/$script" "$@" | cut -d';' -f1
}

j1=$(submit extract "" extract.sh --config "$config" --out "$out/features" \
     "${ex_args[@]}" "${overrides[@]}")
j2=$(submit stage1 "$j1" stage1.sh --config "$config" --features "$out/features" \
     --out "$out/stage1" "${s1_args[@]}" "${overrides[@]}")
j3=$(submit stage2 "$j2" stage2.sh --config "$config" --features "$out/features" \
     --teacher "$out/stage1" --out "$out/stage2" "${s2_args[@]}" "${overrides[@]}")
names=(extract stage1 stage2)
ids=("$j1" "$j2" "$j3")
for i in 0 1 2; do echo "${names[i]} ${ids[i]}"; done
if [ "$wait" = 0 ]; then
    echo "follow: squeue -j $j1,$j2,$j3; logs: $out/logs/ (a failed stage cancels the later ones)"
    exit 0
fi

field() { scontrol show job -o "$1" 2>/dev/null | grep -o " $2=[^ ]*" | head -1 | cut -d= -f2; }
final() { case "$1" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE) return 0 ;; esac; return 1; }
last=("" "" "")
while :; do
    running=0
    for i in 0 1 2; do
        state=$(field "${ids[i]}" JobState); reason=$(field "${ids[i]}" Reason); [ "$reason" = None ] && reason=""
        if [ "$state" = PENDING ] && [ "$reason" = DependencyNeverSatisfied ]; then
            scancel "${ids[i]}"    # only if the cluster ignored --kill-on-invalid-dep
        fi
        now="$state${reason:+ ($reason)}"
        if [ "$now" != "${last[i]}" ]; then
            echo "$(date +%T) ${names[i]} (job ${ids[i]}): ${state:-UNKNOWN}${reason:+ ($reason)}"
            last[i]=$now
        fi
        final "$state" || running=1
    done
    [ "$running" = 0 ] && break
    sleep "${POLL_S:-5}"
done

failed=""
for i in 0 1 2; do
    state=$(field "${ids[i]}" JobState); code=$(field "${ids[i]}" ExitCode)
    log=$(ls "$out/logs/ptmrec-${names[i]}-${ids[i]}.out" 2>/dev/null || echo "(no log: never started)")
    echo "${names[i]}: job ${ids[i]} $state, exit code $code, log $log"
    if [ "$state" != COMPLETED ] && [ -z "$failed" ]; then
        failed="${names[i]} (job ${ids[i]}, $state, exit code $code, log $log)"; failed_log=$log
    fi
done
if [ -n "$failed" ]; then
    [ -f "${failed_log:-}" ] && { echo "--- last lines of $failed_log:"; tail -n 8 "$failed_log"; } >&2
    echo "pipeline.sh: failed at $failed; the stages after it were cancelled" >&2
    exit 1
fi
echo "pipeline.sh: done; results in $out/stage2/metrics.json"
