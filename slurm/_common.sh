# Sourced by slurm/{extract,stage1,stage2}.sh inside an sbatch allocation: environment, the
# rendezvous, one task per GPU (or per CPU node) through srun, and requeue on exit code 3.
#
# Variables (all optional; sbatch exports the submitting shell's environment to the job):
#   PYTHON                interpreter that has ptmrec_dist installed (default: python3 on PATH,
#                         so activate the environment before sbatch)
#   RESUME=1              pass --resume: continue from the newest checkpoint of --out, start
#                         from scratch if there is none (default). RESUME=0 starts over and
#                         removes the run's old checkpoints; a requeued job always resumes.
#   MAX_REQUEUES=10       requeue after a checkpoint-and-stop (exit 3) at most this many times
#   EXIT_WAIT=300         seconds srun waits for the other tasks once one has ended, then kills
#                         them (a crashed rank must not leave the others hanging in a collective)
#   MASTER_PORT           rendezvous port (default: 20000 + job id % N, N = the ports from
#                         20000 to below the kernel's ephemeral range, so that two jobs on one
#                         node differ and no port of Ray's or the kernel's is hit: see
#                         ptmrec_master_port); MASTER_ADDR is the allocation's first node
#   NCCL_SOCKET_IFNAME, NCCL_DEBUG, NCCL_*, GLOO_SOCKET_IFNAME
#                         passed to every task (srun --export=ALL, also under
#                         sbatch --export=NONE) and shown in the job's first line; see
#                         docs/cluster.md
#   TORCH_EXTENSIONS_DIR  DeepSpeed's JIT-built ops; put it on shared storage so they build once
#                         (default: $SLURM_SUBMIT_DIR/.torch_extensions)
#   OMP_NUM_THREADS       default: --cpus-per-task, else 1

ptmrec_die() { echo "ptmrec slurm: $*" >&2; exit 2; }

ptmrec_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || ptmrec_die "not inside a SLURM job: submit with sbatch (or run in salloc)"
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null || ptmrec_die "PYTHON=$PYTHON not found (activate the environment or set PYTHON)"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$(ptmrec_master_port "$SLURM_JOB_ID")}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_USAGE_STATS_ENABLED=0
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/.torch_extensions}
    if [ -z "${SLURM_GPUS_ON_NODE:-}${SLURM_JOB_GPUS:-}" ]; then
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}      # CPU nodes: gloo, no CUDA probing
    fi
    # dist.py prefers torchrun's variables: none may leak in from the submitting shell
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
    # SLURM signals every step's tasks itself (--signal, scancel, requeue, preemption); the
    # batch shell must survive it (bash dies on USR1 by default) and must not forward it, since
    # a second signal while checkpointing is left to the default handler (it kills)
    trap 'echo "ptmrec slurm: batch shell got USR1 (the tasks checkpoint and stop)"' USR1
    trap 'echo "ptmrec slurm: batch shell got TERM (the tasks checkpoint and stop)"' TERM
    echo "ptmrec slurm: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS:-1}" \
         "task(s) on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, $(date -Is)"
    local nccl
    nccl=$(env | grep -E '^(NCCL_|GLOO_SOCKET_IFNAME=)' | sort | tr '\n' ' ')
    [ -z "$nccl" ] || echo "ptmrec slurm: passed to the tasks: ${nccl% }"
}

# ptmrec_master_port JOB_ID [EPHEMERAL_LOW EPHEMERAL_HIGH]: the default MASTER_PORT, 20000 + job
# id % N. The band starts above Ray's default ports (GCS 6379, dashboard 8265, client 10001,
# workers 10002-19999) and ends below the kernel's ephemeral range (where outgoing connections
# get their local ports: a port from there may be taken by any connection on the node), read
# from /proc/sys/net/ipv4/ip_local_port_range (default 32768-60999, so 20000-32767). Where fewer
# than 1000 ports are left below that range, the band lies above it (up to 65535); failing
# that, it is 20000-29999.
ptmrec_master_port() {
    local id=$1 lo=${2:-} hi=${3:-}
    if [ -z "$lo" ]; then
        read -r lo hi < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { lo=32768; hi=60999; }
    fi
    if [ $((lo - 20000)) -ge 1000 ]; then
        echo $((20000 + id % (lo - 20000)))
    elif [ $((65535 - hi)) -ge 1000 ]; then
        echo $((hi + 1 + id % (65535 - hi)))
    else
        echo $((20000 + id % 10000))
    fi
}

