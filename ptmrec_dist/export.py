"""``ptmrec export RUN --out DIR``: what a finished stage-1 or stage-2 run learnt, in the formats
its users load without ptmrec_dist (docs/stage2.md, "Export").

``DIR`` receives:

* ``user_embeddings.npy`` / ``item_embeddings.npy``: the run's ``user_repr.npy`` /
  ``item_repr.npy`` (scores = users @ items.T), and ``user_ids.json`` / ``item_ids.json``: the
  raw ids in index order (the indices themselves for integer MMRec ``.inter`` data);
* ``recommender/model.safetensors`` (the best epoch's weights, ``checkpoints/best/``) and
  ``recommender/config.json`` (model name, sizes, tensor shapes);
* stage 2 only, the tuned encoders: ``adapter/`` (LoRA / IA3: a peft adapter folder for
  ``PeftModel.from_pretrained`` on the run's CLIPModel; ``text_adapter/`` for a BERT-style
  ``backbone.text_tower``), ``prompts/`` (deep prompts: ``prompts.safetensors`` +
  ``prompt_config.json``, read by :func:`load_prompts`) or ``backbone/`` (+ ``text_tower/``;
  full fine-tuning: HF model folders); nothing for ``frozen``;
* ``config.yaml`` and ``metrics.json`` of the run, ``README.md`` (what each file is and how to
  load it, written from what was exported) and ``export.json`` (the list of files).

A folder that already holds files is refused unless it is an earlier export, whose files are
replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist.errors import InputError
from ptmrec_dist.io import (atomic_save_npy, atomic_save_safetensors, atomic_write_json,
                            atomic_write_text)

MANIFEST = "export.json"
PROMPT_FORMAT = "ptmrec-deep-prompts"
ADAPTER_NAME = "default"          # what ``inject_adapter_in_model`` names the adapter


# --------------------------------------------------------------------------- the run

def _read_run(run: Path):
    """``(config, metrics, stage)`` of a finished run folder, or an InputError naming it."""
    from ptmrec_dist.config import load_config

    if not run.is_dir():
        raise InputError(run, "not a folder: give a finished `ptmrec stage1` or `ptmrec "
                              "stage2` run folder")
    for name in ("config.yaml", "metrics.json", "user_repr.npy", "item_repr.npy"):
        if not (run / name).is_file():
            raise InputError(run, f"not a finished stage-1/stage-2 run folder: {name} is "
                                  "missing (metrics.json is written when a run ends)")
    cfg = load_config(run / "config.yaml")
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(run / "metrics.json", f"not readable JSON: {exc}") from None
    stage = 2 if "method" in metrics or (run / "adapter.safetensors").is_file() else 1
    if stage == 2 and not (run / "adapter.safetensors").is_file():
        raise InputError(run / "adapter.safetensors", "missing: a stage-2 run leaves its "
                                                      "adapter with its best epoch")
    return cfg, metrics, stage


def _prepare_out(out: Path, run: Path) -> None:
    """``out`` empty or new; an earlier export's files (listed in its ``export.json``) are
    removed first, anything else is refused."""
    if out.resolve() == run.resolve():
        raise InputError(out, "the export folder must not be the run folder itself")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / MANIFEST
        if not manifest.is_file():
            raise InputError(out, f"not empty and not an earlier export (no {MANIFEST}): "
                                  "choose a new or empty folder")
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(manifest, "not readable: remove the folder or choose another")
        for rel in [*files, MANIFEST]:
            path = (out / rel).resolve()
            if out.resolve() in path.parents:
                path.unlink(missing_ok=True)
        for folder in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
    out.mkdir(parents=True, exist_ok=True)


def _ids(ids, n: int) -> list:
    """Raw ids in index order; the indices when the data's ids are the indices."""
    return list(range(n)) if ids is None else np.asarray(ids).tolist()


# --------------------------------------------------------------------------- stage-2 encoders

