"""bf16 on every model (issue 22): stage 1 with ``stage1.precision=bf16`` for each base model,
stage 2 in bf16 with FREEDOM and BM3 students, the sparse propagation and the losses in fp32
under bf16 parameters (and unchanged for fp32), the feature-bank write of a resume into a table
of another device and dtype, and ``precision: auto`` choosing bf16 only where it is native."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset
from run_fixtures import read_log
from safetensors.torch import load_file

from ptmrec_dist import rec
from ptmrec_dist.cli import main
from ptmrec_dist.config import load_config
from ptmrec_dist.rec import graph
from ptmrec_dist.rec.base import Recommender, bpr_loss
from ptmrec_dist.train.engine import resolve_ds_config, resolve_precision
from ptmrec_dist.train.losses import in_batch_bpr
from ptmrec_dist.train.stage1 import run_stage1
from ptmrec_dist.train.stage2 import run_stage2


# --------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("bf16") / "tiny", n_users=40, n_items=30,
                             per_user=8)


@pytest.mark.parametrize("name", rec.names())
def test_stage1_bf16_trains_every_model(name, tiny, in_process, tmp_path):
    """``stage1.precision=bf16``: DeepSpeed casts the parameters (the graphs stay fp32), two
    epochs train to a finite loss (pop, with nothing to train, counts once), and the metrics and
    the teacher's representations are written."""
    cfg = load_config(None, [f"data.path={tiny}", f"recommender.name={name}",
                             "stage1.epochs=2", "stage1.batch_size=64", "stage1.lr=0.01",
                             "stage1.precision=bf16", "recommender.freedom.knn_k=5"])
    m = run_stage1(cfg, tmp_path, log=lambda *_: None)
    trainable = rec.model_class(name).trainable
    assert m["epochs_run"] == (2 if trainable else 1) and 0 <= m["test"]["recall@20"] <= 1
    assert (tmp_path / "user_repr.npy").is_file() and (tmp_path / "item_repr.npy").is_file()
    if trainable:
        assert [math.isfinite(r["loss"]) for r in read_log(tmp_path)] == [True, True]
        weights = load_file(tmp_path / "checkpoints" / "best" / "model.safetensors")
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}


def _stage2_cfg(out, *overrides):
    from demo_fixtures import SMALL
    cfg = load_config(out / "stage1" / "config.yaml", SMALL)
    cfg.data.shards = str(out / "shards")
    return load_config(None, list(overrides), base=cfg)


@pytest.mark.parametrize("model", ["freedom", "bm3"])
def test_stage2_bf16_with_a_graph_student(model, demo, in_process, tmp_path):
    """Both stages in bf16 with a graph model: a bf16 teacher, then stage 2 with the student
    cast to bf16 (the item graph rebuilt from the bf16 bank for FREEDOM): the first evaluation,
    one epoch of training and the final one run, with a finite loss and a KT term."""
    out, _ = demo
    teacher = tmp_path / "teacher"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out", str(teacher),
                 "--model", model, "stage1.epochs=1", "stage1.precision=bf16",
                 "recommender.freedom.knn_k=5"]) == 0
    cfg = _stage2_cfg(out, f"recommender.name={model}", "recommender.freedom.knn_k=5",
                      f"stage2.teacher={teacher}", "stage2.precision=bf16", "stage2.epochs=1")
    m = run_stage2(cfg, tmp_path / "s2", log=lambda *_: None)
    assert m["model"] == model and m["bf16"] and m["epochs_run"] == 1
    log = read_log(tmp_path / "s2")
    assert math.isfinite(log[-1]["loss"]) and log[-1]["kt"] > 0
    assert 0 <= json.loads((tmp_path / "s2" / "metrics.json").read_text())["test"]["recall@20"] <= 1


# --------------------------------------------------------------------------- sparse propagation

