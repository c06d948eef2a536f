"""Rank, world size and master address from the launcher's environment; process-group set-up.

The only module that knows how a job was launched: ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK),
``srun`` (SLURM_PROCID/SLURM_STEP_NUM_TASKS/...), a Ray Train worker (:func:`from_ray`), or a
plain single process. Everything else asks :func:`detect` (or receives a :class:`DistEnv`) and
never reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"          # single | torchrun | slurm | ray

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_hostlist(spec: str) -> list[str]:
    """SLURM hostlist syntax (``n[1-3,7],gpu[01-02]``) to host names, like
    ``scontrol show hostnames``; zero padding is kept."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            hi = hi or lo
            width = len(lo)
            for k in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{k:0{width}d}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    m = re.match(r"\d+", value)
    return int(m.group()) if m else default


def tasks_on_node(spec: str, node: int) -> int:
    """The number of tasks on node ``node`` of a step from SLURM's per-node task counts
    (``SLURM_STEP_TASKS_PER_NODE``: ``4``, ``4(x2)``, ``2(x3),1``); 1 when not given."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not counts:
        return 1
    return counts[node] if 0 <= node < len(counts) else counts[0]


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR")
    if "RANK" in env and "WORLD_SIZE" in env:          # torchrun (also inside an sbatch script)
        return DistEnv(rank=_int(env, "RANK", 0), world_size=_int(env, "WORLD_SIZE", 1),
                       local_rank=_int(env, "LOCAL_RANK", 0),
                       local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
                       node_rank=_int(env, "GROUP_RANK", 0),
                       master_addr=addr or "127.0.0.1",
                       master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), launcher="torchrun")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:   # inside an srun step
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        if not addr:
            hosts = expand_hostlist(nodelist) if nodelist else []
            addr = hosts[0] if hosts else "127.0.0.1"
        port = _int(env, "MASTER_PORT", 0) or 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
        return DistEnv(rank=_int(env, "SLURM_PROCID", 0),
                       world_size=_int(env, "SLURM_STEP_NUM_TASKS", 1),
                       local_rank=_int(env, "SLURM_LOCALID", 0),
                       local_world_size=tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""),
                                                      _int(env, "SLURM_NODEID", 0)),
                       node_rank=_int(env, "SLURM_NODEID", 0), master_addr=addr,
                       master_port=port, launcher="slurm")
    return DistEnv(master_addr=addr or "127.0.0.1",
                   master_port=_int(env, "MASTER_PORT", DEFAULT_PORT))


def from_ray(ctx) -> DistEnv:
    """A Ray Train worker (``ray.train.get_context()``): Ray has set up the process group."""
    env = os.environ
    return DistEnv(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                   local_rank=ctx.get_local_rank(), local_world_size=ctx.get_local_world_size(),
                   node_rank=ctx.get_node_rank(),
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), launcher="ray")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    import torch
    return "nccl" if torch.cuda.is_available() else "gloo"


def set_deterministic() -> None:
    """Deterministic kernels (``dist.deterministic``): torch's deterministic algorithms (an op
    without one raises), cuDNN without autotuning, and the cuBLAS workspace that deterministic
    GEMMs need (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set; read when CUDA starts, so this
    runs before any CUDA work). On GPUs this costs speed; on CPU it changes nothing measurable."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def init(backend: str = "auto", timeout_s: int = 600, env: DistEnv | None = None,
         deterministic: bool = False) -> DistEnv:
    """Initialise torch.distributed for ``env`` (default: :func:`detect`). A single process also
    gets the rank/master variables set, since DeepSpeed expects them (else it tries MPI).
    ``deterministic`` (``dist.deterministic``): :func:`set_deterministic`."""
    import torch.distributed as tdist

    if deterministic:
        set_deterministic()

    env = env or detect()
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        env = dataclasses.replace(env, master_port=free_port())   # no clash with other jobs
    # DeepSpeed's engine takes its device from LOCAL_RANK (set_device(LOCAL_RANK)): on a GPU it
    # must be the index of this rank's visible GPU (:func:`device`), 0 when each task sees one
    this_device = device(env)
    local = str(env.local_rank if this_device.type == "cpu" else this_device.index)
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_RANK": local, "MASTER_ADDR": env.master_addr,
                       "MASTER_PORT": str(env.master_port)})
    if not tdist.is_initialized():
        backend = resolve_backend(backend)
        # one process needs no rendezvous: an in-memory store, so that no port is bound (a free
        # port picked now can be taken by another process before the store binds it)
        store = tdist.HashStore() if env.world_size == 1 else None
        tdist.init_process_group(backend=backend, rank=env.rank,
                                 world_size=env.world_size, store=store,
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return env


def lost_peer(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank ended or hung (a gloo read
    error when its process died, NCCL's watchdog timeout, a store timeout), or None when ``exc``
    is something else. The survivor exits with it instead of a DeepSpeed traceback: within a
    second when the other process died (its sockets close), within ``dist.timeout_s`` when it
    hangs or its node is gone."""
    import torch.distributed as tdist
    # the group may be torn down already (the commands finish it on the way out): the
    # variables init() exported say whether this process was one of several ranks
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 2 or not tdist.is_available():
        return None
    text = str(exc)
    if not (isinstance(exc, getattr(tdist, "DistError", ())) or
            (isinstance(exc, RuntimeError) and any(
                mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed",
                                          "timed out", "Timed out")))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return (f"rank {os.environ.get('RANK', '?')} of {world}: a collective failed, most "
            f"likely because another rank ended or hangs (see its log; dist.timeout_s bounds "
            f"the wait): {first[:300]}")


def teardown() -> None:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def finish() -> None:
    """End of a command: tear down a multi-process group; keep a one-process group, which
    DeepSpeed caches and a later command in the same process (tests, the demo) reuses."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.destroy_process_group()


def allreduce_sum(vector):
    """Sum a 1-d numpy vector over the ranks (float64); unchanged on one process."""
    import numpy as np
    import torch
    t = torch.from_numpy(np.asarray(vector, dtype=np.float64)).clone()
    return allreduce_tensor(t).numpy() if _multi_rank() else vector


def _multi_rank() -> bool:
    import torch.distributed as tdist
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


# the largest piece of a tensor reduced at once: under nccl each piece makes a round trip
# through the GPU, so a catalog-sized bank (1M items x 768 x 4 bytes = 3 GiB) never has to fit
# there whole, and gloo's own buffers stay this small too
ALLREDUCE_CHUNK_BYTES = 64 * 2**20


def allreduce_tensor(t, op: str = "sum", chunk_bytes: int = ALLREDUCE_CHUNK_BYTES):
    """Sum (or max) a contiguous CPU tensor over the ranks, in place, ``chunk_bytes`` at a time;
    unchanged on one process. (nccl reduces device tensors only: each chunk makes a round trip
    through the GPU.)"""
    import torch.distributed as tdist
    if not _multi_rank():
        return t
    if not t.is_contiguous():
        raise ValueError("allreduce_tensor reduces a contiguous tensor in place")
    reduce_op = tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM
    nccl = tdist.get_backend() == "nccl"
    flat = t.view(-1)
    step = max(1, chunk_bytes // t.element_size())
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]          # a view: reduced in place
        if nccl:
            on_device = part.cuda()
            tdist.all_reduce(on_device, op=reduce_op)
            part.copy_(on_device.cpu())
        else:
            tdist.all_reduce(part, op=reduce_op)
    return t


def device(env: DistEnv):
    """The torch device of this rank, made the current CUDA device; the CPU where CUDA is not.
    Every module asks here instead of building a device name itself.

    One GPU per rank, from the GPUs this process sees (``torch.cuda.device_count()``):

    * one visible GPU: ``cuda:0``. Each task was given its own (``srun --gpus-per-task=1``,
      ``CUDA_VISIBLE_DEVICES`` set per rank, a Ray worker with one GPU), whatever its local rank;
    * at least as many visible GPUs as ranks on this node (they all see the node's GPUs):
      ``cuda:LOCAL_RANK``;
    * fewer (but more than one): two ranks would share a GPU, which NCCL refuses or hangs on
      later: a :class:`~ptmrec_dist.errors.ConfigError` (exit 2) naming the local rank, the
      ranks on the node, the visible count and ``CUDA_VISIBLE_DEVICES``.
    """
    import torch
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 1:
        index = 0
    elif env.local_rank < visible and env.local_world_size <= visible:
        index = env.local_rank
    else:
        from ptmrec_dist.errors import ConfigError
        rank_var, size_var = _LOCAL_VARS.get(env.launcher, ("local rank", "ranks on the node"))
        raise ConfigError(
            f"local rank {env.local_rank} of {env.local_world_size} on this node ({rank_var}="
            f"{env.local_rank}, {size_var}={env.local_world_size}) but {visible} visible GPUs "
            f"(torch.cuda.device_count(); CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): two ranks would share a "
            "GPU. Start one task per GPU (srun/sbatch --ntasks-per-node = GPUs per node, "
            "torchrun --nproc_per_node = GPUs per node) or give each task its own GPU "
            "(--gpus-per-task=1)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


# the variables a launcher gives the local rank and the number of ranks on a node in
_LOCAL_VARS = {"torchrun": ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
               "slurm": ("SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
               "ray": ("Ray Train's local rank", "Ray Train's local world size")}


def job_gpus(environ: Mapping[str, str] | None = None) -> str | None:
    """Whether the job was given GPUs, from the environment alone: the variable that says so
    (``"CUDA_VISIBLE_DEVICES='0,1'"``), or None.

    ``CUDA_VISIBLE_DEVICES``, where set, decides: it lists a GPU unless it is empty, starts with
    a negative number (``-1``) or is SLURM's ``NoDevFiles`` (so ``CUDA_VISIBLE_DEVICES=`` hides
    a job's GPUs on purpose). Unset, SLURM's ``SLURM_GPUS_ON_NODE`` (a count above 0),
    ``SLURM_JOB_GPUS`` or ``SLURM_STEP_GPUS`` (non-empty) decide."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        listed = bool(first) and not first.startswith("-") and first != "NoDevFiles"
        return f"CUDA_VISIBLE_DEVICES={visible!r}" if listed else None
    if _int(env, "SLURM_GPUS_ON_NODE", 0) > 0:
        return f"SLURM_GPUS_ON_NODE={env['SLURM_GPUS_ON_NODE']!r}"
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(key, "").strip():
            return f"{key}={env[key]!r}"
    return None


def check_devices(uses_deepspeed: bool = True, environ: Mapping[str, str] | None = None) -> None:
    """The start-up checks of a command (stage 1, stage 2, extract), before anything is built:
    a :class:`~ptmrec_dist.errors.ConfigError` (exit 2) when

    * the job has GPUs (:func:`job_gpus`) but ``torch.cuda.is_available()`` is False (a
      CPU-only torch, a driver problem): it would train on the CPU, in fp32, over gloo;
    * DeepSpeed's accelerator (``get_accelerator().device_name()``, ``DS_ACCELERATOR``) is not
      the device type torch computes on (``cuda`` where CUDA is available, else ``cpu``), e.g.
      the Makefile's ``DS_ACCELERATOR=cpu`` on a GPU host: a CPU engine with CUDA tensors.
      ``uses_deepspeed=False`` (extract) skips this one."""
    import torch

    from ptmrec_dist.errors import ConfigError
    env = os.environ if environ is None else environ
    cuda = torch.cuda.is_available()
    given = job_gpus(env)
    if given and not cuda:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"this job has GPUs ({given}) but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, {build}): it would train on the CPU. Install a CUDA build of "
            "torch, check the driver (nvidia-smi on the node), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run on the CPU on purpose")
    if not uses_deepspeed:
        return
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator().device_name()
    mine = "cuda" if cuda else "cpu"
    if accelerator != mine:
        how = ("set DS_ACCELERATOR=cuda or unset it (the Makefile exports cpu for CPU-only "
               "machines: make demo DS_ACCELERATOR=cuda), or hide the GPUs "
               "(CUDA_VISIBLE_DEVICES=) to run on the CPU") if mine == "cuda" \
            else "set DS_ACCELERATOR=cpu (or unset it)"
        raise ConfigError(
            f"DeepSpeed's accelerator is {accelerator!r} (DS_ACCELERATOR="
            f"{env.get('DS_ACCELERATOR', '<unset>')!r}) but torch computes on {mine!r} "
            f"(torch.cuda.is_available() is {cuda}): {how}")


def runtime_line(device, precision: str, adam: str) -> str:
    """The start-up line of a command (printed by the main rank): device, process-group
    backend, precision, Adam implementation."""
    import torch
    import torch.distributed as tdist
    where = str(device)
    if getattr(device, "type", None) == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    backend = tdist.get_backend() if tdist.is_available() and tdist.is_initialized() \
        else "none (one process)"
    return f"runtime: device {where}, backend {backend}, precision {precision}, Adam {adam}"


def gathered(params: list):
    """A context in which ZeRO-3-partitioned ``params`` are whole (read-only); a no-op for
    parameters DeepSpeed does not partition (ZeRO 0-2, or no engine at all)."""
    import contextlib
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def barrier() -> None:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
