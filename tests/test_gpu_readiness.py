"""Ready for the first GPU cluster run (issue 22), checked on a CPU-only machine with
``torch.cuda`` monkeypatched: the one device helper (one GPU per task, GPUs shared by the node's
tasks, two ranks on one GPU refused), the start-up checks (GPUs in the job but no CUDA;
DeepSpeed's accelerator against torch's device) and the start-up line, ``adam: auto`` (torch's
fused Adam on CUDA, DeepSpeedCPUAdam only with the optimizer offloaded, CPU unchanged), and the
``srun`` step of ``slurm/_common.sh`` (``--cpus-per-task``, ``--export=ALL``, ``MASTER_PORT``
outside Ray's and the kernel's ports, NCCL variables) with stub ``srun``/``scontrol`` on PATH."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from rec_fixtures import restore_env  # noqa: F401  (a fixture)
import torch
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset

from ptmrec_dist import dist
from ptmrec_dist.cli import main
from ptmrec_dist.config import load_config
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.train import engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` of a GPU host with ``visible`` devices; ``set_device`` calls recorded."""
    calls: list[int] = []

    def install(visible: int, name: str = "NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(int(index)))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return calls
    return install


def srun_env(local: int, per_node: str, node: int = 0) -> dict:
    return {"SLURM_PROCID": str(node * 4 + local), "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_LOCALID": str(local), "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_NODEID": str(node), "SLURM_STEP_NODELIST": "gpu[01-02]",
            "SLURM_JOB_ID": "77"}


# --------------------------------------------------------------------------- the device helper

def test_one_visible_gpu_per_task_is_cuda_0(fake_cuda):
    """``srun --gpus-per-task=1``: every task sees one GPU, so SLURM_LOCALID=3 is cuda:0 (was
    cuda:3, "invalid device ordinal")."""
    calls = fake_cuda(visible=1)
    env = dist.detect(srun_env(local=3, per_node="4(x2)"))
    assert (env.local_rank, env.local_world_size) == (3, 4)
    assert dist.device(env) == torch.device("cuda", 0)
    assert calls == [0]


def test_node_gpus_shared_by_its_tasks_is_cuda_local_rank(fake_cuda):
    calls = fake_cuda(visible=4)
    assert dist.device(dist.detect(srun_env(local=3, per_node="4(x2)"))) == torch.device("cuda", 3)
    # torchrun: LOCAL_RANK / LOCAL_WORLD_SIZE; more GPUs than ranks is fine
    calls.clear()
    env = dist.detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2"})
    assert dist.device(env) == torch.device("cuda", 1) and calls == [1]


@pytest.mark.parametrize("local", [0, 1, 2, 3])
def test_more_ranks_on_a_node_than_gpus_is_an_error(fake_cuda, monkeypatch, local):
    """2 visible GPUs, 4 tasks on the node: two ranks would share a GPU; every rank says so
    (also rank 0, whose own index exists), naming the variables."""
    fake_cuda(visible=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = dist.detect(srun_env(local=local, per_node="4"))
    with pytest.raises(ConfigError) as err:
        dist.device(env)
    msg = str(err.value)
    assert err.value.exit_code == 2
    for part in (f"SLURM_LOCALID={local}", "SLURM_STEP_TASKS_PER_NODE=4", "2 visible GPUs",
                 "CUDA_VISIBLE_DEVICES='0,1'", "--gpus-per-task=1"):
        assert part in msg, (part, msg)


def test_tasks_per_node_of_this_node():
    assert dist.tasks_on_node("4", 0) == 4
    assert dist.tasks_on_node("2(x3),1", 1) == 2 and dist.tasks_on_node("2(x3),1", 3) == 1
    assert dist.tasks_on_node("", 0) == 1
    env = dist.detect(srun_env(local=0, per_node="4,2", node=1))
    assert env.local_world_size == 2


def test_init_exports_the_local_rank_of_the_device(fake_cuda, monkeypatch):
    """DeepSpeed's engine calls set_device(LOCAL_RANK): with one GPU per task LOCAL_RANK must
    be 0 whatever SLURM_LOCALID is; on the CPU it stays the launcher's local rank."""
    import torch.distributed as tdist
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")          # put back after the test
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)   # no process group here
    env = dist.detect(srun_env(local=3, per_node="4(x2)"))
    calls = fake_cuda(visible=1)
    assert dist.init("nccl", env=env) == env
    assert os.environ["LOCAL_RANK"] == "0" and calls == [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dist.init("gloo", env=env)
    assert os.environ["LOCAL_RANK"] == "3"


# --------------------------------------------------------------------------- start-up checks

@pytest.mark.parametrize("environ, given", [
    ({}, None),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE='4'"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS='0,1'"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES='0,1'"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5f1c2a"}, "CUDA_VISIBLE_DEVICES='GPU-5f1c2a'"),
    # CUDA_VISIBLE_DEVICES decides where set: GPUs hidden on purpose
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "4"}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_JOB_GPUS": "0"}, None),
])
def test_job_gpus(environ, given):
    assert dist.job_gpus(environ) == given


