"""``ptmrec plan``: the memory estimate against what a real training step uses.

What is compared (``test_estimate_within_30_percent_of_the_measured_step``): tiny CLIPs
(``clip_fixtures.save_tiny_clip``, widths 256/384, images 64/96 px, so that a step moves tens of
MB) are trained in ONE fresh subprocess (this file run as a script), one config after the
other, each with its own warm-up: the backbone is loaded and wrapped exactly as stage 2 does it
(``load_backbone`` + ``apply_method``), ``torch.set_num_threads(1)``, torch's AdamW
(``foreach=False``; one process with plain AdamW is what ZeRO-0 on one rank runs). Step 1 warms
up (it creates the Adam states and touches the code pages of every kernel); then, with the
gradients set to None and ``gc.collect()``, the kernel's high-water mark is reset
(``/proc/self/clear_refs`` <- 5) and step 2 (inputs created, forward, backward, AdamW step) runs:

    measured = VmHWM after step 2 - VmRSS before it

which is the memory that appears during a steady-state step on top of the weights and the Adam
states: activations (saved tensors, the backward's workspace, the batch's inputs) and gradients.
The estimate of the same part is ``max(gradients, activations)`` of ``ptmrec plan`` (device
column, ZeRO-0, one rank, fp32). glibc keeps freed small chunks in its heap, which RSS would keep
counting, so the worker runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more
(every tensor that matters here) is its own mapping, returned to the kernel when freed. The Adam
states are checked too: VmRSS growth across step 1's ``optimizer.step()`` vs the plan's optimizer
row (full fine-tuning only; prompts have kilobytes of state).

The activation formula itself is also checked without any memory noise: a saved-tensors hook
collects every tensor autograd keeps during a forward (distinct storages, inputs and parameters
excluded) for each PEFT method, with and without checkpointing, sdpa and eager attention.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MiB = 2 ** 20
TOLERANCE = 0.30
# (name, clip, method, activation checkpointing, micro batch)
MEASURED = [("full", "w256", "full", False, 16),
            ("full+ckpt", "w256", "full", True, 16),
            ("prompt", "w384", "prompt", False, 16),
            ("prompt+ckpt", "w384", "prompt", True, 16)]
CLIPS = {"w256": dict(image_size=64, width=256, projection=64),
         "w384": dict(image_size=96, width=384, projection=64)}


def plan_config(path, method: str, ckpt: bool, batch: int, attn: str = "sdpa", **extra):
    from ptmrec_dist.config import Config
    cfg = Config()
    cfg.backbone.name_or_path = str(path)
    cfg.backbone.attn_implementation = attn
    cfg.peft.method = method
    cfg.peft.prompt_init = "random"
    s = cfg.stage2
    s.activation_checkpointing, s.batch_size, s.ds_config = ckpt, batch, "zero0"
    s.prompt_len, s.prompt_depth = 4, 2       # the tiny CLIPs have 2 layers per tower
    s.precision = "fp32"
    for key, value in extra.items():
        setattr(s, key, value)
    return cfg


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from clip_fixtures import save_tiny_clip
    root = tmp_path_factory.mktemp("plan_clips")
    return {k: save_tiny_clip(root / k, **kw) for k, kw in CLIPS.items()}


# --------------------------------------------------------------------------- the measurement

def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _measure(path: str, method: str, ckpt: bool, batch: int) -> dict:
    """One config in this (worker) process: warm-up step, then the measured step."""
    import torch

    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.methods import apply_method

    cfg = plan_config(path, method, ckpt, batch)
    torch.manual_seed(0)
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    backbone.train()
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    size, length = backbone.image_size, backbone.max_text_len
    eos = backbone.clip.text_model.eos_token_id
    out = {"trainable": sum(p.numel() for p in params),
           "total": sum(p.numel() for p in backbone.parameters())}

    def step(first: bool) -> None:
        g = torch.Generator().manual_seed(1)
        pixels = torch.randn(batch, 3, size, size, generator=g)
        ids = torch.randint(0, 400, (batch, length), generator=g)
        ids[:, -1] = eos
        mask = torch.ones(batch, length, dtype=torch.long)
        image, text = backbone(pixels, ids, mask)
        loss = (image * text).sum()
        if not first:
            out["after_forward"] = _status()["VmRSS"] - base
        loss.backward()
        del image, text, loss, pixels, ids, mask
        before = _status()["VmRSS"]
        opt.step()
        if first:
            out["optimizer_states"] = _status()["VmRSS"] - before
        opt.zero_grad(set_to_none=True)

    base = 0
    step(True)
    gc.collect()
    base = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                            # VmHWM := VmRSS
    t0 = time.perf_counter()
    step(False)
    out["step_peak"] = _status()["VmHWM"] - base
    out["step_s"] = round(time.perf_counter() - t0, 3)
    return out


def _worker(jobs: list) -> None:
    import torch
    torch.set_num_threads(1)
    results = {name: _measure(*args) for name, *args in jobs}
    print("RESULTS " + json.dumps(results))


def measure_in_subprocess(jobs: list) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_estimate_within_30_percent_of_the_measured_step(clips):
    from ptmrec_dist.plan import Planner

    # the measurement resets the kernel's high-water mark (Linux; CI and this machine)
    assert os.access("/proc/self/clear_refs", os.W_OK), "needs Linux /proc/self/clear_refs"
    jobs = [(name, str(clips[clip]), method, ckpt, batch)
            for name, clip, method, ckpt, batch in MEASURED]
    measured = measure_in_subprocess(jobs)
    report = []
    for name, clip, method, ckpt, batch in MEASURED:
        m = measured[name]
        planner = Planner(plan_config(clips[clip], method, ckpt, batch), world_size=1)
        assert planner.micro == batch
        # exact counts: the meta-device model is the real one
        assert planner.counts["trainable"] == m["trainable"]
        assert planner.counts["trainable"] + planner.counts["frozen"] == m["total"]
        plan = planner.at(batch)
        rows = plan["rows"]
        estimate = max(rows["gradients"]["device"], rows["activations"]["device"])
        error = estimate / m["step_peak"] - 1
        report.append(f"{name}: estimate {estimate / MiB:.1f} MiB, measured "
                      f"{m['step_peak'] / MiB:.1f} MiB ({error:+.1%}); after forward "
                      f"{m['after_forward'] / MiB:.1f} MiB; step {m['step_s']} s")
        assert m["step_peak"] > 20 * MiB, report[-1]       # well above the process's noise
        assert abs(error) <= TOLERANCE, report[-1]
        if method == "full":
            states = rows["optimizer"]["device"]
            assert abs(states / m["optimizer_states"] - 1) <= TOLERANCE, \
                f"{name}: Adam states {states} estimated, {m['optimizer_states']} measured"
            report[-1] += (f"; Adam states {states / MiB:.1f} MiB vs "
                           f"{m['optimizer_states'] / MiB:.1f} MiB")
    print("\n" + "\n".join(report))


# --------------------------------------------------------------------------- what autograd saves

@pytest.mark.parametrize("method,ckpt,attn", [
    ("full", False, "sdpa"), ("prompt", False, "sdpa"), ("lora", False, "sdpa"),
    ("ia3", False, "sdpa"), ("full", True, "sdpa"), ("prompt", True, "sdpa"),
    ("full", False, "eager"), ("prompt", False, "eager")])
def test_saved_tensors_match_the_formula(clips, method, ckpt, attn, one_torch_thread):
    """Bytes autograd keeps after the forward (distinct storages, without parameters, buffers
    and inputs) vs the plan's saved (or checkpointed) activations."""
    import torch

    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.methods import apply_method
    from ptmrec_dist.plan import Planner

    batch = 4
    cfg = plan_config(clips["w256"], method, ckpt, batch, attn)
    cfg.backbone.attn_implementation = attn
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    backbone.train()
    length = backbone.max_text_len
    pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size)
    ids = torch.randint(0, 400, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        image, text = backbone(pixels, ids, mask)
    own = {t.untyped_storage().data_ptr() for t in
           [*backbone.parameters(), *backbone.buffers(), pixels, ids, mask]}
    kept = sum(n for ptr, n in storages.items() if ptr not in own)
    act = Planner(cfg, world_size=1).activations(batch)
    assert act["saved"] == pytest.approx(kept, rel=0.01), (method, ckpt, attn, kept, act)
    assert (image.requires_grad, text.requires_grad) == (True, True)


# --------------------------------------------------------------------------- arithmetic

def _zero(stage, opt="none", param="none", **kw):
    from ptmrec_dist.plan import zero_settings
    z = {"stage": stage, **kw}
    if opt != "none":
        z["offload_optimizer"] = {"device": opt}
    if param != "none":
        z["offload_param"] = {"device": param}
    return zero_settings({"zero_optimization": z})


def test_zero_partitioning_fractions_on_four_ranks():
    from ptmrec_dist.plan import Group, partition, zero_buffer_bytes

    nt, nf, w = 1000, 3000, 4
    groups = [Group(nt, 2, True), Group(nf, 2, False)]       # bf16 mixed precision

    def dev(stage, **kw):
        rows = partition(groups, _zero(stage, **kw), w, mixed=True)
        return ({k: v["device"] for k, v in rows.items()}, {k: v["host"] for k, v in rows.items()})

    full = {"parameters_trainable": 2 * nt, "parameters_frozen": 2 * nf, "gradients": 2 * nt,
            "optimizer": 12 * nt}
    assert dev(0)[0] == full and sum(dev(0)[1].values()) == 0
    assert dev(1)[0] == {**full, "optimizer": 12 * nt // w}
    assert dev(2)[0] == {**full, "optimizer": 12 * nt // w, "gradients": 2 * nt // w}
    assert dev(3)[0] == {"parameters_trainable": 2 * nt // w, "parameters_frozen": 2 * nf // w,
                         "gradients": 2 * nt // w, "optimizer": 12 * nt // w}
    # ZeRO-Offload: optimizer states and the fp32 gradient partition on the host
    d, h = dev(2, opt="cpu")
    assert (d["optimizer"], h["optimizer"]) == (0, 12 * nt // w)
    assert (d["gradients"], h["gradients"]) == (0, 4 * nt // w)
    assert d["parameters_frozen"] == 2 * nf and h["parameters_frozen"] == 0
    # ZeRO-Infinity style: parameters too (stage 3 only)
    d, h = dev(3, opt="cpu", param="cpu")
    assert d == {"parameters_trainable": 0, "parameters_frozen": 0, "gradients": 0,
                 "optimizer": 0}
    assert h == {"parameters_trainable": 2 * nt // w, "parameters_frozen": 2 * nf // w,
                 "gradients": 4 * nt // w, "optimizer": 12 * nt // w}
    assert dev(2, param="cpu")[0] == dev(2)[0]              # offload_param needs stage 3
    # ZeRO-3 keeps tensors under the persistence threshold whole
    rows = partition([Group(nt, 2, True, persistent=200)], _zero(3), w, mixed=True)
    assert rows["parameters_trainable"]["device"] == 2 * 200 + 2 * 800 // w
    # fp32: no master copy at ZeRO-0 (states in the parameter's dtype), a cloned one at ZeRO-1/2
    fp32 = [Group(nt, 4, True)]
    assert partition(fp32, _zero(0), w, mixed=False)["optimizer"]["device"] == 8 * nt
    assert partition(fp32, _zero(2), w, mixed=False)["optimizer"]["device"] == 12 * nt // w
    assert partition(fp32, _zero(3), w, mixed=False)["optimizer"]["device"] == 8 * nt // w
    # DeepSpeed's reduce bucket: reduce_bucket_size elements per gradient dtype
    assert zero_buffer_bytes(_zero(2), {2}, w, 0) == int(5e8) * 2
    assert zero_buffer_bytes(_zero(1, overlap_comm=True), {2}, w, 0) == int(5e8) * 2 * 2
    assert zero_buffer_bytes(_zero(2, reduce_bucket_size=1000), {2, 4}, w, 0) == 6000
    assert zero_buffer_bytes(_zero(2, contiguous_gradients=False), {2}, w, 0) == 0
    assert zero_buffer_bytes(_zero(0), {4}, 1, 0) == 0


def test_world_size_and_checkpointing_scale_the_plan(clips):
    from ptmrec_dist.plan import Planner

    cfg = plan_config(clips["w256"], "full", False, 16, ds_config="zero2")
    one, four = Planner(cfg, world_size=1), Planner(cfg, world_size=4)
    assert (one.micro, four.micro) == (16, 4)
    a1, a4 = one.at(one.micro)["rows"], four.at(four.micro)["rows"]
    assert a4["optimizer"]["device"] * 4 == pytest.approx(a1["optimizer"]["device"], abs=8)
    assert a4["gradients"]["device"] * 4 == pytest.approx(a1["gradients"]["device"], abs=8)
    assert a4["parameters_trainable"] == a1["parameters_trainable"]
    assert one.activations(8)["saved"] * 2 == one.activations(16)["saved"]
    ckpt = Planner(plan_config(clips["w256"], "full", True, 16), world_size=1)
    assert ckpt.activations(16)["total"] < one.activations(16)["total"]
    frozen = Planner(plan_config(clips["w256"], "frozen", False, 16), world_size=1)
    assert frozen.counts["trainable"] == 0 and frozen.activations(16)["saved"] == 0
    with pytest.raises(Exception, match="multiple of the number of ranks"):
        Planner(cfg, world_size=3)


def test_recommender_counts_match_the_real_models():
    import numpy as np
    import scipy.sparse as sp

    from ptmrec_dist import rec
    from ptmrec_dist.config import Config
    from ptmrec_dist.plan import recommender_sizes
    from ptmrec_dist.rec.features import ItemFeatures

    rng = np.random.default_rng(0)
    n_users, n_items, dim = 40, 30, 24
    users = np.repeat(np.arange(n_users), 4)
    items = rng.integers(0, n_items, len(users))
    train = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                          shape=(n_users, n_items))
    feats = ItemFeatures(image=rng.normal(size=(n_items, dim)).astype(np.float32),
                         text=rng.normal(size=(n_items, dim)).astype(np.float32))
    cfg = Config()
    for name in ("vbpr", "freedom", "bm3"):
        cfg.recommender.name = name
        model = rec.model_class(name)(n_users, n_items, feats, cfg.recommender, train)
        sizes = recommender_sizes(cfg, n_users, n_items, dim, train.nnz)
        assert sizes["trainable"] == sum(p.numel() for p in model.parameters()
                                         if p.requires_grad), name
    cfg.recommender.name = "bpr"
    with pytest.raises(Exception, match="uses no item features"):
        recommender_sizes(cfg, n_users, n_items, dim)


# --------------------------------------------------------------------------- the command

def test_cli_plan_prints_the_table_and_json(clips, capsys, tmp_path):
    from ptmrec_dist.cli import main

    base = [f"backbone.name_or_path={clips['w256']}", "stage2.prompt_depth=2",
            "stage2.batch_size=32"]
    assert main(["plan", *base, "--world-size", "4", "--device-memory", "16",
                 "--users", "1000", "--items", "500"]) == 0
    out = capsys.readouterr().out
    for label in ("parameters (trainable)", "parameters (frozen)", "gradients",
                  "optimizer states", "activations", "total", "device GiB", "host GiB",
                  "suggested micro batch for 16 GiB", "recommender vbpr"):
        assert label in out, out
    assert main(["plan", *base, "--json", "stage2.ds_config=zero3_offload"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 1 and plan["micro_batch"] == 32
    assert plan["zero"]["stage"] == 3 and plan["zero"]["offload_optimizer"] == "cpu"
    assert plan["rows"]["optimizer"]["device"] == 0 and plan["rows"]["optimizer"]["host"] > 0
    assert plan["counts"]["recommender"] is None
    assert any("recommender left out" in n for n in plan["notes"])
    assert plan["suggestion"]["micro_batch"] >= 1


def test_cli_plan_reads_the_data_sizes(clips, capsys, tmp_path):
    from ptmrec_dist.cli import main

    inter = tmp_path / "d.inter"
    inter.write_text("userID\titemID\tx_label\n" + "".join(
        f"{u}\t{(u * 7 + k) % 50}\t{int(k == 4)}\n" for u in range(20) for k in range(5)))
    assert main(["plan", f"backbone.name_or_path={clips['w256']}", "stage2.prompt_depth=2",
                 f"data.path={inter}", "recommender.name=freedom", "--json"]) == 0
    rc = json.loads(capsys.readouterr().out)["counts"]["recommender"]
    assert (rc["n_users"], rc["n_items"], rc["n_interactions"]) == (20, 50, 100)


@pytest.mark.parametrize("args,message", [
    (["backbone.name_or_path=/no/such/clip"], "no such folder"),
    ([], "no backbone"),
    (["backbone.name_or_path=CLIP", "stage2.batch_size=30", "--world-size", "4"],
     "multiple of the number of ranks"),
    (["backbone.name_or_path=CLIP", "--users", "10"], "--users and --items"),
    (["backbone.name_or_path=CLIP", "--device-memory", "0"], "--device-memory"),
])
def test_cli_plan_bad_config_exits_2(clips, capsys, args, message):
    from ptmrec_dist.cli import main

    args = [a.replace("=CLIP", f"={clips['w256']}") for a in args]
    assert main(["plan", "stage2.prompt_depth=2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))


def test_auto_checkpointing_is_on_where_it_pays(clips, monkeypatch):
    """stage2.activation_checkpointing=auto: the planner turns it on when a micro batch's
    activations reach 1 GiB (on a GPU also a quarter of its memory) and checkpointing saves at
    least a third; stage 2's backbone gets the
    same decision (plan.activations.resolve_checkpointing); true/false are kept as given."""
    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.methods import apply_method
    from ptmrec_dist.plan import Planner, activations

    small = Planner(plan_config(clips["w384"], "prompt", "auto", 16), world_size=1)
    off = small.activations(16)["total"]
    assert off < activations.AUTO_CKPT_MIN_BYTES and small.checkpointing is False
    assert any("auto: off" in n for n in small.notes)
    # a batch large enough to pass 1 GiB of activations: on, and the plan counts it so
    big_batch = int(16 * (2 * activations.AUTO_CKPT_MIN_BYTES) / off) // 16 * 16
    big = Planner(plan_config(clips["w384"], "prompt", "auto", big_batch), world_size=1)
    assert big.checkpointing is True and any("auto: on" in n for n in big.notes)
    # on a GPU the activations must also reach a quarter of its memory: 2 GiB of 80 do not
    roomy = Planner(plan_config(clips["w384"], "prompt", "auto", big_batch), world_size=1,
                    device_memory_gib=80)
    assert roomy.checkpointing is False and any("from 20.00 GiB" in n for n in roomy.notes)
    never = Planner(plan_config(clips["w384"], "prompt", False, big_batch), world_size=1)
    assert never.checkpointing is False
    assert big.activations(big_batch)["total"] * 3 <= never.activations(big_batch)["total"] * 2

    # stage 2's real backbone: the same rule, decided where the micro batch is known
    cfg = plan_config(clips["w384"], "prompt", "auto", 16)
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    assert backbone.use_checkpoint is False                  # undecided auto: nothing recomputed
    why = activations.resolve_checkpointing(backbone, cfg, 1)
    assert "auto: off" in why and backbone.use_checkpoint is False
    monkeypatch.setattr(activations, "AUTO_CKPT_MIN_BYTES", 1)
    why = activations.resolve_checkpointing(backbone, cfg, 1)
    assert "auto: on" in why and backbone.use_checkpoint is True
    cfg.stage2.activation_checkpointing = False
    assert activations.resolve_checkpointing(backbone, cfg, 1) is None
    # mlp: kept as given by stage 2, and the plan estimates it as off (an upper bound)
    mlp = Planner(plan_config(clips["w384"], "prompt", "mlp", big_batch), world_size=1)
    assert mlp.checkpointing is False and any("mlp: estimated as off" in n for n in mlp.notes)
    assert mlp.activations(big_batch)["total"] == never.activations(big_batch)["total"]
    cfg.stage2.activation_checkpointing = "mlp"
    assert activations.resolve_checkpointing(backbone, cfg, 1) is None
    assert apply_method(load_backbone(cfg.backbone), cfg).use_checkpoint == "mlp"
