#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the sbatch scripts.
#
#   sudo slurm/local_cluster.sh up [--nodes N]   install (apt) if needed, start munge, slurmctld
#                                                and N slurmd (nodes n1..nN, partition "local"),
#                                                wait until every node is idle
#   sudo slurm/local_cluster.sh down             stop the daemons it started (by pid file)
#   slurm/local_cluster.sh status                sinfo, or "down"
#
# Needs root (daemons, /etc/slurm, /etc/hosts) and, the first time, apt. Each node declares the
# machine's whole CPU shape (from `slurmd -C`) and a 1/N share of its memory; several slurmd on
# one host work because Debian builds SLURM with MULTIPLE_SLURMD. Every node is 127.0.0.1 and
# /etc/hosts gets "127.0.0.1 nK" so that MASTER_ADDR=n1 resolves. State lives under
# /var/spool/ptmrec-slurm, logs under /var/log/slurm, pid files under /run/ptmrec-slurm.
# /etc/slurm/slurm.conf is written only if absent or written by this script before.
set -euo pipefail

NODES=2
CONF=/etc/slurm/slurm.conf
MARK="# written by ptmrec_dist slurm/local_cluster.sh"
STATE=/var/spool/ptmrec-slurm
RUN=/run/ptmrec-slurm
LOGS=/var/log/slurm

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

cmd=${1:-}; shift || true
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) die "unknown option $1 (usage: up|down|status [--nodes N])" ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1..99, not '$NODES'"

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are missing and there is no apt-get"
    echo "installing slurmctld slurmd slurm-client munge (apt)"
    # no service may auto-start during the install (there is no init system to own it)
    local policy=/usr/sbin/policy-rc.d saved=""
    [ -e $policy ] && { saved=$(mktemp); cp -p $policy "$saved"; }
    printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurmctld slurmd slurm-client munge; } >/tmp/ptmrec-slurm-apt.log 2>&1 \
        || rc=$?
    if [ -n "$saved" ]; then mv "$saved" $policy; else rm -f $policy; fi
    [ $rc -eq 0 ] || { tail -20 /tmp/ptmrec-slurm-apt.log >&2; die "apt-get failed (rc $rc)"; }
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    if [ -e $CONF ] && ! head -1 $CONF | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's config"
    fi
    local shape mem host
    shape=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
    mem=$(slurmd -C | head -1 | sed -E 's/.*RealMemory=([0-9]+).*/\1/')
    mem=$(( mem / NODES ))
    host=$(hostname -s)
    mkdir -p /etc/slurm "$STATE/ctld" "$RUN" "$LOGS"
    {
        echo "$MARK (--nodes $NODES)"
        cat <<EOF
ClusterName=ptmrec-local
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire + 1 s before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
# schedule pending jobs (requeued, dependants) within seconds, not the default 60 s
SchedulerParameters=sched_interval=2,bf_interval=2
EOF
        for k in $(seq 1 "$NODES"); do
            echo "NodeName=n$k NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + k)) $shape RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > $CONF.tmp
    mv $CONF.tmp $CONF
    # node names resolve to this machine (MASTER_ADDR=n1)
    drop_hosts
    for k in $(seq 1 "$NODES"); do echo "127.0.0.1 n$k # ptmrec local_cluster" >> /etc/hosts; done
}

drop_hosts() {   # rewrite in place: in a container /etc/hosts is a bind mount (no sed -i rename)
    local kept
    kept=$(grep -v '# ptmrec local_cluster$' /etc/hosts || true)
    printf '%s\n' "$kept" > /etc/hosts
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge; chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch $RUN/munged.ours
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not answer"
}

wait_idle() {
    local states
    for _ in $(seq 300); do
        states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ')
        [ "$states" = "idle " ] && [ "$(sinfo -h -N -o %N | sort -u | wc -l)" -eq "$NODES" ] && return
        sleep 0.2
    done
    echo "nodes: $(sinfo -N 2>&1)" >&2
    tail -5 $LOGS/slurmctld.log $LOGS/slurmd-n*.log >&2 || true
    die "nodes not idle after 60 s"
}

up() {
    [ "$(id -u)" -eq 0 ] || die "up needs root (daemons, /etc/slurm, /etc/hosts)"
    install
    if alive $RUN/slurmctld.pid; then
        if [ "$(grep -c '^NodeName=' $CONF)" -eq "$NODES" ]; then
            wait_idle; echo "already up: $NODES node(s)"; sinfo; return
        fi
        echo "restarting with $NODES node(s)"; down
    fi
    write_conf
    start_munge
    rm -f $LOGS/slurmctld.log
    slurmctld -i            # -i: ignore state from an earlier run (jobs, node states)
    for k in $(seq 1 "$NODES"); do
        mkdir -p "$STATE/slurmd-n$k"
        slurmd -N "n$k"
    done
    wait_idle
    echo "up: $NODES node(s) in partition 'local'"; sinfo
}

stop_pid() {   # stop_pid FILE NAME: TERM, wait up to 10 s, then KILL
    local f=$1 pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { echo "$2 ($pid) ignored TERM: KILL"; kill -9 "$pid" || true; }
    fi
    rm -f "$f"
}

down() {
    [ "$(id -u)" -eq 0 ] || die "down needs root"
    if alive $RUN/slurmctld.pid; then
        scancel --full --quiet --user=root 2>/dev/null || true   # no job outlives its cluster
    fi
    for f in $RUN/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
    stop_pid $RUN/slurmctld.pid slurmctld
    if [ -e $RUN/munged.ours ]; then
        stop_pid /run/munge/munged.pid munged; rm -f $RUN/munged.ours
    fi
    drop_hosts
    echo "down"
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status) if alive $RUN/slurmctld.pid; then sinfo -N; else echo "down"; fi ;;
    *) die "usage: local_cluster.sh up|down|status [--nodes N]" ;;
esac