def test_gpus_in_the_job_without_cuda_is_exit_2():
    assert not torch.cuda.is_available()
    with pytest.raises(ConfigError) as err:
        dist.check_devices(environ={"SLURM_GPUS_ON_NODE": "8"})
    assert "SLURM_GPUS_ON_NODE='8'" in str(err.value)
    assert "torch.cuda.is_available() is False" in str(err.value)
    assert "CPU-only build" in str(err.value) or "CUDA" in str(err.value)
    dist.check_devices(environ={"CUDA_VISIBLE_DEVICES": ""})      # CPU on purpose: fine
    dist.check_devices(uses_deepspeed=False, environ={})


class _Accelerator:
    def __init__(self, name):
        self.name = name

    def device_name(self, index=None):
        return self.name


def test_deepspeed_accelerator_must_match_torch(fake_cuda, monkeypatch):
    """The Makefile's DS_ACCELERATOR=cpu on a GPU host (a CPU engine with CUDA tensors), and a
    cuda accelerator where torch has no CUDA: exit 2 naming DS_ACCELERATOR."""
    import deepspeed.accelerator
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator("cuda"))
    with pytest.raises(ConfigError, match="torch computes on 'cpu'.*DS_ACCELERATOR=cpu"):
        dist.check_devices(environ={})
    dist.check_devices(uses_deepspeed=False, environ={})        # extract: torch only
    fake_cuda(visible=1)
    dist.check_devices(environ={"CUDA_VISIBLE_DEVICES": "0"})    # both cuda: fine
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator("cpu"))
    with pytest.raises(ConfigError, match=r"accelerator is 'cpu' \(DS_ACCELERATOR='cpu'\) "
                                          r"but torch computes on 'cuda'.*"
                                          r"DS_ACCELERATOR=cuda or unset"):
        dist.check_devices(environ={"DS_ACCELERATOR": "cpu"})