def _graph(n: int = 7, seed: int = 0):
    """A random non-symmetric sparse ``A`` as CSR with its transpose, and ``A`` dense (fp32)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.4)
    return graph.to_csr(dense.to_sparse()) + (dense,)


def test_spmm_of_bf16_inputs_runs_in_fp32_forward_and_backward():
    a, a_t, dense = _graph()
    x = torch.randn(7, 3).bfloat16().requires_grad_()
    w = torch.randn(7, 3)
    out = graph.spmm(a, x, a_t)
    assert out.dtype == torch.bfloat16
    (out.float() * w).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, (dense @ x.float()).bfloat16())
    torch.testing.assert_close(x.grad, (dense.T @ w).bfloat16())


def test_lightgcn_and_propagate_of_bf16_match_fp32_to_bf16_precision():
    a, a_t, dense = _graph()
    sym = graph.csr((dense + dense.T).to_sparse())
    x = torch.randn(7, 4)
    for adj in (sym, sym.to_sparse_coo()):      # the CSR path and torch.sparse.mm's
        got = graph.lightgcn(adj, x.bfloat16(), 3)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, graph.lightgcn(adj, x.bfloat16().float(), 3).bfloat16())
    got = graph.propagate(a, x.bfloat16(), 2, a_t)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, (dense @ dense @ x.bfloat16().float()).bfloat16())


def test_a_graph_cast_to_bf16_still_propagates_in_fp32():
    """DeepSpeed versions that cast buffers too would hand a bf16 graph (torch has no bf16
    sparse kernels on CPU): it is brought back to fp32 for the product."""
    a, a_t, dense = _graph()
    x = torch.randn(7, 3).bfloat16()
    got = graph.spmm(a.to(torch.bfloat16), x, a_t.to(torch.bfloat16))
    want = (dense.bfloat16().float() @ x.float()).bfloat16()
    torch.testing.assert_close(got, want)


def test_fp32_propagation_is_unchanged():
    """For fp32 inputs the casts are no-ops: the same values bit for bit as the plain products."""
    a, a_t, dense = _graph()
    x = torch.randn(7, 3, requires_grad=True)
    w = torch.randn(7, 3)
    out = graph.spmm(a, x, a_t)
    (out * w).sum().backward()
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ x.detach()) and torch.equal(x.grad, a_t @ w)
    h = x.detach()
    for _ in range(2):
        h = a @ h
    assert torch.equal(graph.propagate(a, x.detach(), 2, a_t), h)


# --------------------------------------------------------------------------- losses

def test_bpr_loss_of_bf16_scores_is_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    pos, neg = (torch.randn(64, generator=g) * 3 for _ in range(2))
    batch = {"denom": 64}
    got = bpr_loss(pos.bfloat16(), neg.bfloat16(), batch)
    assert got.dtype == torch.float32
    assert torch.equal(got, bpr_loss(pos.bfloat16().float(), neg.bfloat16().float(), batch))


def test_bpr_loss_of_fp32_scores_is_unchanged():
    pos, neg = torch.randn(50), torch.randn(50)
    want = (-F.logsigmoid(pos - neg)).sum() / 50
    assert torch.equal(bpr_loss(pos, neg, {"denom": 50}), want)


def test_in_batch_bpr_of_bf16_scores_is_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    scores = (torch.randn(6, 6, generator=g) * 4).bfloat16().requires_grad_()
    known = torch.eye(6, dtype=torch.bool)
    known[0, 3] = True
    weights = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 1.0])
    got = in_batch_bpr(scores, known, weights)
    assert got.dtype == torch.float32
    assert torch.equal(got, in_batch_bpr(scores.detach().float(), known, weights))
    got.backward()
    assert scores.grad.dtype == torch.bfloat16 and torch.isfinite(scores.grad.float()).all()


def test_in_batch_bpr_of_fp32_scores_is_unchanged():
    """The formula of the module docstring, written out: the fp32 result bit for bit."""
    scores = torch.randn(5, 5)
    known = torch.eye(5, dtype=torch.bool)
    valid = ~known
    per_row = (-F.logsigmoid(scores.diagonal().unsqueeze(1) - scores) * valid).sum(1) / valid.sum(1)
    assert torch.equal(in_batch_bpr(scores, known), (per_row * 1.0).sum() / per_row.numel())


# --------------------------------------------------------------------------- feature bank

class _Bank(Recommender):
    """The smallest student with a feature bank: one ``image`` table."""

    def __init__(self, table: torch.Tensor):
        super().__init__(1, table.shape[0], None, None, None)
        self.image = table

    def item_modal_inputs(self):
        return {"image": self.image}


def test_bank_write_casts_rows_to_the_table_dtype():
    """A checkpoint's fp32 rows written into a bf16 bank (stage 2 in bf16)."""
    student = _Bank(torch.zeros(5, 4, dtype=torch.bfloat16))
    values = torch.randn(2, 4)
    student.update_modal_inputs(torch.tensor([1, 3]), {"image": values})
    assert student.image.dtype == torch.bfloat16
    assert torch.equal(student.image[[1, 3]], values.bfloat16())
    assert not student.image[[0, 2, 4]].any()