# ptmrec_ray_port JOB_ID [EPHEMERAL_LOW]: slurm/tune.sh's default Ray head port: the start of a
# block of 100 ports (the head's, then 8 per Ray node) from 20000 up, below the kernel's
# ephemeral range as ptmrec_master_port is (until issue 22 it was 30000 + 100 x (id % 300),
# mostly inside that range, where any outgoing connection may already hold it).
ptmrec_ray_port() {
    local id=$1 lo=${2:-} hi blocks
    if [ -z "$lo" ]; then
        read -r lo hi < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || lo=32768
    fi
    blocks=$(( (lo - 20000) / 100 ))
    [ "$blocks" -ge 10 ] || blocks=100
    echo $((20000 + 100 * (id % blocks)))
}

# ptmrec_resume_flag: "--resume" unless RESUME=0 on a first start
ptmrec_resume_flag() {
    if [ "${RESUME:-1}" != 0 ] || [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo --resume; fi
}

# ptmrec_launch COMMAND ARGS...: `python -m ptmrec_dist COMMAND ARGS` as one srun step over the
# whole allocation; rank, world size and local rank come from SLURM's variables (dist.py).
# The step gets the job's --cpus-per-task (SLURM 22.05+ no longer passes it from sbatch to srun:
# each task would get one core) and the whole environment (--export=ALL: MASTER_*, NCCL_*, ...
# also when the job was submitted with --export=NONE). Returns srun's exit code (the highest of
# the tasks').
ptmrec_launch() {
    local pid rc
    srun --export=ALL ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
         --wait="${EXIT_WAIT:-300}" "$PYTHON" -m ptmrec_dist "$@" &
    pid=$!
    while :; do          # a trapped signal interrupts `wait`; keep waiting for srun itself
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    return "$rc"
}

# ptmrec_finish RC: exit 3 (stopped by a signal after a checkpoint) -> requeue this job, which
# then resumes; anything else is the job's exit code.
ptmrec_finish() {
    local rc=$1 n=${SLURM_RESTART_COUNT:-0}
    if [ "$rc" -eq 3 ]; then
        if [ "$n" -ge "${MAX_REQUEUES:-10}" ]; then
            echo "ptmrec slurm: stopped after a checkpoint, but already requeued $n times" \
                 "(MAX_REQUEUES=${MAX_REQUEUES:-10}): not requeueing; resubmit to continue" >&2
            exit 3
        fi
        echo "ptmrec slurm: stopped after a checkpoint: requeueing job $SLURM_JOB_ID" \
             "(restart $((n + 1))), it continues with --resume"
        local said
        if said=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
            sleep 60 &      # SLURM ends this script for the requeue; do not report an exit code
            wait $!
            exit 0
        fi
        if [[ "$said" == *"pending execution"* ]]; then    # SIGTERM came from a requeue already
            echo "ptmrec slurm: SLURM is requeueing this job already (preemption or scontrol requeue)"
            exit 0
        fi
        echo "ptmrec slurm: scontrol requeue failed ($said; submitted with --no-requeue?):" \
             "resubmit the same command to continue" >&2
        exit 3
    fi
    [ "$rc" -eq 0 ] && echo "ptmrec slurm: done $(date -Is)" \
                    || echo "ptmrec slurm: failed with exit code $rc $(date -Is)" >&2
    exit "$rc"
}
