"""Stage 2: the losses against hand computations, the item->user sampler, and whole runs on a
small demo (PTMRec with a teacher, one-stage runs, FREEDOM, ZeRO-3, the exported adapter)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from demo_fixtures import stage2_cfg
from run_fixtures import assert_same_run, checkpoint_states, child_env, ptmrec, read_log
from ptmrec_dist.cli import main
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.extract import extract_all
from ptmrec_dist.clip.methods import apply_method, load_trainable
from ptmrec_dist.config import load_config
from ptmrec_dist.dist import DistEnv
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.eval.evaluate import evaluate_run
from ptmrec_dist.train.losses import in_batch_bpr, kt_loss
from ptmrec_dist.train.sampler import UserSampler
from ptmrec_dist.train.stage2 import run_stage2



def _quiet(*_):
    pass


# --------------------------------------------------------------------------- losses by hand

def test_kt_loss_equals_a_hand_computed_kl():
    teacher = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    tau = 0.5
    rows = []
    for t, s in zip(teacher.tolist(), student.tolist()):
        p = [math.exp(x / tau) for x in t]
        p = [x / sum(p) for x in p]
        q = [math.exp(x / tau) for x in s]
        q = [x / sum(q) for x in q]
        rows.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert kt_loss(teacher, student, tau).item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert kt_loss(teacher, teacher, tau).item() == pytest.approx(0.0, abs=1e-7)
    # the teacher is a target: no gradient flows into it
    t = teacher.clone().requires_grad_()
    s = student.clone().requires_grad_()
    kt_loss(t, s, tau).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_in_batch_bpr_by_hand_excludes_known_positives():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    known = torch.eye(3, dtype=torch.bool)
    known[1, 2] = True          # item 2 is also a training positive of user 1: not a negative
    negatives = {0: [1, 2], 1: [0], 2: [0, 1]}

    def row(b):
        return sum(-math.log(1 / (1 + math.exp(-(scores[b, b] - scores[b, j]).item())))
                   for j in negatives[b]) / len(negatives[b])
    want = sum(row(b) for b in range(3)) / 3
    assert in_batch_bpr(scores, known).item() == pytest.approx(want, rel=1e-6)
    w = torch.tensor([1.0, 2.0, 3.0])
    weighted = sum(w[b].item() * row(b) for b in range(3)) / 6
    assert in_batch_bpr(scores, known, w).item() == pytest.approx(weighted, rel=1e-6)
    assert in_batch_bpr(scores[:1, :1], known[:1, :1]).item() == 0.0


def test_user_sampler_draws_training_users_and_skips_cold_items():
    train = sp.csr_matrix(np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    sampler = UserSampler(train, seed=3)
    items = np.array([0, 1, 2, 3, 0, 2])
    users, keep = sampler(items, epoch=0, step=0, rank=0, k=3)
    assert users.shape == (6, 3)
    assert keep.tolist() == [True, True, True, False, True, True]
    for row, i, k in zip(users, items, keep):
        if k:
            assert all(train[u, i] == 1 for u in row)
        else:
            assert (row == -1).all()
    again, _ = sampler(items, epoch=0, step=0, rank=0, k=3)
    assert again.tolist() == users.tolist()
    # over many draws every training user of item 0 and 2 appears
    drawn = np.concatenate([sampler(np.array([0, 2]), 0, s, 0)[0] for s in range(50)], axis=1)
    assert set(drawn[0]) == {0, 1} and set(drawn[1]) == {0, 2}
    known = sampler.known(np.array([0, 1]), np.array([2, 1]))
    assert known.tolist() == [[True, False], [False, True]]
    # importance weights: degree / mean degree over items that have a user
    assert sampler.row_weights(np.array([0, 1, 2])).tolist() == pytest.approx([1.2, 0.6, 1.2])


def test_in_batch_bpr_with_several_users_per_item():
    """Rows are (user, item) pairs, several rows per item: row r's positive is item pos[r]."""
    scores = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.5, 0.5], [-1.0, 1.0]])
    pos = torch.tensor([0, 0, 1, 1])
    known = torch.zeros(4, 2, dtype=torch.bool)
    known[torch.arange(4), pos] = True

    def term(a, b):
        return -math.log(1 / (1 + math.exp(-(a - b))))
    want = (term(2, 0) + term(1, 3) + term(0.5, 0.5) + term(1, -1)) / 4
    assert in_batch_bpr(scores, known, pos=pos).item() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------- whole runs