def test_each_command_checks_before_it_starts(tmp_path, monkeypatch, capsys, in_process,
                                             restore_env):
    """stage1, stage2 and extract exit 2 with the message when the job has GPUs that torch
    cannot use, before reading anything."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    data = make_tiny_dataset(tmp_path / "tiny", n_users=20, n_items=15, per_user=5)
    for argv in (["stage1", "--data", str(data)], ["stage2", "--data", str(data)],
                 ["extract", "--shards", str(tmp_path / "no-shards")]):
        assert main([*argv, "--out", str(tmp_path / argv[0])]) == 2, argv
        err = capsys.readouterr().err
        assert "CUDA_VISIBLE_DEVICES='0'" in err and "is_available() is False" in err, err


def test_startup_line_of_each_command(tmp_path, in_process, restore_env):
    """The small demo (extract, stage 1 pop and vbpr, stage 2): one line each, by the main
    rank, before training."""
    from demo_fixtures import SMALL

    from ptmrec_dist.demo import demo_config, run_demo
    lines: list[str] = []
    cfg = load_config(None, SMALL, base=demo_config("tiny"))
    run_demo(cfg, tmp_path, "tiny", log=lambda *a: lines.append(" ".join(map(str, a))))
    runtime = [line for line in lines if line.startswith("runtime:")]
    head = "runtime: device cpu, backend"
    # extract runs before any process group of this demo: "none", unless an earlier in-process
    # run of the test session left its (single-process gloo) group up
    assert runtime[0] in (f"{head} none (one process), precision fp32, Adam none (inference)",
                          f"{head} gloo, precision fp32, Adam none (inference)"), lines
    assert runtime[1:] == [f"{head} gloo, precision fp32, Adam none (nothing to train)",
                       f"{head} gloo, precision fp32, Adam torch.optim.Adam",
                       f"{head} gloo, precision fp32, Adam torch.optim.Adam"], lines
    stage2 = next(k for k, line in enumerate(lines) if line.startswith("stage 2:"))
    assert lines[stage2 - 1] == runtime[-1]


def test_startup_line_names_the_gpu(fake_cuda):
    fake_cuda(visible=1)
    line = dist.runtime_line(torch.device("cuda", 0), "bf16", "torch.optim.Adam (fused)")
    assert line.startswith("runtime: device cuda:0 (NVIDIA H100 80GB HBM3), backend ")
    assert line.endswith(", precision bf16, Adam torch.optim.Adam (fused)")


# --------------------------------------------------------------------------- adam: auto

def resolve(name: str, adam: str = "auto", **kw) -> dict:
    return engine.resolve_ds_config(name, batch_size=64, world_size=1, lr=1e-3,
                                    weight_decay=0.0, key="stage2", precision="fp32",
                                    adam=adam, trainable=1000, **kw)


def test_adam_auto_on_cuda_is_torch_fused_unless_offloaded(fake_cuda):
    """No JIT build on GPU nodes: torch's Adam with its fused kernel; DeepSpeedCPUAdam only
    where ZeRO-Offload keeps the optimizer on the host."""
    fake_cuda(visible=1)
    params = resolve("zero2")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True and "foreach" not in params
    assert engine.describe_engine(resolve("zero2")) == ("fp32", "torch.optim.Adam (fused)")
    offload = resolve("zero2_offload")
    assert offload["optimizer"]["params"]["torch_adam"] is False
    assert "fused" not in offload["optimizer"]["params"]
    assert engine.describe_engine(offload) == ("fp32", "DeepSpeedCPUAdam")
    # ZeRO-3 offloading only the parameters keeps the optimizer on the GPU
    assert engine.resolve_adam("auto", cuda=True, offload_optimizer=False) == "torch"
    # an explicit choice is kept
    explicit = resolve("zero2", adam="deepspeed")
    assert explicit["optimizer"]["params"]["torch_adam"] is False
    assert engine.describe_engine(explicit) == ("fp32", "DeepSpeed FusedAdam")


def test_a_kernel_written_in_the_file_is_kept(fake_cuda, tmp_path):
    fake_cuda(visible=1)
    ds = json.loads((engine.DS_DIR / "zero2.json").read_text())
    ds["optimizer"]["params"]["foreach"] = False
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(ds))
    params = resolve(str(path))["optimizer"]["params"]
    assert params["foreach"] is False and "fused" not in params


def test_adam_auto_on_cpu_is_unchanged():
    """CPU: torch's Adam, no kernel key (torch's default), offload or not: the resolved
    config is what it was before ``auto`` changed, key for key."""
    assert not torch.cuda.is_available()
    for name in ("zero0", "zero2", "zero2_offload", "zero3_offload"):
        ds = resolve(name)
        raw = json.loads((engine.DS_DIR / f"{name}.json").read_text())
        assert ds["optimizer"]["params"] == {**raw["optimizer"]["params"], "lr": 1e-3,
                                             "weight_decay": 0.0, "torch_adam": True}, name
        assert engine.describe_engine(ds)[1] == "torch.optim.Adam"


def test_fused_reaches_torch_adam_through_deepspeed(in_process, restore_env):
    """The key the CUDA resolution adds is passed by DeepSpeed to torch.optim.Adam (torch 2.4+
    has a fused CPU kernel too, so this runs here)."""
    ds = resolve("zero0")
    ds["optimizer"]["params"]["fused"] = True
    dist.init("gloo")
    model = torch.nn.Linear(4, 2)
    eng = engine.build_engine(model, ds)
    groups = eng.optimizer.param_groups
    assert isinstance(eng.optimizer, torch.optim.Adam) and groups[0]["fused"] is True
    loss = eng(torch.randn(8, 4)).square().mean()
    eng.backward(loss)
    eng.step()


# --------------------------------------------------------------------------- slurm/_common.sh

def run_common(tmp_path: Path, script: str, **env) -> subprocess.CompletedProcess:
    """``source slurm/_common.sh`` and run ``script`` in bash, with stub ``srun`` (writes its
    arguments, one per line, and the variables a task sees to $SRUN_LOG) and ``scontrol``."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n'
        'echo "ENV MASTER_PORT=$MASTER_PORT NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-}'
        ' NCCL_DEBUG=${NCCL_DEBUG:-}" >> "$SRUN_LOG"\n')
    (stubs / "scontrol").write_text('#!/bin/bash\necho n1\n')
    for stub in ("srun", "scontrol"):
        (stubs / stub).chmod(0o755)
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "NCCL_", "MASTER_"))}
    full = {**keep, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": "true",
            "SRUN_LOG": str(tmp_path / "srun.log"), "SLURM_JOB_NODELIST": "n1",
            **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", "-c", f"source {ROOT / 'slurm' / '_common.sh'}\n{script}"],
                          env=full, capture_output=True, text=True, timeout=60)


