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
                       local_world_size=_int(env, "SLURM_STEP_TASKS_PER_NODE", 1),
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


def init(backend: str = "auto", timeout_s: int = 1800, env: DistEnv | None = None) -> DistEnv:
    """Initialise torch.distributed for ``env`` (default: :func:`detect`). A single process also
    gets the rank/master variables set, since DeepSpeed expects them (else it tries MPI)."""
    import torch.distributed as tdist

    env = env or detect()
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        env = dataclasses.replace(env, master_port=free_port())   # no clash with other jobs
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
                       "MASTER_PORT": str(env.master_port)})
    if not tdist.is_initialized():
        backend = resolve_backend(backend)
        if backend == "nccl":
            import torch
            # one GPU per local rank; srun --gpus-per-task may leave each task only its own
            torch.cuda.set_device(env.local_rank % max(1, torch.cuda.device_count()))
        tdist.init_process_group(backend=backend, rank=env.rank,
                                 world_size=env.world_size,
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return env


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


def allreduce_tensor(t, op: str = "sum"):
    """Sum (or max) a CPU tensor over the ranks, in place; unchanged on one process. (nccl
    reduces device tensors only: the tensor makes a round trip through the GPU.)"""
    import torch.distributed as tdist
    if not _multi_rank():
        return t
    reduce_op = tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM
    if tdist.get_backend() == "nccl":
        on_device = t.cuda()
        tdist.all_reduce(on_device, op=reduce_op)
        t.copy_(on_device.cpu())
    else:
        tdist.all_reduce(t, op=reduce_op)
    return t


def device(env: DistEnv):
    """The torch device of this rank: the GPU of its local rank where CUDA is, else the CPU.
    Every module asks here instead of building a device name itself."""
    import torch
    return torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() \
        else torch.device("cpu")


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