def test_demo_stage2_outputs(demo):
    out, summary = demo
    m = json.loads((out / "stage2" / "metrics.json").read_text())
    assert m["method"] == "prompt" and m["knowledge_init"] and m["teacher"] == str(out / "stage1")
    prompts = 2 * 2 * (32 + 32)       # depth x len x (text width + vision width)
    assert m["params"]["backbone"]["trainable"] == prompts
    assert summary["stages"]["stage2"]["backbone_params"]["trainable"] == prompts
    log = [json.loads(x) for x in (out / "stage2" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [-1, 0, 1]
    assert all(math.isfinite(r["loss"]) and r["kt"] >= 0 for r in log[1:])
    assert m["best_epoch"] in (-1, 0, 1)
    # the demo's paired per-user interval of stage 2 - stage 1 (test recall@20)
    pair = summary["stages"]["stage2"]["vs_stage1"]
    s1 = json.loads((out / "stage1" / "metrics.json").read_text())["test"]["recall@20"]
    assert pair["mean_diff"] == pytest.approx(m["test"]["recall@20"] - s1, abs=1e-9)
    assert pair["ci95"][0] <= pair["mean_diff"] <= pair["ci95"][1] and pair["n_users"] > 0
    # the run's representations reproduce its metrics
    again = evaluate_run(out / "stage2", "test")
    assert again["metrics"]["recall@20"] == pytest.approx(m["test"]["recall@20"], abs=1e-9)


def test_exported_adapter_reproduces_the_saved_features(demo):
    out, _ = demo
    cfg = load_config(out / "stage2" / "config.yaml")
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    meta = load_trainable(backbone, out / "stage2" / "adapter.safetensors")
    assert meta["method"] == "prompt" and meta["prompt_len"] == 2
    bank = extract_all(backbone, out / "shards", cfg, DistEnv(), torch.device("cpu"))
    saved = np.load(out / "stage2" / "features" / "image.npy").astype(np.float32)
    np.testing.assert_allclose(bank["image"], saved, atol=2e-3, rtol=2e-3)
    frozen = np.load(out / "features" / "image.npy").astype(np.float32)
    assert np.abs(saved - frozen).max() > 1e-2      # the prompts did change the features


def test_one_stage_full_finetuning_and_missing_teacher(demo, tmp_path):
    out, _ = demo
    cfg = stage2_cfg(out, "stage2.teacher=", "stage2.kt_weight=0", "peft.method=full",
                     "stage2.epochs=1")
    m = run_stage2(cfg, tmp_path / "joint", log=_quiet)
    assert m["teacher"] is None and m["method"] == "full"
    assert m["params"]["backbone"]["trainable"] == m["params"]["backbone"]["total"]
    with pytest.raises(ConfigError, match="needs a teacher"):
        run_stage2(stage2_cfg(out, "stage2.teacher="), tmp_path / "x", log=_quiet)
    with pytest.raises(ConfigError, match="prompt_init=teacher needs"):
        run_stage2(stage2_cfg(out, "stage2.teacher=", "stage2.kt_weight=0"), tmp_path / "y",
                   log=_quiet)


def test_lora_freedom_stage2(demo, tmp_path):
    """FREEDOM as student (its teacher trained here): the item graph is rebuilt from the
    re-extracted features, and LoRA trains only its adapters."""
    out, _ = demo
    teacher = tmp_path / "freedom1"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out", str(teacher),
                 "--model", "freedom", "stage1.epochs=2", "recommender.freedom.knn_k=5"]) == 0
    cfg = stage2_cfg(out, "recommender.name=freedom", "recommender.freedom.knn_k=5",
                     f"stage2.teacher={teacher}", "peft.method=lora", "stage2.epochs=1")
    m = run_stage2(cfg, tmp_path / "s2", log=_quiet)
    assert m["model"] == "freedom" and m["method"] == "lora"
    assert 0 < m["params"]["backbone"]["trainable"] < m["params"]["backbone"]["total"] / 10
    log = [json.loads(x) for x in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kt"] > 0 and math.isfinite(log[-1]["loss"])


@pytest.mark.parametrize("model", ["freedom", "bm3"])
def test_feature_tables_are_not_trained_or_counted_and_rec_lr_reaches_its_group(
        demo, tmp_path, model):
    """FREEDOM's and BM3's feature tables are parameters in stage 1; in stage 2 they are the
    feature bank (buffers) before the optimizer and the counts are built. The optimizer has the
    backbone group at stage2.lr and the recommender group at stage2.rec_lr."""
    from ptmrec_dist import dist
    from ptmrec_dist.train.stage2 import Stage2Run
    out, _ = demo
    teacher = tmp_path / "t"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out", str(teacher),
                 "--model", model, "stage1.epochs=1", "recommender.freedom.knn_k=5"]) == 0
    cfg = stage2_cfg(out, f"recommender.name={model}", "recommender.freedom.knn_k=5",
                     f"stage2.teacher={teacher}", "stage2.lr=0.02", "stage2.rec_lr=0.0007")
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, DistEnv())
    run = Stage2Run(cfg, tmp_path / "s2", env, _quiet)
    names = {n for n, p in run.student.named_parameters()}
    assert not any(n.startswith(("image_embedding", "text_embedding")) for n in names)
    expected = sum(p.numel() for p in run.student.parameters() if p.requires_grad)
    assert run.counts["recommender"]["trainable"] == expected
    tables = sum(t.numel() for t in run.student.item_modal_inputs().values())
    assert tables > 0 and all(not t.requires_grad for t in run.student.item_modal_inputs().values())
    lrs = sorted(g["lr"] for g in run.engine.optimizer.param_groups)
    assert lrs == [0.0007, 0.02]