def test_bank_write_moves_cpu_rows_to_a_cuda_table():
    """Resume on a GPU: the saved rows are CPU tensors, the bank is on ``cuda``. FakeTensorMode
    makes fake CUDA tensors on this CPU-only build and raises on device mixing, as CUDA does."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        student = _Bank(torch.zeros(5, 4, dtype=torch.bfloat16, device="cuda"))
        student.update_modal_inputs(torch.tensor([1, 3]), {"image": torch.randn(2, 4)})
        assert student.image.device.type == "cuda" and student.image.dtype == torch.bfloat16


# --------------------------------------------------------------------------- precision: auto

@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(major)``: torch.cuda reports one GPU of compute capability ``major``.x on which
    a bf16 tensor can be made (the emulation torch counts by default)."""
    def make(major: int):
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(major=major, minor=0))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    return make


@pytest.mark.parametrize("major, want", [(7, "fp32"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_is_bf16_only_where_it_is_native(fake_gpu, major, want):
    """V100 / T4 (7.x) emulate bf16: ``auto`` is fp32 there; A100 (8.0) and H100 (9.0): bf16."""
    fake_gpu(major)
    assert torch.cuda.is_bf16_supported()          # what the default check says on all three
    assert resolve_precision("auto") == want
    ds = resolve_ds_config("zero0", batch_size=8, world_size=1, lr=0.1, weight_decay=0.0,
                           precision="auto", adam="torch")
    assert ds.get("bf16", {}).get("enabled", False) == (want == "bf16")
    assert not ds.get("fp16", {}).get("enabled", False)
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp16") == "fp16"


def test_auto_precision_on_cpu_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "fp32"


def test_stage2_bf16_freedom_resumes_mid_epoch_exactly(demo, in_process, tmp_path):
    """FREEDOM in bf16 with checkpoints every 3 steps: resuming from a mid-epoch checkpoint
    (its bank rows written back into the bf16 bank) gives the uninterrupted run exactly."""
    import shutil

    from run_fixtures import assert_same_run, checkpoint_states
    out, _ = demo
    teacher = tmp_path / "teacher"
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out", str(teacher),
                 "--model", "freedom", "stage1.epochs=1", "recommender.freedom.knn_k=5"]) == 0
    over = ["recommender.name=freedom", "recommender.freedom.knn_k=5", f"stage2.teacher={teacher}",
            "stage2.precision=bf16", "stage2.epochs=2", "stage2.checkpoint_every=3",
            "stage2.keep_checkpoints=50"]
    ref = tmp_path / "ref"
    run_stage2(_stage2_cfg(out, *over), ref, log=lambda *_: None)
    mid = [(p, s) for p, s in checkpoint_states(ref) if s["epoch"] == 1 and not s["epoch_done"]]
    assert mid, "no mid-epoch checkpoint in epoch 1"
    state = mid[0][1]
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    (run / "metrics.json").unlink()
    for path, s in checkpoint_states(run):
        if s["step"] > state["step"]:
            shutil.rmtree(path)
    m = run_stage2(_stage2_cfg(out, *over), run, log=lambda *_: None, resume=True)
    assert m["epochs_run"] == 2 and m["bf16"]
    assert_same_run(ref, run)
