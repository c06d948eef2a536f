from ptmrec_dist.dist import DistEnv, detect, expand_hostlist


def test_single_process_defaults():
    env = detect({})
    assert env == DistEnv() and env.is_main and not env.distributed


def test_torchrun_env_wins_even_inside_slurm():
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "GROUP_RANK": "1", "MASTER_ADDR": "n7", "MASTER_PORT": "1234",
                  "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1,
                          master_addr="n7", master_port=1234, launcher="torchrun")


def test_srun_step():
    env = detect({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
                  "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1",
                  "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1,
                          master_addr="gpu07", master_port=20000 + 123456 % 20000,
                          launcher="slurm")
    # an exported MASTER_ADDR / MASTER_PORT (what slurm/*.sh set) is respected
    env = detect({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "h",
                  "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("h", 4000)


def test_batch_step_without_srun_is_a_single_process():
    # inside an sbatch script but outside srun: SLURM_NTASKS describes the allocation, not us
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"})
    assert env.world_size == 1 and env.launcher == "single"


def test_expand_hostlist_like_scontrol():
    assert expand_hostlist("n1") == ["n1"]
    assert expand_hostlist("n[1-3,7],gpu[01-02],login") == \
        ["n1", "n2", "n3", "n7", "gpu01", "gpu02", "login"]
    assert expand_hostlist("rack1-n[009-011]") == ["rack1-n009", "rack1-n010", "rack1-n011"]


_REDUCE_RANK = r"""
import json, sys
import torch
import torch.distributed as tdist
from ptmrec_dist import dist
rank = int(sys.argv[1])
tdist.init_process_group("gloo", rank=rank, world_size=2, init_method=sys.argv[2])
calls = []
real = tdist.all_reduce
tdist.all_reduce = lambda t, op: (calls.append(t.numel()), real(t, op=op))
table = torch.arange(30, dtype=torch.float32).reshape(6, 5) * (rank + 1)
dist.allreduce_tensor(table, chunk_bytes=7 * 4)          # 30 values in pieces of 7
flags = torch.tensor([float(rank), 5.0 - rank, 2.0])
dist.allreduce_tensor(flags, op="max", chunk_bytes=4)
print(json.dumps({"table": table.tolist(), "flags": flags.tolist(), "calls": calls}))
tdist.destroy_process_group()
"""


def test_allreduce_tensor_reduces_a_large_table_in_chunks(tmp_path):
    """The per-epoch bank all-reduce goes piece by piece (under nccl each piece is what makes the
    round trip through the GPU): two gloo ranks, pieces that do not divide the table, sum and max
    equal to the whole-tensor result."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    init = f"file://{tmp_path / 'store'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-c", _REDUCE_RANK, str(r), init], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    for out, _ in outs:
        got = json.loads(out.strip().splitlines()[-1])
        assert np.array_equal(got["table"], np.arange(30).reshape(6, 5) * 3)
        assert got["flags"] == [1.0, 5.0, 2.0]
        assert got["calls"] == [7, 7, 7, 7, 2, 1, 1, 1]