def test_ia3_bm3_stage2(demo, tmp_path):
    """BM3 as student: its feature tables become the bank, its modal branch is the KT student."""
    out, _ = demo
    teacher = tmp_path / "bm3"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out", str(teacher),
                 "--model", "bm3", "stage1.epochs=2"]) == 0
    cfg = stage2_cfg(out, "recommender.name=bm3", f"stage2.teacher={teacher}",
                     "peft.method=ia3", "stage2.epochs=1", "stage2.lr=0.003")
    m = run_stage2(cfg, tmp_path / "s2", log=_quiet)
    assert m["model"] == "bm3" and m["method"] == "ia3"
    assert 0 < m["params"]["backbone"]["trainable"] < m["params"]["backbone"]["total"] / 10
    log = [json.loads(x) for x in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kt"] > 0 and math.isfinite(log[-1]["loss"])
    again = evaluate_run(tmp_path / "s2", "test")
    assert again["metrics"]["recall@20"] == pytest.approx(m["test"]["recall@20"], abs=1e-9)


def test_teacher_must_match_the_recommender(demo, tmp_path):
    out, _ = demo
    with pytest.raises(ConfigError, match="recommender.name"):
        run_stage2(stage2_cfg(out, "recommender.name=freedom"), tmp_path / "x", log=_quiet)
    with pytest.raises(ConfigError, match="uses no item features"):
        cfg = stage2_cfg(out, "stage2.teacher=", "stage2.kt_weight=0",
                         "peft.prompt_init=random", "recommender.name=bpr")
        run_stage2(cfg, tmp_path / "y", log=_quiet)


def test_text_only_stage2_never_runs_the_vision_tower(demo, tmp_path, monkeypatch):
    """backbone.modalities=text: the teacher and the student read text features only, the
    vision tower runs neither in training nor in the re-extraction, and the run exports text
    features only. A teacher of other modalities is refused, naming the key."""
    out, _ = demo
    teacher = tmp_path / "text1"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out", str(teacher),
                 "stage1.epochs=2", "backbone.modalities=text"]) == 0
    with pytest.raises(ConfigError, match="backbone.modalities"):
        run_stage2(stage2_cfg(out, "backbone.modalities=text"), tmp_path / "x", log=_quiet)

    def no_vision(*_a, **_k):
        raise AssertionError("the vision tower ran in a text-only run")
    monkeypatch.setattr("ptmrec_dist.clip.methods.vision_features", no_vision)
    m = run_stage2(stage2_cfg(out, "backbone.modalities=text", f"stage2.teacher={teacher}",
                              "stage2.epochs=1"), tmp_path / "t", log=_quiet)
    assert m["epochs_run"] == 1
    assert not (tmp_path / "t" / "features" / "image.npy").exists()
    assert np.load(tmp_path / "t" / "features" / "text.npy").shape[0] == \
        np.load(out / "features" / "text.npy").shape[0]
    log = read_log(tmp_path / "t")
    assert log[-1]["kt"] > 0 and log[-1]["backbone_shift"] > 0


def test_kt_targets_and_per_term_gradient_norms(demo, tmp_path):
    """stage2.kt_target: with nothing training (frozen backbone, rec_lr=0) the student is the
    teacher, so KT is ~0 when like is compared with like (full vs full, content vs the teacher's
    content head) and clearly not for today's full-vs-content pairing. grad_norms_every logs,
    per loss term, the gradient norm reaching the backbone and the recommender."""
    out, _ = demo
    kt = {}
    for target in ("full-content", "full", "content"):
        run = tmp_path / target
        run_stage2(stage2_cfg(out, "peft.method=frozen", "stage2.rec_lr=0", "stage2.epochs=1",
                              f"stage2.kt_target={target}"), run, log=_quiet)
        kt[target] = read_log(run)[-1]["kt"]
    assert kt["full"] < 1e-3 and kt["content"] < 1e-3 and kt["full-content"] > 50 * kt["content"]

    run = tmp_path / "norms"
    run_stage2(stage2_cfg(out, "stage2.epochs=1", "stage2.grad_norms_every=2"), run, log=_quiet)
    rec = read_log(run)[-1]
    assert rec["grad_norm_steps"] >= 1 and set(rec["grad_norms"]) == {"bpr", "kt", "reg"}
    for term in ("bpr", "kt"):
        assert rec["grad_norms"][term]["backbone"] > 0 and rec["grad_norms"][term]["recommender"] > 0
    assert rec["grad_norms"]["reg"]["recommender"] > 0
    with pytest.raises(ConfigError, match="grad_norms_every"):
        run_stage2(stage2_cfg(out, "stage2.grad_norms_every=1", "stage2.ds_config=zero3"),
                   tmp_path / "z3", log=_quiet)
    with pytest.raises(ConfigError, match="kt_target"):
        run_stage2(stage2_cfg(out, "stage2.kt_target=content", "stage2.teacher=",
                              "stage2.kt_weight=0", "peft.prompt_init=random"),
                   tmp_path / "x", log=_quiet)


