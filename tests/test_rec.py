"""Base recommenders (ptmrec_dist/rec/), their features and the DeepSpeed config resolution, on the
tiny clustered data set, without DeepSpeed engines: scoring consistency, loss gradients, a few
hundred plain Adam steps, FREEDOM's edge pruning, feature loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rec_fixtures import make_tiny_dataset

from ptmrec_dist import rec
from ptmrec_dist.config import load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.rec.features import load_item_features, resolve_features
from ptmrec_dist.train.engine import resolve_ds_config
from ptmrec_dist.train.sampler import BPRSampler
from ptmrec_dist.train.stage1 import build_model

TRAINABLE = [n for n in rec.names() if n != "pop"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("rec") / "tiny")


@pytest.fixture(scope="module")
def inter(data_path):
    return load_interactions(data_path, cfg(data_path).data)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg(path, *overrides):
    return load_config(None, [f"data.path={path}", "recommender.embedding_dim=16",
                              "recommender.feat_embed_dim=16", *overrides])


def model_for(name, path, inter, *overrides):
    return build_model(cfg(path, f"recommender.name={name}", *overrides), inter)


def first_batch(model, inter, seed=0) -> dict:
    sampler = BPRSampler(inter.csr("train"), 64, seed, negatives=model.uses_negatives)
    return next(iter(sampler.epoch(0)))


def test_registry_has_the_five_models():
    assert rec.names() == ["pop", "bpr", "vbpr", "freedom", "bm3"]


@pytest.mark.parametrize("name", rec.names())
def test_scores_are_user_repr_times_item_repr(name, data_path, inter):
    model = model_for(name, data_path, inter).eval()
    with torch.no_grad():
        u_r, i_r = model.representations()
        assert u_r.shape[0] == 90 and i_r.shape[0] == 60 and u_r.shape[1] == i_r.shape[1]
        users = torch.tensor([0, 7, 33, 89])
        full = model.full_scores(users)
        assert full.shape == (4, 60)
        torch.testing.assert_close(full, u_r[users] @ i_r.T, rtol=1e-5, atol=1e-6)
        items = torch.tensor([5, 0, 59, 31])
        fwd = model(users, items)
        torch.testing.assert_close(fwd, full[torch.arange(4), items], rtol=1e-5, atol=1e-6)
        assert full.std() > 0                       # not a constant


@pytest.mark.parametrize("name", TRAINABLE)
def test_loss_finite_with_gradient_to_every_parameter(name, data_path, inter):
    model = model_for(name, data_path, inter)
    batch = first_batch(model, inter)
    assert ("neg" in batch) == model.uses_negatives
    out = model.loss(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert list(model.parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all()
        if name == "freedom" and pname.endswith("_trs.bias"):
            # u.(W f_pos + b) - u.(W f_neg + b): the bias cancels in the pairwise modal BPR
            assert p.grad.abs().max() < 1e-6
        else:
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", TRAINABLE)
def test_two_rank_gradients_average_to_one_rank(name, data_path, inter):
    """DeepSpeed averages the ranks' gradients: those of the two rank slices of a global batch
    (``denom`` = global batch / ranks, shared dropout generator) average to the whole batch's."""
    model = model_for(name, data_path, inter)
    model.pre_epoch(0, torch.Generator().manual_seed(5))

    def grads(rank, world):
        sampler = BPRSampler(inter.csr("train"), 64, 0, rank, world, model.uses_negatives)
        model.zero_grad()
        model.loss(next(iter(sampler.epoch(0))))["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    one, r0, r1 = grads(0, 1), grads(0, 2), grads(1, 2)
    for n, g in one.items():
        torch.testing.assert_close((r0[n] + r1[n]) / 2, g, rtol=1e-4, atol=1e-8, msg=n)


@pytest.mark.parametrize("name", TRAINABLE)
def test_adam_steps_lower_the_loss(name, data_path, inter):
    model = model_for(name, data_path, inter)
    batch = first_batch(model, inter)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = model.loss(batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.5 * losses[0], (losses[0], losses[-10:])


def test_pop_scores_are_training_counts(data_path, inter):
    model = model_for("pop", data_path, inter)
    assert model.trainable is False and not list(model.parameters())
    counts = np.asarray(inter.csr("train").sum(axis=0)).ravel()
    assert counts.sum() == 720
    scores = model.full_scores(torch.arange(90)).numpy()
    np.testing.assert_array_equal(scores, np.tile(counts, (90, 1)))
    with pytest.raises(RuntimeError):
        model.loss({})


def test_vbpr_modal_inputs_are_the_feature_buffers(data_path, inter):
    model = model_for("vbpr", data_path, inter)
    inputs = model.item_modal_inputs()
    assert set(inputs) == {"image", "text"}
    assert inputs["image"] is model.image_features and inputs["text"] is model.text_features
    param_ids = {id(p) for p in model.parameters()}
    for m, dim in (("image", 16), ("text", 12)):
        t = inputs[m]
        assert t.shape == (60, dim) and not t.requires_grad and id(t) not in param_ids
        np.testing.assert_array_equal(t.numpy(), np.load(data_path.parent / f"{m}_feat.npy"))
    assert "image_features" not in model.state_dict()          # frozen inputs are not saved


@pytest.mark.parametrize("name", ["freedom", "bm3"])
def test_graph_models_modal_inputs_are_parameters(name, data_path, inter):
    model = model_for(name, data_path, inter)
    inputs = model.item_modal_inputs()
    assert set(inputs) == {"image", "text"}
    assert model_for("bpr", data_path, inter).item_modal_inputs() == {}     # ID only
    param_ids = {id(p) for p in model.parameters()}
    for m in ("image", "text"):
        t = inputs[m]
        assert isinstance(t, torch.nn.Parameter) and id(t) in param_ids
        np.testing.assert_array_equal(t.detach().numpy(),
                                      np.load(data_path.parent / f"{m}_feat.npy"))


def edges(adj: torch.Tensor) -> set:
    return set(map(tuple, adj.coalesce().indices().T.tolist()))


def coo(adj: torch.Tensor) -> torch.Tensor:
    """The graphs are stored as CSR (for the sparse products); compare them as COO."""
    return adj.to_sparse_coo().coalesce()


def test_freedom_pre_epoch_keeps_twenty_percent_reproducibly(data_path, inter):
    model = model_for("freedom", data_path, inter, "recommender.freedom.dropout=0.8")
    n_edges = inter.csr("train").nnz
    assert n_edges == 720 and model.norm_adj._nnz() == 2 * n_edges
    model.pre_epoch(0, torch.Generator().manual_seed(11))
    first = coo(model.masked_adj)
    # MMRec's int(E * (1 - dropout)): 720 * (1 - 0.8) = 143.99999999999997 -> 143, not 144
    assert first._nnz() == 2 * 143 and abs(143 - 0.2 * n_edges) <= 1
    assert edges(first) <= edges(coo(model.norm_adj))               # a subset of the full graph
    dense = first.to_dense()
    torch.testing.assert_close(dense, dense.T)                 # still symmetric
    idx = first.indices()                                      # renormalised on the kept edges
    deg = torch.bincount(idx[0], minlength=150).double()
    torch.testing.assert_close(first.values().double(), (deg[idx[0]] * deg[idx[1]]).rsqrt())
    model.pre_epoch(1, torch.Generator().manual_seed(11))
    again = coo(model.masked_adj)
    assert torch.equal(again.indices(), first.indices())
    assert torch.equal(again.values(), first.values())
    model.pre_epoch(0, torch.Generator().manual_seed(12))
    other = coo(model.masked_adj)
    assert len(edges(other) ^ edges(first)) > 50                # another seed, another graph
    model = model_for("freedom", data_path, inter, "recommender.freedom.dropout=0.0")
    model.pre_epoch(0, torch.Generator().manual_seed(0))
    assert model.masked_adj._nnz() == model.norm_adj._nnz() == 1440


# ----------------------------------------------------------------------------- features

def test_missing_features_folder_is_a_config_error(data_path, inter, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.features"):
        model_for("vbpr", data_path, inter, f"data.features={tmp_path / 'nope'}")


def test_no_features_next_to_interactions_is_a_config_error(tmp_path):
    src = make_tiny_dataset(tmp_path / "bare")
    for f in ("image_feat.npy", "text_feat.npy"):
        (src.parent / f).unlink()
    c = cfg(src, "recommender.name=freedom")
    with pytest.raises(ConfigError, match=r"data\.features"):
        build_model(c, load_interactions(src, c.data))
    # ID-only models do not need any
    assert build_model(cfg(src, "recommender.name=bpr"), load_interactions(src, c.data))


def test_features_with_wrong_row_count_name_the_file(data_path, inter, tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "text_feat.npy", np.ones((59, 4), np.float32))
    with pytest.raises(InputError) as err:
        model_for("vbpr", data_path, inter, f"data.features={folder}")
    assert err.value.path == str(folder / "text_feat.npy")
    assert str(folder / "text_feat.npy") in str(err.value) and "(60, dim)" in str(err.value)


def write_extract(folder: Path, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir()
    rng = np.random.default_rng(3)
    image = rng.normal(size=(60, 8)).astype(dtype)
    text = rng.normal(size=(60, 6)).astype(dtype)
    present = np.ones(60, bool)
    present[17] = False
    np.save(folder / "image.npy", image)
    np.save(folder / "text.npy", text)
    np.save(folder / "present.npy", present)
    return image, text, present


def check_extract_features(feats, image, text, present):
    assert feats.n_missing == 1
    assert feats.image.dtype == np.float32 and feats.image.shape == (60, 8)
    assert feats.text.shape == (60, 6)
    assert np.all(feats.image[17] == 0) and np.all(feats.text[17] == 0)
    np.testing.assert_array_equal(feats.image[present], image[present].astype(np.float32))
    np.testing.assert_array_equal(feats.text[present], text[present].astype(np.float32))


def test_extract_folder_with_an_absent_item(data_path, inter, tmp_path):
    folder = tmp_path / "extracted"
    image, text, present = write_extract(folder, np.float16)   # extract's default fp16
    check_extract_features(load_item_features(folder, 60), image, text, present)
    model = model_for("vbpr", data_path, inter, f"data.features={folder}")
    assert model.image_features.shape == (60, 8)
    assert model.image_features[17].abs().sum() == 0 and model.text_features[17].abs().sum() == 0
    assert model.image_features[16].abs().sum() > 0
    # data.features wins over MMRec's files next to the interactions
    c = cfg(data_path, f"data.features={folder}")
    feats = resolve_features(c.data, data_path, 60, required=True)
    assert feats.image.shape == (60, 8) and feats.source == str(folder)


def test_extract_folder_fp32_with_an_absent_item(tmp_path):
    """extract.feature_dtype=fp32: the arrays are already float32 (no copy on load)."""
    folder = tmp_path / "extracted32"
    image, text, present = write_extract(folder, np.float32)
    check_extract_features(load_item_features(folder, 60), image, text, present)
    np.testing.assert_array_equal(np.load(folder / "image.npy"), image)   # file untouched


def test_unknown_model_lists_the_names(data_path, inter):
    with pytest.raises(ConfigError) as err:
        model_for("lightgcn", data_path, inter)
    msg = str(err.value)
    assert "recommender.name" in msg and "lightgcn" in msg
    assert "pop, bpr, vbpr, freedom, bm3" in msg


# ----------------------------------------------------------------------------- DeepSpeed config

ALL_DS = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


@pytest.mark.parametrize("cuda", [False, True])
def test_resolve_ds_config_fills_auto(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    for name in ALL_DS:
        ds = resolve_ds_config(name, batch_size=64, world_size=4, lr=0.01, weight_decay=0.25,
                               grad_accum=2, grad_clip=1.0, precision="auto")
        assert ds["zero_optimization"]["stage"] == int(name[4])
        assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
        assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
        params = ds["optimizer"]["params"]
        assert params["lr"] == 0.01 and params["weight_decay"] == 0.25
        offloaded = name.endswith("offload")   # auto: torch's Adam (fused on GPUs), CPUAdam
        assert params["torch_adam"] is not (cuda and offloaded)     # with optimizer offload
        assert params.get("fused") is (True if cuda and not offloaded else None)
        assert ds["bf16"]["enabled"] is cuda and ds["fp16"]["enabled"] is False
        assert "auto" not in json.dumps(ds) and not any(k.startswith("_") for k in ds)
        offload = ds["zero_optimization"].get("offload_optimizer")
        assert (offload is not None) == name.endswith("offload")
        if offload:
            assert offload["device"] == "cpu" and offload["pin_memory"] is cuda
        if name != "zero0":   # the reduce bucket: DeepSpeed's default when the count is unknown
            assert ds["zero_optimization"]["reduce_bucket_size"] == int(5e8)
    # the reduce bucket follows the trainable count (ZeRO allocates it whatever that count is)
    for trainable, bucket in [(4096, 4096), (int(6e8), int(5e8))]:
        ds = resolve_ds_config("zero2", batch_size=8, world_size=1, lr=1e-3, weight_decay=0.0,
                               trainable=trainable)
        assert ds["zero_optimization"]["reduce_bucket_size"] == bucket
    # explicit switches
    ds = resolve_ds_config("zero2", batch_size=8, world_size=1, lr=1e-3, weight_decay=0.0,
                           precision="bf16", adam="deepspeed")
    assert ds["bf16"]["enabled"] and not ds["optimizer"]["params"]["torch_adam"]
    ds = resolve_ds_config("zero2", batch_size=8, world_size=1, lr=1e-3, weight_decay=0.0,
                           precision="fp32", adam="torch")
    assert not ds["bf16"]["enabled"] and ds["optimizer"]["params"]["torch_adam"]


def test_every_ds_config_opens_with_its_command():
    from ptmrec_dist.train.engine import DS_DIR
    files = sorted(DS_DIR.glob("*.json"))
    assert sorted(p.stem for p in files) == sorted(ALL_DS)
    for path in files:
        first_key = next(iter(json.loads(path.read_text())))
        usage = json.loads(path.read_text())["_usage"]
        assert first_key == "_usage" and f"ds_config={path.stem}" in usage, path


def test_fp16_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"stage2\.precision.*fp16"):
        resolve_ds_config("zero2", batch_size=8, world_size=1, lr=1e-3, weight_decay=0.0,
                          precision="fp16", key="stage2")


def test_ds_config_batch_not_multiple_of_ranks_and_unknown_name():
    with pytest.raises(ConfigError, match=r"stage1\.batch_size.*\(65\).*\(2\)"):
        resolve_ds_config("zero0", batch_size=65, world_size=2, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ConfigError, match=r"grad_accum' \(3\)"):
        resolve_ds_config("zero0", batch_size=64, world_size=2, lr=1e-3, weight_decay=0.0,
                          grad_accum=3)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config("zero9", batch_size=64, world_size=1, lr=1e-3, weight_decay=0.0)
    msg = str(err.value)
    assert "zero9" in msg and "zero0, zero1, zero2, zero2_offload, zero3" in msg


def test_ds_config_numbers_that_disagree_with_the_config_name_both(tmp_path):
    path = tmp_path / "mine.json"
    for body, want in (({"gradient_clipping": 0.5}, r"gradient_clipping is 0\.5.*'stage2\.grad_clip' gives 0\.0"),
                       ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}},
                        r"optimizer\.params\.lr is 0\.1.*'stage2\.lr' gives 0\.01"),
                       ({"bf16": {"enabled": True}}, r"bf16\.enabled is True.*'stage2\.precision'"),
                       ({"train_micro_batch_size_per_gpu": 4},
                        r"train_micro_batch_size_per_gpu is 4.*gives 64")):
        path.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=want):
            resolve_ds_config(str(path), batch_size=64, world_size=1, lr=0.01,
                              weight_decay=0.0, key="stage2", precision="fp32")
    # the same values written out agree
    path.write_text(json.dumps({"gradient_clipping": 1, "train_batch_size": 64}))
    ds = resolve_ds_config(str(path), batch_size=64, world_size=1, lr=0.01, weight_decay=0.0,
                           grad_clip=1.0)
    assert ds["gradient_clipping"] == 1


