#!/bin/bash
# A Ray Tune sweep on SLURM: starts a Ray cluster inside the allocation (the head on the first
# node, one Ray node on each other node, ports and temp dirs of this job only, so that two
# sweeps sharing nodes do not collide), runs `ptmrec tune` on it from the batch shell, then
# stops exactly this job's Ray nodes (never `ray stop`, which kills every Ray on a host).
#
# Submit from the repository root; everything after the script is passed to `ptmrec tune`:
#   sbatch slurm/tune.sh tuning/vit-b16.yaml --out runs/sweep-b16 [key=value ...]
#   sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 64 slurm/tune.sh tuning/vit-b16.yaml \
#       --out runs/sweep tune.gpus_per_worker=1 tune.cpus_per_worker=8 tune.max_concurrent_trials=32
# One task per node (each runs one Ray node with that node's CPUs and GPUs); trials are placed
# by Ray over all of them. --out must be on shared storage (trial runs and Ray's state).
# A requeued job (node failure, preemption) continues the sweep with --resume: finished trials
# are kept, unfinished ones resume from their own checkpoints.
# Variables: PYTHON, RESUME (see slurm/_common.sh); RAY_PORT (default: ptmrec_ray_port, a block
# of 100 ports from 20000 up, below the kernel's ephemeral range); RAY_HEAD_IP (default: the
# first node's address from `hostname --ip-address`). Worker ports: 10000-19999, 100 per node.
#SBATCH --job-name=ptmrec-tune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=ptmrec-%x-%j.out
set -uo pipefail
source "${PTMREC_SLURM_DIR:-${SLURM_SUBMIT_DIR:-.}/slurm}/_common.sh" || {
    echo "ptmrec slurm: slurm/_common.sh not found: submit from the repository root or set PTMREC_SLURM_DIR" >&2; exit 2; }
ptmrec_setup
RAY=$(dirname "$(command -v "$PYTHON")")/ray
[ -x "$RAY" ] || RAY=$(command -v ray) || ptmrec_die "the ray command is not next to $PYTHON nor on PATH"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} RAY_USAGE_STATS_ENABLED=0

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head=${nodes[0]}
port=${RAY_PORT:-$(ptmrec_ray_port "$SLURM_JOB_ID")}
head_ip=${RAY_HEAD_IP:-$(srun --nodes 1 --ntasks 1 -w "$head" hostname --ip-address | awk '{print $1}')}
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus=${SLURM_GPUS_ON_NODE:-0}
# this node's ports and temp dir, from its index in the job's node list (SLURM_NODEID counts
# within a step); several Ray nodes of one job may share a host (the local test cluster)
node_args='i=0; for n in '"${nodes[*]}"'; do [ "$n" = "$SLURMD_NODENAME" ] && break; i=$((i + 1)); done
  base=$(('"$port"' + 1 + 8 * i)); wmin=$((10000 + 100 * (('"$SLURM_JOB_ID"' * 8 + i) % 100)));
  args="--node-manager-port $base --object-manager-port $((base + 1)) --dashboard-agent-listen-port $((base + 2))
        --dashboard-agent-grpc-port $((base + 3)) --runtime-env-agent-port $((base + 4)) --metrics-export-port $((base + 5))
        --min-worker-port $wmin --max-worker-port $((wmin + 99)) --num-cpus '"$cpus"' --num-gpus '"$gpus"'
        --temp-dir /tmp/ray-'"$SLURM_JOB_ID"'-$i --block"'
echo "ptmrec slurm: Ray head on $head ($head_ip:$port), $(( ${#nodes[@]} - 1 )) more node(s), $cpus CPU(s) and $gpus GPU(s) each"

# each step runs `ray start --block` until TERM, then removes its node's temp dir
run_node='trap "kill -TERM \$pid 2>/dev/null" TERM; "$@" & pid=$!; wait $pid; wait $pid; rm -rf /tmp/ray-'"$SLURM_JOB_ID"'-$i'
steps=()
stop_ray() {      # TERM to this job's Ray steps only, workers before the head (a worker
    [ "${#steps[@]}" -gt 0 ] || return 0      # whose head is gone waits 30 s for it)
    local ids k
    mapfile -t ids < <(squeue -h -s -j "$SLURM_JOB_ID" -o %i | grep -E '\.[0-9]+$' | sort -t. -k2 -n)
    for ((k = ${#steps[@]} - 1; k >= 0; k--)); do
        [ -n "${ids[k]:-}" ] && scancel --signal=TERM "${ids[k]}" 2>/dev/null
        wait "${steps[k]}" 2>/dev/null
    done
    steps=()
}
trap stop_ray EXIT

# each Ray node gets the job's cores (SLURM 22.05+ no longer passes --cpus-per-task to srun)
cpt=${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}
srun --nodes 1 --ntasks 1 $cpt -w "$head" bash -c "$node_args"'
  set -- '"$RAY"' start --head --node-ip-address '"$head_ip"' --port '"$port"' --include-dashboard false $args; '"$run_node" &
steps+=($!)
"$PYTHON" - "$head_ip" "$port" <<'EOF' || ptmrec_die "the Ray head did not come up on $head_ip:$port"
import socket, sys, time
t0 = time.time()
while time.time() - t0 < 120:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(1)
EOF
if [ "${#nodes[@]}" -gt 1 ]; then
    srun --nodes $(( ${#nodes[@]} - 1 )) --ntasks $(( ${#nodes[@]} - 1 )) --ntasks-per-node 1 \
        $cpt -x "$head" bash -c "$node_args"'
      set -- '"$RAY"' start --address '"$head_ip:$port"' --node-ip-address "$(hostname --ip-address | cut -d" " -f1)" $args; '"$run_node" &
    steps+=($!)
fi
"$PYTHON" - "$head_ip:$port" "${#nodes[@]}" "${steps[@]}" <<'EOF' || ptmrec_die "not every node joined the Ray cluster"
import os, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
t0, want, steps = time.time(), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
while (alive := len([n for n in ray.nodes() if n["Alive"]])) < want:
    for pid in steps:       # a `ray start` step that ended will not join: stop waiting
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(f"a Ray node step ended before joining ({alive} of {want} nodes)")
    if time.time() - t0 > 180:
        sys.exit(f"{alive} of {want} Ray nodes after 180 s")
    time.sleep(1)
print(f"ptmrec slurm: Ray cluster of {want} node(s) up in {time.time() - t0:.1f} s")
EOF

"$PYTHON" -m ptmrec_dist tune "$@" "tune.address=$head_ip:$port" $(ptmrec_resume_flag)
rc=$?
stop_ray
trap - EXIT
[ "$rc" -eq 0 ] && echo "ptmrec slurm: done $(date -Is)" || echo "ptmrec slurm: tune failed with exit code $rc" >&2
exit "$rc"