@pytest.mark.parametrize("model", ["vbpr", "freedom"])
def test_feature_gate_starts_exactly_at_stage_1(demo, tmp_path, model):
    """stage2.feature_gate: before any step the student reads its stage-1 inputs, so epoch -1's
    valid metrics are the teacher's (to 1e-6) although the knowledge-guided prompts already
    change the backbone's features; training then opens the gate and moves the prompts. Without
    the gate epoch -1 differs from stage 1 (today's behaviour)."""
    out, _ = demo
    teacher, extra = out / "stage1", []
    if model != "vbpr":
        teacher = tmp_path / "t"
        assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out",
                     str(teacher), "--model", model, "stage1.epochs=2",
                     "recommender.freedom.knn_k=5"]) == 0
        extra = [f"recommender.name={model}", "recommender.freedom.knn_k=5"]
    want = json.loads((teacher / "metrics.json").read_text())["valid"]
    for gate in (True, False):
        run = tmp_path / f"gate-{gate}"
        m = run_stage2(stage2_cfg(out, f"stage2.teacher={teacher}", *extra, "stage2.epochs=1",
                                  f"stage2.feature_gate={str(gate).lower()}"), run, log=_quiet)
        log = read_log(run)
        start = log[0]["valid"]
        diff = max(abs(start[k] - want[k]) for k in ("recall@20", "ndcg@20", "recall@10"))
        if gate:
            assert diff < 1e-6, (start, want)
            assert log[0]["gate"] == {mm: 0.0 for mm in log[0]["gate"]}
            assert all(v != 0 for v in m["feature_gate"].values())
            assert log[-1]["backbone_shift"] > 0
        else:
            assert diff > 1e-4


def test_per_tower_learning_rates_and_shifts(demo, tmp_path):
    """stage2.text_lr / vision_lr: one optimizer group per tower at its rate; the log has each
    tower's prompt shift. A 100x smaller text rate moves the text prompts less (measured: 0.028
    against 0.056 relative L2; Adam's steps are ~lr in size, and the text prompts are smaller)."""
    from ptmrec_dist import dist
    from ptmrec_dist.train.stage2 import Stage2Run
    out, _ = demo
    cfg = stage2_cfg(out, "stage2.epochs=1", "stage2.text_lr=0.0001", "stage2.vision_lr=0.01")
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, DistEnv())
    run = Stage2Run(cfg, tmp_path / "r", env, _quiet)
    groups = run.engine.optimizer.param_groups
    assert sorted(g["lr"] for g in groups) == sorted([0.0001, 0.01, cfg.stage2.rec_lr])
    run.run()
    shift = read_log(tmp_path / "r")[-1]["backbone_shift_tower"]
    assert set(shift) == {"text", "vision"} and 0 < 1.5 * shift["text"] < shift["vision"]


def test_zero3_trains_prompts(demo, tmp_path):
    """Under ZeRO-3 (parameters partitioned, gathered by DeepSpeed's module hooks) the prompts
    still get gradients and the exported adapter is whole."""
    out, _ = demo
    cfg = stage2_cfg(out, "stage2.ds_config=zero3", "stage2.epochs=1")
    m = run_stage2(cfg, tmp_path / "z3", log=_quiet)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "z3" / "adapter.safetensors"))
    assert state and all(v.numel() > 0 for v in state.values())
    assert sum(v.numel() for v in state.values()) == m["params"]["backbone"]["trainable"]
    ref = load_file(str(out / "stage2" / "adapter.safetensors"))
    assert set(state) == set(ref)
    # save -> reload: a fresh backbone with the adapter gives the run's saved features
    cfg = load_config(tmp_path / "z3" / "config.yaml")
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    load_trainable(backbone, tmp_path / "z3" / "adapter.safetensors")
    bank = extract_all(backbone, out / "shards", cfg, DistEnv(), torch.device("cpu"))
    saved = np.load(tmp_path / "z3" / "features" / "image.npy").astype(np.float32)
    np.testing.assert_allclose(bank["image"], saved, atol=2e-3, rtol=2e-3)


def test_bf16_training_on_cpu(demo, tmp_path):
    """stage2.precision=bf16 (DeepSpeed casts backbone and student): inputs, feature bank and
    projections follow the cast; training and evaluation run (slowly on CPU: auto keeps fp32)."""
    out, _ = demo
    m = run_stage2(stage2_cfg(out, "stage2.precision=bf16", "stage2.epochs=1"), tmp_path / "b",
                   log=_quiet)
    assert m["bf16"] and m["epochs_run"] == 1
    log = read_log(tmp_path / "b")
    assert math.isfinite(log[-1]["loss"]) and log[-1]["backbone_shift"] > 0


@pytest.fixture(scope="module")
def one_epoch(demo, tmp_path_factory):
    """The log of one plain epoch (ZeRO-2, torch Adam, eager layers): the reference the
    switches are compared with."""
    out, _ = demo
    run = tmp_path_factory.mktemp("ref") / "one-epoch"
    run_stage2(stage2_cfg(out, "stage2.epochs=1"), run, log=_quiet)
    return read_log(run)