def test_custom_json_unknown_auto_and_fixed_batch_mismatch(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "fp16": {"loss_scale": "auto"}}))
    with pytest.raises(ConfigError, match=r"fp16\.loss_scale"):
        resolve_ds_config(str(path), batch_size=8, world_size=1, lr=1e-3, weight_decay=0.0)
    path.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(ConfigError, match="train_batch_size is 32.*'stage1.batch_size' gives 64"):
        resolve_ds_config(str(path), batch_size=64, world_size=2, lr=1e-3, weight_decay=0.0)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_ds_config(str(path), batch_size=8, world_size=1, lr=1e-3, weight_decay=0.0)


@pytest.mark.parametrize("name, ranks", [("vit-b16", 8), ("vit-l14", 16)])
def test_cluster_recipes_load_and_resolve(name, ranks, monkeypatch):
    """The cluster recipes are valid configs whose DeepSpeed config resolves at their scale
    (on a GPU: bf16 and torch's fused Adam)."""
    from ptmrec_dist.config import load_config
    from ptmrec_dist.train.engine import DS_DIR, stage_ds_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    path = DS_DIR.parent / "configs" / f"{name}.yaml"
    assert f"--config configs/{name}.yaml" in "".join(path.read_text().splitlines()[:6])
    cfg = load_config(path)
    ds = stage_ds_config(cfg.stage2, ranks, "stage2")
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["bf16"]["enabled"]
    params = ds["optimizer"]["params"]
    assert ds["gradient_clipping"] == 1.0 and params["torch_adam"] and params["fused"]