def _parts(backbone, cfg) -> list[dict]:
    """The HF models a peft adapter is written for: CLIP (``clip.`` names), and the BERT-style
    text tower (``text_tower.encoder.``) if there is one."""
    parts = [{"folder": "adapter", "prefix": "clip.", "module": backbone.clip,
              "base": cfg.backbone.name_or_path, "cls": "CLIPModel"}]
    if backbone.text_tower is not None:
        parts.append({"folder": "text_adapter", "prefix": "text_tower.encoder.",
                      "module": backbone.text_tower.encoder, "base": cfg.backbone.text_tower,
                      "cls": "AutoModel"})
    return parts


def _matches(config, names: list[str]) -> set[str]:
    from peft.tuners.tuners_utils import check_target_module_exists
    return {n for n in names if check_target_module_exists(config, n)}


def _target_modules(make_config, module, injected: set[str]):
    """The shortest ``target_modules`` that makes peft wrap exactly ``injected`` (names relative
    to ``module``) on a fresh copy of ``module``: the module names' last parts (``q_proj``), a
    regular expression over the towers, else every full name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
    names = [n for n, _ in module.named_modules()
             if n and not any(n.startswith(w + ".") for w in wrapped)]
    last = sorted({n.rsplit(".", 1)[-1] for n in injected})
    roots = sorted({n.split(".", 1)[0] for n in injected})
    regex = "(?:" + "|".join(roots) + r")\..*\.(?:" + "|".join(last) + ")"
    for targets in (last, regex, sorted(injected)):
        config = make_config(targets)
        if _matches(config, names) == injected:
            return targets, config
    raise InputError(None, f"no peft target_modules select exactly the {len(injected)} "
                           "adapted modules")  # unreachable: full names always do


def _peft_state(tensors: dict, prefix: str) -> dict:
    """The adapter file's names (``clip.X.lora_A.default.weight``) as peft saves them for a
    ``PeftModel`` on the base model (``base_model.model.X.lora_A.weight``)."""
    out = {}
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        parts = [p for p in name[len(prefix):].split(".") if p != ADAPTER_NAME]
        out["base_model.model." + ".".join(parts)] = t.contiguous()
    return out


def _export_peft(run: Path, out: Path, cfg, files: dict) -> list[dict]:
    """LoRA / IA3: one peft adapter folder per base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file, save_file

    from ptmrec_dist.clip.methods import METHODS, load_stage2_encoders

    backbone, _, _ = load_stage2_encoders(run)
    tensors = load_file(str(run / "adapter.safetensors"))
    method = METHODS[cfg.peft.method]()
    written = []
    for part in _parts(backbone, cfg):
        module = part["module"]
        injected = {n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
        if not injected:
            continue
        targets, config = _target_modules(lambda t: method.peft_config(cfg, t), module,
                                          injected)
        config.base_model_name_or_path = part["base"]
        config.inference_mode = True
        folder = out / part["folder"]
        # what peft's own save writes for a model outside its task classes: AutoPeftModel
        # rebuilds the base from base_model_name_or_path with this class
        config.save_pretrained(str(folder), auto_mapping_dict={
            "base_model_class": type(module).__name__,
            "parent_library": type(module).__module__})
        state = _peft_state(tensors, part["prefix"])
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        files[f"{part['folder']}/adapter_config.json"] = \
            f"peft {type(config).__name__} (target_modules, sizes, base model)"
        files[f"{part['folder']}/adapter_model.safetensors"] = \
            f"the {cfg.peft.method} weights, {len(state)} tensors"
        written.append({**{k: part[k] for k in ("folder", "base", "cls")},
                        "targets": targets if isinstance(targets, str) else list(targets),
                        "modules": len(injected), "tensors": len(state)})
    return written


def _export_prompts(run: Path, out: Path, cfg, metrics: dict, files: dict) -> dict:
    """Deep prompts: the run's ``adapter.safetensors`` (metadata included) and the JSON that
    :func:`load_prompts` builds the prompted backbone from."""
    from safetensors import safe_open

    from ptmrec_dist.clip.methods import recorded_backbone_hash

    from ptmrec_dist.config import to_dict

    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "adapter.safetensors", folder / "prompts.safetensors")
    with safe_open(str(folder / "prompts.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("ptmrec", "{}"))
    config = {"format": PROMPT_FORMAT, "version": 1, "method": "prompt",
              "prompt_len": cfg.stage2.prompt_len, "prompt_depth": cfg.stage2.prompt_depth,
              "coupled": cfg.peft.coupled, "modalities": cfg.backbone.modalities,
              "backbone": to_dict(cfg.backbone), "peft": to_dict(cfg.peft),
              "backbone_sha256": recorded_backbone_hash(run), "bf16": bool(metrics.get("bf16")),
              "tensors": shapes, "run_metadata": meta}
    atomic_write_json(folder / "prompt_config.json", config)
    files["prompts/prompts.safetensors"] = f"the deep prompts ({', '.join(shapes)})"
    files["prompts/prompt_config.json"] = "what load_prompts builds them into (backbone, sizes)"
    return {"folder": "prompts", "tensors": shapes}


def load_prompts(folder: str | Path, name_or_path: str | None = None,
                 device: str | torch.device = "cpu"):
    """The prompted backbone of an exported ``prompts/`` folder: the backbone its
    ``prompt_config.json`` names (or ``name_or_path``: the same weights elsewhere; checked
    against the recorded sha256 when the run recorded one), with the prompts loaded, in eval
    mode. It has ``encode_images``, ``encode_texts``, ``preprocess_images`` and ``tokenize``
    (which leaves room for CLIP's text prompts)."""
    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.methods import apply_method, load_trainable
    from ptmrec_dist.config import Config
    from ptmrec_dist.config.loading import merge_into

    folder = Path(folder)
    path = folder / "prompt_config.json"
    if not path.is_file():
        raise InputError(path, "missing: not an exported prompts folder")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(path, f"not readable JSON: {exc}") from None
    if spec.get("format") != PROMPT_FORMAT:
        raise InputError(path, f"format is {spec.get('format')!r}, not {PROMPT_FORMAT!r}")
    backbone_cfg = dict(spec["backbone"])
    if name_or_path:
        backbone_cfg["name_or_path"] = str(name_or_path)
    cfg = merge_into(Config(), {"backbone": backbone_cfg, "peft": spec["peft"],
                                "stage2": {"prompt_len": spec["prompt_len"],
                                           "prompt_depth": spec["prompt_depth"],
                                           "activation_checkpointing": False}}, path)
    frozen = load_backbone(cfg.backbone)
    recorded = spec.get("backbone_sha256")
    if recorded and frozen.weights_hash() != recorded:
        raise InputError(cfg.backbone.name_or_path, "these weights are not the ones the prompts "
                         f"were trained with (the run recorded sha256 {recorded[:12]}...)",
                         field="backbone.name_or_path")
    backbone = apply_method(frozen, cfg)
    if spec.get("bf16"):
        backbone.to(torch.bfloat16)
    load_trainable(backbone, folder / "prompts.safetensors")
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone.to(device).eval()


def _export_full(run: Path, out: Path, cfg, files: dict) -> list[dict]:
    """Full fine-tuning: the tuned models as HF folders (``from_pretrained``)."""
    from ptmrec_dist.clip.methods import load_stage2_encoders

    backbone, _, _ = load_stage2_encoders(run)
    clip = backbone.clip
    state = dict(clip.state_dict())
    # AdaptedBackbone keeps CLIP's 0-dim temperature as a non-persistent buffer: put it back
    state["logit_scale"] = clip.logit_scale.detach().reshape(())
    clip.save_pretrained(str(out / "backbone"), state_dict=state)
    backbone.processor.save_pretrained(str(out / "backbone"))
    written = [{"folder": "backbone", "cls": "CLIPModel", "base": cfg.backbone.name_or_path}]
    if backbone.text_tower is not None:
        backbone.text_tower.encoder.save_pretrained(str(out / "text_tower"))
        backbone.text_tower.tokenizer.save_pretrained(str(out / "text_tower"))
        written.append({"folder": "text_tower", "cls": "AutoModel",
                        "base": cfg.backbone.text_tower})
    for entry in written:
        for path in sorted((out / entry["folder"]).iterdir()):
            files[f"{entry['folder']}/{path.name}"] = \
                f"the fine-tuned {entry['cls']} (HF save_pretrained)"
    return written


# --------------------------------------------------------------------------- the export

def export_run(run: str | Path, out: str | Path) -> dict:
    """Export the finished run folder ``run`` into ``out`` (see the module docstring); returns
    what was written (``files``: path relative to ``out`` -> what it is)."""
    from safetensors import safe_open

    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.eval.evaluate import load_representations

    run, out = Path(run), Path(out)
    cfg, metrics, stage = _read_run(run)
    users_r, items_r = load_representations(run)
    inter = load_interactions(cfg.data.path, cfg.data)
    if users_r.shape[0] != inter.n_users or items_r.shape[0] != inter.n_items:
        raise InputError(run / "user_repr.npy",
                         f"representations are {users_r.shape[0]} users x {items_r.shape[0]} "
                         f"items, the interactions ({cfg.data.path}) {inter.n_users} x "
                         f"{inter.n_items}")
    weights = run / "checkpoints" / "best" / "model.safetensors"
    if not weights.is_file():
        raise InputError(weights, "missing: the run's best model weights")
    _prepare_out(out, run)
    files: dict[str, str] = {}

    atomic_save_npy(out / "user_embeddings.npy", users_r)
    atomic_save_npy(out / "item_embeddings.npy", items_r)
    files["user_embeddings.npy"] = f"float32 [{users_r.shape[0]}, {users_r.shape[1]}]"
    files["item_embeddings.npy"] = f"float32 [{items_r.shape[0]}, {items_r.shape[1]}]"
    atomic_write_json(out / "user_ids.json", _ids(inter.user_ids, inter.n_users))
    atomic_write_json(out / "item_ids.json", _ids(inter.item_ids, inter.n_items))
    kind = "raw ids" if inter.item_ids is not None else "ids (the indices: integer data)"
    files["user_ids.json"] = f"user {kind} in index order"
    files["item_ids.json"] = f"item {kind} in index order"

    with safe_open(str(weights), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    atomic_save_safetensors(out / "recommender" / "model.safetensors", state)
    name = cfg.recommender.name
    own = getattr(cfg.recommender, name, None)
    from ptmrec_dist.config import to_dict
    rec_info = {
        "model": name, "stage": stage, "n_users": inter.n_users, "n_items": inter.n_items,
        "embedding_dim": cfg.recommender.embedding_dim,
        "feat_embed_dim": cfg.recommender.feat_embed_dim,
        "representation_dim": int(users_r.shape[1]),
        "settings": to_dict(own) if own is not None else {},
        "modalities": cfg.backbone.modalities,
        "item_features": str(run.resolve() / "features") if stage == 2
        else (cfg.data.features or None),
        "score": "user_embeddings @ item_embeddings.T",
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in state.items()}}
    atomic_write_json(out / "recommender" / "config.json", rec_info)
    files["recommender/model.safetensors"] = f"{name} weights of the kept epoch, {len(state)} " \
                                             "tensors"
    files["recommender/config.json"] = "model name, sizes, tensor shapes"

    encoders: dict = {}
    method = metrics.get("method", cfg.peft.method) if stage == 2 else None
    if stage == 2:
        if method in ("lora", "ia3"):
            encoders = {"kind": "peft", "parts": _export_peft(run, out, cfg, files)}
        elif method == "prompt":
            encoders = {"kind": "prompts", **_export_prompts(run, out, cfg, metrics, files)}
        elif method == "full":
            encoders = {"kind": "hf", "parts": _export_full(run, out, cfg, files)}
        else:
            encoders = {"kind": "none"}

    if stage == 2 and (run / "feature_gate.json").is_file():
        shutil.copyfile(run / "feature_gate.json", out / "feature_gate.json")
        files["feature_gate.json"] = ("stage2.feature_gate's best-epoch g per modality: the run "
                                      "ranked with ref + g (adapted - ref)")
    shutil.copyfile(run / "config.yaml", out / "config.yaml")
    shutil.copyfile(run / "metrics.json", out / "metrics.json")
    files["config.yaml"] = "the run's resolved configuration"
    files["metrics.json"] = "the run's metrics"
    result = {"run": str(run.resolve()), "stage": stage, "model": name, "method": method,
              "out": str(out), "n_users": inter.n_users, "n_items": inter.n_items,
              "encoders": encoders, "files": files}
    files["README.md"] = "this guide"
    atomic_write_text(out / "README.md", _readme(result, cfg, metrics, rec_info))
    atomic_write_json(out / MANIFEST, result)
    return result


# --------------------------------------------------------------------------- README

def _block(code: str) -> str:
    return f"```python\n{code.strip()}\n```\n"


def _readme(result: dict, cfg, metrics: dict, rec: dict) -> str:
    stage, files = result["stage"], result["files"]
    metric = cfg.eval.metric
    test = (metrics.get("test") or {}).get(metric)
    lines = [f"# Export of a stage-{stage} PTMRec run\n",
             f"Run: `{result['run']}` ({result['model']}"
             + (f", peft.method={result['method']}" if stage == 2 else "")
             + f"; kept epoch {metrics.get('best_epoch')}"
             + (f", test {metric} {test:.4f}" if isinstance(test, float) else "") + ").",
             f"{result['n_users']} users, {result['n_items']} items. Written by "
             "`ptmrec export`; paths below are relative to this folder.\n",
             "## Files\n", "| file | what |", "| --- | --- |"]
    lines += [f"| `{k}` | {v} |" for k, v in files.items()]
    lines.append("")
    lines += ["## User and item embeddings, with their ids\n",
              "Row `i` of `user_embeddings.npy` is the user whose id is `user_ids[i]`, and the "
              "same for items; a user's scores for every item are `user_embeddings[u] @ "
              "item_embeddings.T` (higher is better; the run's evaluation masks the user's "
              "training items first). They are the run's `user_repr.npy` / `item_repr.npy`.\n",
              _block("""
import json
import numpy as np

users = np.load("user_embeddings.npy")          # mmap_mode="r" for large catalogs
items = np.load("item_embeddings.npy")
user_ids = json.load(open("user_ids.json"))
item_ids = json.load(open("item_ids.json"))
scores = users[0] @ items.T
top10 = [item_ids[i] for i in np.argsort(-scores)[:10]]
print(user_ids[0], top10)
""")]
    tensors = ", ".join(f"`{k}` {v['shape']}" for k, v in rec["tensors"].items())
    features = (f" Its item side reads the item features in `{rec['item_features']}` "
                f"(`backbone.modalities`: {rec['modalities']})."
                if rec["item_features"] else "")
    features_override = ', [f"data.features={info[\'item_features\']}"]' if stage == 2 else ""
    code = f"""
import json
from safetensors.torch import load_file

state = load_file("recommender/model.safetensors")
info = json.load(open("recommender/config.json"))
print(info["model"], {{k: tuple(v.shape) for k, v in state.items()}})

# the model itself (ptmrec_dist, on the run's data and features)
from ptmrec_dist.config import load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.train.stage1 import build_model

cfg = load_config("config.yaml"{features_override})
model = build_model(cfg, load_interactions(cfg.data.path, cfg.data))
model.load_state_dict(state)
"""
    lines += ["## Recommender weights\n",
              f"`recommender/model.safetensors` holds the {rec['model']} weights of the kept "
              f"epoch ({tensors or 'no tensors'}); `recommender/config.json` its name and "
              f"sizes.{features} With ptmrec_dist installed, the same model is rebuilt from "
              "the run's configuration (`config.yaml`, whose data paths must still exist):\n",
              _block(code)]
    enc = result["encoders"]
    if stage == 2:
        lines += _readme_encoders(enc, result["method"], cfg, "feature_gate.json" in files)
    return "\n".join(lines) + "\n"


def _readme_encoders(enc: dict, method: str, cfg, has_gate: bool) -> list[str]:
    lines = ["## The tuned encoders\n"]
    if enc["kind"] == "peft":
        for part in enc["parts"]:
            targets = part["targets"] if isinstance(part["targets"], str) else \
                ", ".join(part["targets"][:6]) + (" ..." if len(part["targets"]) > 6 else "")
            if part["cls"] == "CLIPModel":
                load = f"""
import torch
from peft import PeftModel
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

base = CLIPModel.from_pretrained({part['base']!r})
processor = CLIPProcessor.from_pretrained({part['base']!r})
model = PeftModel.from_pretrained(base, "{part['folder']}").eval()
with torch.no_grad():
    pixels = processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
    out = model.get_image_features(pixel_values=pixels)
    image_features = getattr(out, "pooler_output", out)      # [1, projection_dim]
    tokens = processor.tokenizer(["a soft toy"], padding=True, return_tensors="pt")
    out = model.get_text_features(**tokens)
    text_features = getattr(out, "pooler_output", out)
"""
            else:
                load = f"""
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

base = AutoModel.from_pretrained({part['base']!r})
tokenizer = AutoTokenizer.from_pretrained({part['base']!r})
model = PeftModel.from_pretrained(base, "{part['folder']}").eval()
# item text features as the run computed them: the attention-masked mean of the last hidden state
"""
            lines += [f"`{part['folder']}/` is a peft {method.upper()} adapter "
                      f"(`adapter_config.json` + `adapter_model.safetensors`) for the "
                      f"{part['cls']} `{part['base']}` the run was trained from, on "
                      f"{part['modules']} modules (target_modules: {targets}). "
                      "Load it on that base model:\n", _block(load)]
    elif enc["kind"] == "prompts":
        lines += ["`prompts/prompts.safetensors` holds the deep prompts "
                  f"({', '.join(f'`{k}` {v}' for k, v in enc['tensors'].items())}: "
                  "[prompt_depth, prompt_len, width] per tower, or the coupled projections) "
                  "and `prompts/prompt_config.json` the backbone they were trained in and their "
                  "sizes. Deep prompts are not a peft method; ptmrec_dist's loader puts them "
                  "back into the backbone:\n",
                  _block("""
import torch
from PIL import Image
from safetensors.torch import load_file
from ptmrec_dist.export import load_prompts

prompts = load_file("prompts/prompts.safetensors")     # the tensors alone
backbone = load_prompts("prompts")   # load_prompts("prompts", name_or_path=...) if it moved
with torch.no_grad():
    pixels = backbone.preprocess_images([Image.new("RGB", (64, 64))])
    image_features = backbone.encode_images(pixels)
    text_features = backbone.encode_texts(**backbone.tokenize(["a soft toy"]))
""")]
    elif enc["kind"] == "hf":
        for part in enc["parts"]:
            cls = part["cls"]
            proc = "CLIPProcessor" if cls == "CLIPModel" else "AutoTokenizer"
            lines += [f"`{part['folder']}/` is the fully fine-tuned {cls} (from "
                      f"`{part['base']}`), an ordinary HF folder:\n",
                      _block(f"""
from transformers import {cls}, {proc}

model = {cls}.from_pretrained("{part['folder']}").eval()
processor = {proc}.from_pretrained("{part['folder']}")
""")]
    else:
        lines.append(f"peft.method={method}: the backbone was not changed; the frozen one "
                     f"(`{cfg.backbone.name_or_path}`) is the encoder.\n")
    if cfg.stage2.feature_gate and enc["kind"] != "none":
        gate = ("`feature_gate.json` holds its best epoch's `g` per modality, so "
                "`ref + g * (adapted - ref)` with `ref` the frozen backbone's features "
                "(rounded to the run's feature dtype) rebuilds them, as `ptmrec extract "
                "--adapter` does" if has_gate else
                "this run did not save its gate (it predates `feature_gate.json`)")
        lines.append("The run used `stage2.feature_gate`: the features it ranked with were "
                     "`ref + g (adapted - ref)`; these encoders give the adapted ones (g = 1); "
                     f"{gate}.\n")
    return lines


def summary_line(result: dict) -> str:
    """What ``ptmrec export`` prints."""
    return (f"exported the stage-{result['stage']} run {result['run']} "
            f"({len(result['files'])} files) to {result['out']}; see {result['out']}/README.md")


__all__ = ["export_run", "load_prompts", "summary_line"]