@pytest.mark.heavy
def test_compiled_encoder_layers_train(demo, one_epoch, tmp_path):
    """stage2.compile=true: torch.compile of every encoder layer (inductor on CPU: about a
    minute of compilation) trains like the eager model."""
    out, _ = demo
    m = run_stage2(stage2_cfg(out, "stage2.compile=true", "stage2.epochs=1"), tmp_path / "c",
                   log=_quiet)
    log = read_log(tmp_path / "c")
    assert m["epochs_run"] == 1 and log[1]["loss"] == pytest.approx(one_epoch[1]["loss"], rel=1e-3)


@pytest.mark.parametrize("ds_config,adam", [
    ("zero2_offload", "torch"),
    pytest.param("zero2_offload", "deepspeed", marks=pytest.mark.heavy),   # DeepSpeedCPUAdam
    pytest.param("zero2", "deepspeed", marks=pytest.mark.heavy),           # FusedAdam (CPU op)
])
def test_offload_and_deepspeed_adam_train_like_the_plain_run(demo, one_epoch, tmp_path,
                                                             ds_config, adam):
    """ZeRO-Offload (optimizer states and the Adam step on the host) and DeepSpeed's own Adam
    kernels (JIT-built on first use, about a minute each, cached in TORCH_EXTENSIONS_DIR) give
    the plain run's first epoch: same losses, same movement of the prompts."""
    out, _ = demo
    m = run_stage2(stage2_cfg(out, "stage2.epochs=1", f"stage2.ds_config={ds_config}",
                              f"stage2.adam={adam}"), tmp_path / "o", log=_quiet)
    log = read_log(tmp_path / "o")
    assert m["epochs_run"] == 1
    assert log[1]["loss"] == pytest.approx(one_epoch[1]["loss"], rel=1e-4)
    assert log[1]["backbone_shift"] == pytest.approx(one_epoch[1]["backbone_shift"], rel=1e-3)


def test_cli_stage2_bad_inputs_exit_2(demo, tmp_path, capsys):
    out, _ = demo
    args = ["stage2", "--config", str(out / "stage1" / "config.yaml"), "--out", str(tmp_path),
            "--shards", str(out / "shards")]
    assert main(args + ["--teacher", str(tmp_path / "nope")]) == 2
    assert "user_repr.npy" in capsys.readouterr().err
    assert main(args + ["--teacher", str(out / "stage1"), "peft.method=nope"]) == 2


TWO_RANKS = ["stage2.epochs=2", "stage2.checkpoint_every=2", "stage2.keep_checkpoints=50",
             "stage2.stop_check_every=3"]          # ranks ask each other every 3 steps


@pytest.fixture(scope="module")
def two_ranks(demo, tmp_path_factory):
    """An uninterrupted 2-rank torchrun run (gloo, ZeRO-2), checkpointing every 2 steps."""
    out, _ = demo
    run = tmp_path_factory.mktemp("r2") / "run"
    proc = ptmrec("stage2", "--config", out / "stage2" / "config.yaml", "--out", run,
                  *TWO_RANKS, ranks=2)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run


def test_two_ranks_under_torchrun(demo, two_ranks):
    """2 torchrun ranks (gloo, ZeRO-2): each rank streams its share of the items and re-extracts
    its share of the catalog; the bank gathered over the ranks covers every item once and equals
    the features the exported adapter gives on one process."""
    out, _ = demo
    run = two_ranks
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs_run"] == 2
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    n_items = int(np.load(out / "features" / "present.npy").sum())
    # both ranks' streamed items (resampled: equal shares per rank), less those with no training user
    assert n_items // 2 <= log[-1]["items"] <= n_items
    assert np.load(run / "features" / "present.npy").all()
    cfg = load_config(run / "config.yaml")
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    load_trainable(backbone, run / "adapter.safetensors")
    bank = extract_all(backbone, out / "shards", cfg, DistEnv(), torch.device("cpu"))
    saved = np.load(run / "features" / "text.npy").astype(np.float32)
    np.testing.assert_allclose(bank["text"], saved, atol=2e-3, rtol=2e-3)


def test_two_ranks_zero3_reextraction_with_uneven_shares(demo, tmp_path):
    """2 ranks under ZeRO-3: the demo's 3 shards give the ranks 80 and 40 items to re-extract
    (2 and 1 batches). ZeRO-3 all-gathers inside every forward, so the rank that ends first keeps
    running dummy batches until both are done (clip/extract.py in_step); before, the other rank
    waited in a collective until the process group's timeout (60 s here)."""
    out, _ = demo
    run = tmp_path / "z3x2"
    proc = ptmrec("stage2", "--config", out / "stage2" / "config.yaml", "--out", run,
                  "stage2.ds_config=zero3", "stage2.epochs=1", "dist.timeout_s=60",
                  "extract.batch_size=64", ranks=2)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs_run"] == 1
    assert np.load(run / "features" / "present.npy").all()