def test_srun_step_carries_cpus_per_task_env_and_nccl(tmp_path):
    proc = run_common(tmp_path, "ptmrec_setup\nptmrec_launch stage2 --out x\n",
                      SLURM_JOB_ID=123456, SLURM_CPUS_PER_TASK=6, NCCL_SOCKET_IFNAME="ib0",
                      NCCL_DEBUG="WARN", SLURM_EXPORT_ENV="NONE")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.log").read_text().splitlines()
    assert args[:3] == ["--export=ALL", "--cpus-per-task=6", "--wait=300"], args
    assert args[3:7] == ["true", "-m", "ptmrec_dist", "stage2"], args
    assert "NCCL_SOCKET_IFNAME=ib0 NCCL_DEBUG=WARN" in args[-1]
    assert "passed to the tasks: NCCL_DEBUG=WARN NCCL_SOCKET_IFNAME=ib0" in proc.stdout
    # no -c given to sbatch: srun gets no --cpus-per-task either
    proc = run_common(tmp_path, "ptmrec_setup\nptmrec_launch stage1\n", SLURM_JOB_ID=5)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.log").read_text().splitlines()
    assert not any(a.startswith("--cpus-per-task") for a in args), args
    assert "passed to the tasks" not in proc.stdout


RAY_PORTS = {6379, 8265, 10001, *range(10002, 20000)}


def test_master_port_avoids_ray_and_the_ephemeral_range(tmp_path):
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for job_id in (1, 6, 12767, 12768, 123456, 987654321):
        proc = run_common(tmp_path, "ptmrec_setup\nptmrec_launch stage2\n", SLURM_JOB_ID=job_id)
        assert proc.returncode == 0, proc.stderr
        port = int(proc.stdout.split("master n1:")[1].split(",")[0])
        assert f"MASTER_PORT={port} " in (tmp_path / "srun.log").read_text()
        assert not lo <= port <= hi and port not in RAY_PORTS and port <= 65535, (job_id, port)
    # the rule for other kernels' ranges (small ids keep the former 20000 + id)
    rule = run_common(tmp_path, "for r in '32768 60999' '1024 60999' '20500 40000' "
                      "'1024 65000'; do ptmrec_master_port 123456 $r; done\n"
                      "ptmrec_master_port 6; MASTER_PORT=4000; ptmrec_setup >/dev/null;"
                      " echo $MASTER_PORT", SLURM_JOB_ID=7)
    assert rule.returncode == 0, rule.stderr
    assert rule.stdout.split() == [str(20000 + 123456 % 12768), str(61000 + 123456 % 4536),
                                   str(40001 + 123456 % 25535), str(20000 + 123456 % 10000),
                                   "20006", "4000"]


def test_ray_port_blocks_of_tune_sh_avoid_the_ephemeral_range(tmp_path):
    """slurm/tune.sh's Ray ports (the head's block of 100, and up to 12 nodes x 8 after it) lie
    below the kernel's ephemeral range and above Ray's worker ports; the old default
    (30000 + 100 x (id % 300)) was inside that range for most job ids (e.g. 35000 for id 50,
    where CI once saw the Ray head fail to come up)."""
    lo, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ids = list(range(0, 400, 7)) + [123456, 987654321]
    proc = run_common(tmp_path, "for i in " + " ".join(map(str, ids)) +
                      "; do ptmrec_ray_port $i; done\nptmrec_ray_port 3 21000\n",
                      SLURM_JOB_ID=1)
    assert proc.returncode == 0, proc.stderr
    ports = list(map(int, proc.stdout.split()))
    for port in ports[:-1]:
        assert 20000 <= port and port + 100 <= max(lo, 30000) and port % 100 == 0, port
        assert port not in RAY_PORTS
    assert ports[-1] == 20000 + 100 * (3 % 10)           # ephemeral from 21000: 10 blocks
    assert 30000 + 100 * (50 % 300) >= lo                 # the old rule's port for job 50
    tune = (Path(__file__).resolve().parents[1] / "slurm" / "tune.sh").read_text()
    assert "ptmrec_ray_port" in tune and "--cpus-per-task" in tune