# --------------------------------------------------------------------------- exact resume

def _wait_for_checkpoint(run, proc, after: int = -1, timeout: float = 240.0):
    """The first mid-epoch checkpoint past optimizer step ``after`` (polling)."""
    import time
    t0 = time.time()
    while time.time() - t0 < timeout:
        for path, state in checkpoint_states(run):
            if state["step"] > after and not state["epoch_done"]:
                return path, state
        assert proc.poll() is None, "the run ended before a mid-epoch checkpoint"
        time.sleep(0.02)
    raise AssertionError("no mid-epoch checkpoint appeared")


def test_resume_mid_epoch_is_exact_with_workers_and_warmup(demo, tmp_path):
    """One rank, 2 loader workers, an lr warm-up (scheduler state), checkpoints every 3
    optimizer steps: resuming from a mid-epoch checkpoint (as after a kill: the later ones
    removed) gives exactly the uninterrupted run's losses and metrics. Checkpoints hold the
    trainable weights only."""
    import shutil

    out, _ = demo
    over = ["stage2.epochs=2", "stage2.checkpoint_every=3", "stage2.keep_checkpoints=50",
            "stage2.warmup_steps=4", "stage2.num_workers=2"]
    ref = tmp_path / "ref"
    run_stage2(stage2_cfg(out, *over), ref, log=_quiet)
    states = checkpoint_states(ref)
    mid = [(p, s) for p, s in states if s["epoch"] == 1 and not s["epoch_done"]]
    assert mid and any(s["epoch_done"] for _, s in states)
    cut, state = mid[0]
    assert state["next_step"] > 0
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    (run / "metrics.json").unlink()
    for path, s in checkpoint_states(run):
        if s["step"] > state["step"]:
            shutil.rmtree(path)
    m = run_stage2(stage2_cfg(out, *over), run, log=_quiet, resume=True)
    assert m["epochs_run"] == 2
    assert_same_run(ref, run)
    # only the trainable weights are in the DeepSpeed checkpoint
    model = torch.load(cut / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    params = {n for n, t in model.items() if n.startswith("backbone.")}
    assert params and params <= {"backbone.prompts.text", "backbone.prompts.vision"}


def test_resume_refuses_another_backbone_or_config(demo, tmp_path):
    from transformers import CLIPModel

    from ptmrec_dist.errors import InputError

    out, _ = demo
    run = tmp_path / "run"
    run_stage2(stage2_cfg(out, "stage2.epochs=1"), run, log=_quiet)
    with pytest.raises(InputError, match=r"stage2\.kt_weight is 1\.0 here, 10\.0"):
        run_stage2(stage2_cfg(out, "stage2.epochs=1", "stage2.kt_weight=1"), run, log=_quiet,
                   resume=True)
    cfg = stage2_cfg(out, "stage2.epochs=1")
    other = tmp_path / "other-backbone"
    clip = CLIPModel.from_pretrained(cfg.backbone.name_or_path)
    with torch.no_grad():
        clip.visual_projection.weight[0, 0] += 1e-3
    clip.save_pretrained(other)
    import shutil
    for f in Path(cfg.backbone.name_or_path).iterdir():
        if not (other / f.name).exists():
            shutil.copy(f, other / f.name)
    with pytest.raises(InputError, match="weight hash"):
        run_stage2(stage2_cfg(out, "stage2.epochs=1", f"backbone.name_or_path={other}"), run,
                   log=_quiet, resume=True)
    # with nothing to resume, --resume starts from scratch
    m = run_stage2(stage2_cfg(out, "stage2.epochs=1"), tmp_path / "fresh", log=_quiet,
                   resume=True)
    assert m["epochs_run"] == 1


def test_two_ranks_sigusr1_then_sigkill_then_resume_is_exact(demo, two_ranks, tmp_path):
    """2 torchrun ranks. SIGUSR1 to rank 1 only (what SLURM sends before preemption): both
    ranks agree, checkpoint mid-epoch and exit 3. ``--resume`` continues; that run is killed
    with SIGKILL (the whole process group) after its next checkpoint; ``--resume`` again
    finishes with exactly the metrics of the uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    from ptmrec_dist.dist import free_port

    out, _ = demo
    run = tmp_path / "run"

    def launch(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "ptmrec_dist", "stage2", "--config",
               str(out / "stage2" / "config.yaml"), "--out", str(run), *TWO_RANKS, *extra]
        return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def rank_pids(proc):
        """{rank: pid} of torchrun's workers (each in its own session)."""
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        pids = {}
        for pid in kids.stdout.split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
            if ranks:
                pids[ranks[0]] = int(pid)
        assert sorted(pids) == [0, 1], pids
        return pids

    proc = launch()
    _, first = _wait_for_checkpoint(run, proc)
    os.kill(rank_pids(proc)[1], signal.SIGUSR1)
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "stopped by SIGUSR1" in text, text[-3000:]
    stopped = [s for _, s in checkpoint_states(run) if s["step"] > first["step"]]
    assert stopped and not stopped[-1]["epoch_done"]
    assert not (run / "metrics.json").exists()

    proc = launch("--resume")
    _wait_for_checkpoint(run, proc, after=stopped[-1]["step"])
    for pid in [*rank_pids(proc).values(), proc.pid]:    # as a lost node: everything at once
        os.kill(pid, signal.SIGKILL)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "resumed from" in text, text[-3000:]
    assert not (run / "metrics.json").exists()

    proc = launch("--resume")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    assert_same_run(two_ranks, run)


def test_budget_options_passes_and_a_prompt_only_warm_up(demo, one_epoch, tmp_path):
    """stage2.passes_per_epoch streams the items that many times per epoch;
    stage2.rec_warmup_epochs keeps the recommender still (rate 0) while the prompts train, then
    lets it move."""
    from ptmrec_dist import dist
    from ptmrec_dist.train.stage2 import Stage2Run
    out, _ = demo
    run_stage2(stage2_cfg(out, "stage2.epochs=1", "stage2.passes_per_epoch=2"), tmp_path / "p",
               log=_quiet)
    assert read_log(tmp_path / "p")[1]["items"] >= 1.9 * one_epoch[1]["items"]

    cfg = stage2_cfg(out, "stage2.epochs=2", "stage2.rec_warmup_epochs=1")
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, DistEnv())
    run = Stage2Run(cfg, tmp_path / "w", env, _quiet)
    run.refresh_bank(first=True)

    def snapshot(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    rec0, prompts0 = snapshot(run.student), snapshot(run.backbone)
    run.train_epoch(0)
    rec1, prompts1 = snapshot(run.student), snapshot(run.backbone)
    assert all(torch.equal(rec0[n], rec1[n]) for n in rec0)
    assert any(not torch.equal(prompts0[n], prompts1[n]) for n in prompts0)
    run.train_epoch(1)
    assert any(not torch.equal(rec1[n], v) for n, v in snapshot(run.student).items())


def test_set_group_lr_survives_a_warm_up_schedule():
    """A group's rate set by hand is also the warm-up schedule's base, so the schedule's next
    step keeps it (rate x warm-up factor), instead of writing the old base back."""
    from types import SimpleNamespace
    from ptmrec_dist.train.engine import set_group_lr, warmup_schedule
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": params[:1], "lr": 0.01}, {"params": params[1:], "lr": 0.001}])
    sched = warmup_schedule(4)(opt)
    sched.step()                                         # factor 2/4
    engine = SimpleNamespace(optimizer=opt, lr_scheduler=sched)
    set_group_lr(engine, -1, 0.0)
    sched.step()
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[0]["lr"] == pytest.approx(0.0075)
    set_group_lr(engine, -1, 0.002)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.002 * 3 / 4)
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.002)
    set_group_lr(SimpleNamespace(optimizer=opt, lr_scheduler=None), 0, 0.5)
    assert opt.param_groups[0]["lr"] == 0.5


def test_graph_refresh_rebuilds_freedoms_item_graph_from_the_bank(demo, tmp_path):
    """stage2.graph_refresh_every N: every N optimizer steps FREEDOM's item-item kNN graph is
    rebuilt from the feature bank as it is (the rows written since the re-extraction); without
    it the graph stays the re-extraction's until the epoch ends. The epoch logs its rebuilds; a
    mid-epoch resume at a rebuild step is exact; vbpr (nothing derived) refuses the key."""
    import shutil

    from ptmrec_dist import dist
    from ptmrec_dist.train.stage2 import Stage2Run
    out, _ = demo
    teacher = tmp_path / "t"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out",
                 str(teacher), "--model", "freedom", "stage1.epochs=1",
                 "recommender.freedom.knn_k=5"]) == 0
    extra = [f"stage2.teacher={teacher}", "recommender.name=freedom",
             "recommender.freedom.knn_k=5", "stage2.lr=0.05"]

    def dense(student):
        return student.mm_adj.to_dense()

    def bank_graph(student):
        adj, _ = student._mm_graph({m: getattr(student, f"{m}_embedding")
                                    for m in student.modalities})
        return adj.to_dense()

    graphs = {}
    for every in (0, 1):
        cfg = stage2_cfg(out, *extra, f"stage2.graph_refresh_every={every}")
        env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, DistEnv())
        run = Stage2Run(cfg, tmp_path / f"g{every}", env, _quiet)
        run.refresh_bank(first=True)
        start = dense(run.student)
        record, _ = run.train_epoch(0)
        graphs[every] = (start, dense(run.student), bank_graph(run.student))
        if every:
            assert record["graph_refreshes"] == int(run.engine.global_steps) > 0
        else:
            assert "graph_refreshes" not in record
    start, kept, now = graphs[0]
    assert torch.equal(kept, start) and not torch.equal(now, start)   # the bank moved the kNN
    _, rebuilt, now = graphs[1]
    assert torch.equal(rebuilt, now)

    over = [*extra, "stage2.epochs=1", "stage2.graph_refresh_every=2",
            "stage2.checkpoint_every=2", "stage2.keep_checkpoints=50"]
    ref = tmp_path / "ref"
    run_stage2(stage2_cfg(out, *over), ref, log=_quiet)
    mid = [s for _, s in checkpoint_states(ref) if not s["epoch_done"] and s["epoch"] == 0]
    assert mid and read_log(ref)[1]["graph_refreshes"] > 1
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "metrics.json").unlink()
    for path, s in checkpoint_states(resumed):
        if s["step"] > mid[0]["step"]:
            shutil.rmtree(path)
    run_stage2(stage2_cfg(out, *over), resumed, log=_quiet, resume=True)
    assert_same_run(ref, resumed)

    with pytest.raises(ConfigError, match="graph_refresh_every.*vbpr"):
        run_stage2(stage2_cfg(out, "stage2.graph_refresh_every=2"), tmp_path / "v", log=_quiet)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_whole_process_group_still_checkpoints(demo, tmp_path, sig):
    """SLURM (time limit, scancel, preemption) and `kill -- -PGID` signal every process of the
    job, the data loader's workers too: the workers must outlive the signal so that the trainer
    can still read its batches, checkpoint and exit 3."""
    import os
    import signal
    import subprocess
    import sys

    out, _ = demo
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ptmrec_dist", "stage2", "--config",
           str(out / "stage2" / "config.yaml"), "--out", str(run), "stage2.num_workers=2",
           "stage2.checkpoint_every=2", "stage2.epochs=3"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _, first = _wait_for_checkpoint(run, proc)
    os.killpg(proc.pid, getattr(signal, sig))
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3 and f"stopped by {sig}" in text, text[-3000:]
    assert [s for _, s in checkpoint_states(run) if s["step"] > first["step"]], text[-3000:]