def test_checkpoint_rng_keeps_this_devices_cuda_state_only(monkeypatch):
    """A checkpoint stores the CUDA RNG state of the rank's own device, and restores it there: a
    requeued job that sees fewer GPUs (one per task) no longer fails on the other devices'
    states; older checkpoints with every device's state restore the current device's entry."""
    from ptmrec_dist.train import checkpoint as ck
    states = {0: torch.tensor([1], dtype=torch.uint8), 3: torch.tensor([3], dtype=torch.uint8)}
    current = {"dev": 3}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["dev"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[current["dev"]])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states.values()))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))

    def fail_all(_states):
        raise RuntimeError("invalid device ordinal")
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fail_all)
    saved = ck.rng_state()
    assert torch.equal(saved["cuda"], states[3])
    current["dev"] = 0                                # requeued: one GPU per task, cuda:0
    ck.set_rng_state(saved)
    assert torch.equal(restored[-1], states[3])
    ck.set_rng_state({**saved, "cuda": [states[0]]})   # an older checkpoint's list
    assert torch.equal(restored[-1], states[0])


def test_dist_deterministic_switch(tmp_path, monkeypatch, restore_env):
    """dist.deterministic=true turns on torch's deterministic algorithms and the cuBLAS
    workspace before any CUDA work; a run trains under it (CPU)."""
    from rec_fixtures import make_tiny_dataset
    from ptmrec_dist.config import load_config
    from ptmrec_dist.train.stage1 import run_stage1
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    data = make_tiny_dataset(tmp_path / "tiny")
    cfg = load_config(None, [f"data.path={data}", "recommender.name=bpr", "stage1.epochs=1",
                             "dist.deterministic=true"])
    try:
        assert not torch.are_deterministic_algorithms_enabled()
        m = run_stage1(cfg, tmp_path / "run", log=lambda *_: None)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and m["epochs_run"] == 1
    finally:
        torch.use_deterministic_algorithms(False)


def test_flash_attention_needs_a_half_precision_backbone_and_compile_refuses_zero3(demo, tmp_path):
    from ptmrec_dist.config import load_config
    from ptmrec_dist.errors import ConfigError
    with pytest.raises(ConfigError, match="flash_attention_2 runs in bf16 or fp16"):
        load_config(None, ["backbone.attn_implementation=flash_attention_2"])
    load_config(None, ["backbone.attn_implementation=flash_attention_2", "backbone.dtype=bf16"])
    from ptmrec_dist.train.stage2 import run_stage2
    out, _ = demo
    cfg = load_config(out / "stage2" / "config.yaml",
                      ["stage2.compile=true", "stage2.ds_config=zero3"])
    with pytest.raises(ConfigError, match="stage2.compile"):
        run_stage2(cfg, tmp_path / "c", log=lambda *_: None)


def test_the_bank_reads_written_rows_back_only_when_asked():
    """FeatureBank.write keeps the step's item indices as tensors (no host sync per step on a
    GPU); the set is built when a checkpoint asks for it."""
    from ptmrec_dist.train.bank import FeatureBank

    class Student:
        modalities = ["text"]

        def __init__(self):
            self.table = torch.zeros(6, 2)

        def set_modal_inputs(self, tables):
            self.table = tables["text"].clone()

        def update_modal_inputs(self, items, modal):
            self.table[items] = modal["text"]

        def item_modal_inputs(self):
            return {"text": self.table}

    bank = FeatureBank(Student())
    bank.reset({"text": torch.zeros(6, 2).numpy()})
    bank.write(torch.tensor([4, 1]), {"text": torch.ones(2, 2)})
    bank.write(torch.tensor([1, 2]), {"text": torch.ones(2, 2)})
    assert len(bank._pending) == 2 and not bank._written
    assert bank.written == {1, 2, 4} and not bank._pending
    rows = bank.rank_rows()
    assert rows["items"].tolist() == [1, 2, 4]


def test_a_deepspeed_that_casts_otherwise_is_refused_before_training(monkeypatch):
    """The training code relies on DeepSpeed casting the module's weights to bf16 when bf16 is
    on (and leaving fp32 otherwise): a release that leaves them in fp32 under bf16 is a
    TrainingError naming its version and the tested one; the real engine passes both ways."""
    from types import SimpleNamespace

    from ptmrec_dist.errors import TrainingError
    from ptmrec_dist.train.engine import TESTED_DEEPSPEED, check_cast

    module = torch.nn.Linear(3, 2)
    bf16 = {"bf16": {"enabled": True}}
    with pytest.raises(TrainingError, match=f"left the trainable weights in.*float32.*"
                                            f"bfloat16.*{TESTED_DEEPSPEED}"):
        check_cast(SimpleNamespace(module=module), bf16)
    check_cast(SimpleNamespace(module=module), {})                       # fp32 as asked
    check_cast(SimpleNamespace(module=module.bfloat16()), bf16)
    frozen = torch.nn.Linear(3, 2).bfloat16().requires_grad_(False)      # only trainable count
    check_cast(SimpleNamespace(module=torch.nn.Sequential(frozen, torch.nn.Linear(2, 2))), {})