# Run as a child: stage 2 whose first end-of-epoch re-extraction is hit by a SIGTERM to the
# whole process group, sent from one of the extraction loader's workers after its second item.
_SIGNAL_DURING_EXTRACTION = """
import os, signal, sys
from pathlib import Path
import ptmrec_dist.train.stage2 as stage2
from ptmrec_dist.cli import main
from ptmrec_dist.data.readers import ExactlyOnceItems

armed, calls = Path(sys.argv[1]), []
real_extract, real_iter = stage2.extract_all, ExactlyOnceItems.__iter__

def extract_all(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:              # the set-up's extraction is the first
        armed.touch()
    return real_extract(*args, **kwargs)

def items(self):
    for i, item in enumerate(real_iter(self)):
        if i == 1:
            try:                     # once, whichever worker gets there first
                os.rename(armed, str(armed) + ".fired")
            except FileNotFoundError:
                pass
            else:
                os.killpg(os.getpgrp(), signal.SIGTERM)
        yield item

stage2.extract_all, ExactlyOnceItems.__iter__ = extract_all, items
sys.exit(main(sys.argv[2:]))
"""


def test_a_signal_to_the_process_group_during_the_re_extraction_still_checkpoints(demo,
                                                                                   tmp_path):
    """The end-of-epoch re-extraction reads the shards through its own loader: its workers
    must outlive a group-wide SIGTERM too (they died of it, the run exited 1 without a
    checkpoint, and then hung at exit on the training loader's workers)."""
    import os
    import signal
    import subprocess
    import sys

    out, _ = demo
    run, script = tmp_path / "run", tmp_path / "signal_during_extraction.py"
    script.write_text(_SIGNAL_DURING_EXTRACTION)
    cmd = [sys.executable, str(script), str(tmp_path / "armed"), "stage2", "--config",
           str(out / "stage2" / "config.yaml"), "--out", str(run), "stage2.num_workers=2",
           "extract.num_workers=2", "stage2.epochs=3"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "armed.fired").exists(), text[-3000:]          # the signal was sent
    assert proc.returncode == 3 and "stopped by SIGTERM" in text, text[-3000:]
    assert checkpoint_states(run), text[-3000:]


_FAIL_WITH_A_LIVE_LOADER = """
import sys
import torch
from torch.utils.data import DataLoader, IterableDataset
from ptmrec_dist.train.checkpoint import loader_worker_options

class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(4)

batches = iter(DataLoader(Endless(), batch_size=2, num_workers=2, **loader_worker_options()))
next(batches)
raise RuntimeError("a run failed while its loader's workers were alive")
"""


def test_a_run_that_fails_with_live_loader_workers_still_exits(tmp_path):
    """Loader workers ignore SIGTERM (the trainer handles the stop signals), and
    multiprocessing's exit handler ends daemonic children with SIGTERM and then waits: without
    ``end_daemon_children`` at exit a failed run hung there forever instead of exiting 1."""
    import subprocess
    import sys

    script = tmp_path / "fail.py"
    script.write_text(_FAIL_WITH_A_LIVE_LOADER)
    proc = subprocess.run([sys.executable, str(script)], env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "a run failed while its loader's workers were alive" in proc.stderr
    assert "killed by signal" not in proc.stderr          # no second, misleading error
