"""One typed dataclass tree for every setting; a YAML file plus ``key=value`` overrides.

Unknown keys and wrong types raise :class:`ConfigError` naming the key (the CLI exits 2).
Every run writes the resolved tree to ``OUT/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ptmrec_dist.errors import ConfigError
from ptmrec_dist.io import atomic_write_text


@dataclass
class DataConfig:
    """Interactions, catalog and shards (used by stats, shard, demo and every stage)."""

    path: str = ""                      # interactions: .inter / .csv file, or a folder holding one
    split: Literal["auto", "x_label", "random", "loo"] = "auto"  # auto: x_label if present, else random
    split_seed: int = 2026
    on_bad_sample: Literal["error", "skip"] = "error"
    catalog: str = ""                   # folder with items.jsonl + images
    shards: str = ""                    # folder with items-*.tar + manifest.json
    features: str = ""                  # item features: `ptmrec extract` output or a folder with
    #                                     MMRec's image_feat.npy/text_feat.npy ("" = next to the
    #                                     interactions file)
    shard_size: int = 1000              # items per shard
    image_size: int = 0                 # shorter image side at shard time; 0 keeps the original
    jpeg_quality: int = 95


@dataclass
class SyntheticConfig:
    """The built-in benchmark generator (``ptmrec make-data synthetic``)."""

    n_items: int = 2000
    n_users: int = 2000
    seed: int = 0
    image_size: int = 64
    min_interactions: int = 5
    mean_interactions: float = 12.0     # mean interactions per user (>= min_interactions)
    temperature: float = 1.0            # softmax choice-model temperature
    popularity_weight: float = 0.5      # weight of log-popularity in the user utility


@dataclass
class BackboneConfig:
    """Vision-language backbone (the extraction issue consumes it)."""

    name_or_path: str = ""              # local folder or hub id resolved through the HF cache
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    text_tower: str = ""                # optional BERT-style text encoder (path or hub id)


@dataclass
class DemoBackboneConfig:
    """The small CLIP that ``ptmrec make-backbone`` pretrains on the generic captions."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    image_size: int = 64
    patch_size: int = 16
    projection_dim: int = 128
    max_text_len: int = 77              # item texts run to ~45 tokens; 32 cut the material word
    epochs: int = 16
    batch_size: int = 64
    lr: float = 5e-4
    holdout: float = 0.1                # fraction of items held out for retrieval accuracy


@dataclass
class ExtractConfig:
    """``ptmrec extract``: frozen-backbone features of every item."""

    batch_size: int = 64
    num_workers: int = 2
    feature_dtype: Literal["fp16", "fp32"] = "fp16"


@dataclass
class BPRConfig:
    reg_weight: float = 0.1             # per-example squared L2 of the batch embeddings (chosen
    #                                     on Baby's valid split from 1e-5..1; bench/stage1.py)


@dataclass
class VBPRConfig:
    reg_weight: float = 0.1             # same form; best on the demo's valid split (1e-5..0.1)


@dataclass
class FreedomConfig:
    knn_k: int = 10                     # neighbours per item in the frozen item-item graph
    mm_image_weight: float = 0.1        # image graph weight; text gets 1 - this
    n_mm_layers: int = 1                # propagation layers on the item-item graph
    n_ui_layers: int = 2                # LightGCN layers on the user-item graph
    dropout: float = 0.8                # fraction of user-item edges pruned each epoch
    reg_weight: float = 1e-4            # weight of the modal BPR terms


@dataclass
class BM3Config:
    n_layers: int = 1                   # LightGCN layers
    dropout: float = 0.3                # dropout of the target views
    reg_weight: float = 0.1             # embedding-norm regulariser
    cl_weight: float = 2.0              # weight of the modal alignment/masking losses


@dataclass
class RecommenderConfig:
    """Base recommender of stage 1: registry name, shared sizes, per-model settings."""

    name: str = "vbpr"                  # pop | bpr | vbpr | freedom | bm3
    embedding_dim: int = 64
    feat_embed_dim: int = 64            # projection size of the modal features
    bpr: BPRConfig = field(default_factory=BPRConfig)
    vbpr: VBPRConfig = field(default_factory=VBPRConfig)
    freedom: FreedomConfig = field(default_factory=FreedomConfig)
    bm3: BM3Config = field(default_factory=BM3Config)


@dataclass
class PeftConfig:
    """Parameter-efficient method for the backbone in stage 2."""

    method: Literal["prompt", "lora", "ia3", "full", "frozen"] = "prompt"
    coupled: bool = False               # MaPLe-style text->vision prompt projection
    prompt_init: Literal["random", "teacher"] = "teacher"   # teacher: knowledge-guided
    prompt_std: float = 0.02            # std of random prompt initialisation
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # lora, ia3
    lora_r: int = 8
    lora_alpha: float = 16.0


@dataclass
class Stage1Config:
    epochs: int = 200
    batch_size: int = 2048              # global (all ranks together); a multiple of the ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20                  # evaluations without a better valid metric before stopping
    eval_every: int = 1                 # epochs between evaluations on valid
    ds_config: str = "zero0"            # a name in ds_configs/ (zero0 ... zero3) or a JSON path
    grad_accum: int = 1                 # micro steps per optimizer step (batch_size stays global)
    grad_clip: float = 0.0              # gradient-norm clipping; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"   # auto: bf16 on GPUs with it
    adam: Literal["auto", "torch", "deepspeed"] = "auto"   # deepspeed: FusedAdam / CPUAdam
    checkpoint_every: int = 5           # epochs between resumable checkpoints (0: only on a stop
                                        # signal); `stage1 --resume` continues from the newest


@dataclass
class EvalConfig:
    """Full-ranking evaluation (MMRec protocol)."""

    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    metric: str = "recall@20"           # model selection and early stopping, on valid only
    mask_valid_at_test: bool = False    # MMRec masks only training items at test time
    chunk_users: int = 0                # users scored at once; 0 = from memory_mb
    memory_mb: int = 512                # score-matrix budget per chunk when chunk_users is 0


@dataclass
class Stage2Config:
    teacher: str = ""                   # stage-1 run folder; "" = one stage (no teacher, no KT)
    epochs: int = 10
    batch_size: int = 64                # items per step, global (all ranks together)
    lr: float = 0.01                    # backbone's trainable weights (prompts; ~3e-3 for lora,
    #                                     1e-4 for full fine-tuning)
    rec_lr: float = 1e-3                # the recommender's weights
    weight_decay: float = 0.0
    patience: int = 5                   # epochs without a better valid metric before stopping
    prompt_len: int = 4
    prompt_depth: int = 4               # layers that get (new) prompts, from the first
    kt_weight: float = 10.0             # weight of the in-batch knowledge-transfer KL
    kt_tau: float = 0.5                 # softmax temperature of the KL
    users_per_item: int = 8             # training users drawn per streamed item (rows of the loss)
    popularity_weighting: bool = True   # weight BPR rows by item degree / mean degree
    activation_checkpointing: bool = False   # recompute the encoder layers in backward
    num_workers: int = 1                # dataloader workers that decode and preprocess items
    ds_config: str = "zero2"            # zero0..zero3, zero2_offload, zero3_offload or a JSON path
    grad_accum: int = 1                 # micro steps per optimizer step (in-batch sets: per micro)
    grad_clip: float = 0.0              # gradient-norm clipping; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on GPUs with it
    adam: Literal["auto", "torch", "deepspeed"] = "auto"   # deepspeed: FusedAdam / CPUAdam
    compile: bool = False               # torch.compile each encoder layer
    warmup_steps: int = 0               # linear lr warm-up over this many optimizer steps
    checkpoint_every: int = 0           # optimizer steps between resumable checkpoints (0: epoch
    #                                     ends only; -1: none); --resume continues the newest
    keep_checkpoints: int = 2           # resumable checkpoints kept (the newest)


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl with CUDA, else gloo
    timeout_s: int = 1800


@dataclass
class TuneConfig:
    """``ptmrec tune``: the search space lives in the sweep file (tuning/*.yaml, ``space:``)."""
    num_samples: int = 8                # trials drawn (grid: repeats of the whole grid)
    max_concurrent_trials: int = 1      # bounded by the CPUs/GPUs a trial needs
    metric: str = "valid/recall@20"     # maximised; valid only (the test set never chooses)
    search: Literal["grid", "random", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"   # asha: stop weak trials at epoch rungs
    grace_period: int = 1               # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = 2           # ASHA: keep the top 1/reduction_factor at each rung
    max_failures: int = 1               # retries of a failed trial (from its last checkpoint)
    workers_per_trial: int = 1          # > 1: Ray Train TorchTrainer, one DeepSpeed rank each
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str = ""                   # Ray cluster: "" starts a local one, "auto" or HOST:PORT
    num_cpus: int = 0                   # the local Ray's CPUs (0: all of this machine's)


@dataclass
class Config:
    seed: int = 2026
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    demo_backbone: DemoBackboneConfig = field(default_factory=DemoBackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    dist: DistConfig = field(default_factory=DistConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def validate(self) -> "Config":
        checks = [
            ("data.shard_size", self.data.shard_size >= 1, "must be >= 1"),
            ("data.image_size", self.data.image_size >= 0, "must be >= 0 (0 keeps the original)"),
            ("data.jpeg_quality", 1 <= self.data.jpeg_quality <= 100, "must be in 1..100"),
            ("synthetic.n_items", self.synthetic.n_items >= 10, "must be >= 10"),
            ("synthetic.n_users", self.synthetic.n_users >= 1, "must be >= 1"),
            ("synthetic.image_size", self.synthetic.image_size >= 16, "must be >= 16"),
            ("synthetic.min_interactions", self.synthetic.min_interactions >= 3, "must be >= 3"),
            ("synthetic.mean_interactions",
             self.synthetic.mean_interactions >= self.synthetic.min_interactions,
             "must be >= synthetic.min_interactions"),
            ("synthetic.min_interactions",
             self.synthetic.min_interactions <= self.synthetic.n_items // 2,
             "must be <= synthetic.n_items / 2"),
            ("synthetic.temperature", self.synthetic.temperature > 0, "must be > 0"),
            ("demo_backbone.width", self.demo_backbone.width % self.demo_backbone.heads == 0,
             "must be a multiple of demo_backbone.heads"),
            ("demo_backbone.image_size",
             self.demo_backbone.image_size % self.demo_backbone.patch_size == 0,
             "must be a multiple of demo_backbone.patch_size"),
            ("demo_backbone.holdout", 0 < self.demo_backbone.holdout < 1, "must be in (0, 1)"),
            ("extract.batch_size", self.extract.batch_size >= 1, "must be >= 1"),
            ("extract.num_workers", self.extract.num_workers >= 0, "must be >= 0"),
            ("stage1.patience", self.stage1.patience >= 1, "must be >= 1"),
            ("stage1.epochs", self.stage1.epochs >= 1, "must be >= 1"),
            ("stage1.batch_size", self.stage1.batch_size >= 1, "must be >= 1"),
            ("stage1.eval_every", self.stage1.eval_every >= 1, "must be >= 1"),
            ("stage1.lr", self.stage1.lr > 0, "must be > 0"),
            ("recommender.embedding_dim", self.recommender.embedding_dim >= 1, "must be >= 1"),
            ("recommender.feat_embed_dim", self.recommender.feat_embed_dim >= 1, "must be >= 1"),
            ("recommender.freedom.knn_k", self.recommender.freedom.knn_k >= 1, "must be >= 1"),
            ("recommender.freedom.dropout", 0 <= self.recommender.freedom.dropout < 1,
             "must be in [0, 1)"),
            ("recommender.freedom.mm_image_weight",
             0 <= self.recommender.freedom.mm_image_weight <= 1, "must be in [0, 1]"),
            ("recommender.bm3.dropout", 0 <= self.recommender.bm3.dropout < 1, "must be in [0, 1)"),
            ("eval.ks", bool(self.eval.ks) and all(k >= 1 for k in self.eval.ks),
             "must be a non-empty list of K >= 1"),
            ("eval.metric", _metric_ok(self.eval.metric, self.eval.ks),
             "must be METRIC@K with METRIC in recall, ndcg, precision, map, hit and K in eval.ks"),
            ("eval.chunk_users", self.eval.chunk_users >= 0, "must be >= 0 (0 = from memory_mb)"),
            ("eval.memory_mb", self.eval.memory_mb >= 1, "must be >= 1"),
            ("stage2.prompt_len", self.stage2.prompt_len >= 0, "must be >= 0"),
            ("stage2.prompt_depth", self.stage2.prompt_depth >= 0, "must be >= 0"),
            ("stage2.kt_tau", self.stage2.kt_tau > 0, "must be > 0"),
            ("stage2.kt_weight", self.stage2.kt_weight >= 0, "must be >= 0"),
            ("stage2.epochs", self.stage2.epochs >= 1, "must be >= 1"),
            ("stage2.batch_size", self.stage2.batch_size >= 2, "must be >= 2 (in-batch negatives)"),
            ("stage2.patience", self.stage2.patience >= 1, "must be >= 1"),
            ("stage2.lr", self.stage2.lr > 0, "must be > 0"),
            ("stage2.rec_lr", self.stage2.rec_lr >= 0, "must be >= 0"),
            ("stage2.num_workers", self.stage2.num_workers >= 0, "must be >= 0"),
            ("stage2.users_per_item", self.stage2.users_per_item >= 1, "must be >= 1"),
            ("stage1.grad_accum", self.stage1.grad_accum >= 1, "must be >= 1"),
            ("stage1.checkpoint_every", self.stage1.checkpoint_every >= 0, "must be >= 0"),
            ("stage2.grad_accum", self.stage2.grad_accum >= 1, "must be >= 1"),
            ("stage1.grad_clip", self.stage1.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("stage2.grad_clip", self.stage2.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("stage2.warmup_steps", self.stage2.warmup_steps >= 0, "must be >= 0"),
            ("stage2.checkpoint_every", self.stage2.checkpoint_every >= -1,
             "must be >= 1, 0 (epoch ends only) or -1 (never)"),
            ("stage2.keep_checkpoints", self.stage2.keep_checkpoints >= 1, "must be >= 1"),
            ("peft.prompt_std", self.peft.prompt_std > 0, "must be > 0"),
            ("peft.lora_r", self.peft.lora_r >= 1, "must be >= 1"),
            # K must also be in eval.ks; `ptmrec tune` checks that (other commands may
            # narrow eval.ks, e.g. evaluate --dump-topk)
            ("tune.metric", self.tune.metric.startswith("valid/")
             and _metric_ok(self.tune.metric[len("valid/"):]),
             "must be valid/METRIC@K (METRIC@K as eval.metric; the test set never chooses)"),
            ("tune.num_samples", self.tune.num_samples >= 1, "must be >= 1"),
            ("tune.max_concurrent_trials", self.tune.max_concurrent_trials >= 1, "must be >= 1"),
            ("tune.grace_period", self.tune.grace_period >= 1, "must be >= 1"),
            ("tune.reduction_factor", self.tune.reduction_factor >= 2, "must be >= 2"),
            ("tune.max_failures", self.tune.max_failures >= 0, "must be >= 0"),
            ("tune.workers_per_trial", self.tune.workers_per_trial >= 1, "must be >= 1"),
            ("tune.cpus_per_worker", self.tune.cpus_per_worker > 0, "must be > 0"),
            ("tune.gpus_per_worker", self.tune.gpus_per_worker >= 0, "must be >= 0"),
            ("tune.num_cpus", self.tune.num_cpus >= 0, "must be >= 0 (0 = all)"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {what} (got {get_key(self, key)!r})")
        return self


def _metric_ok(metric: str, ks: list[int] | None = None) -> bool:
    """METRIC@K with a known METRIC, and K in ``ks`` (any K when ``ks`` is None)."""
    name, _, k = metric.partition("@")
    return name in ("recall", "ndcg", "precision", "map", "hit") and k.isdigit() \
        and (ks is None or int(k) in ks)


# --------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, raw: str | None = None) -> Any:
    """Check ``value`` against ``tp``; ``raw`` is the override's text (taken as-is for str)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, raw)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):     # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and value is not None and not isinstance(value, (list, dict)):
            return raw  # `data.path=2024` is the string "2024"
        raise bad
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, "
                          f"got {data!r}")
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key)
        tp = hints[name]
        kwargs[name] = _build(tp, value, key + ".") if dataclasses.is_dataclass(tp) \
            else _coerce(value, tp, key)
    return cls(**kwargs)


def get_key(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_key(cfg: Config, key: str, raw: str) -> None:
    """Apply one override ``key=raw``; the value is parsed as YAML (``0.5``, ``true``, ``[a, b]``)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _fields(type(obj)):
            raise _unknown(key)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    tp = _hints(type(obj))[parts[-1]]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key '{key}' is a section; set one of its keys, "
                          f"e.g. '{key}.{next(iter(_fields(tp)))}=...'")
    if tp is str:   # paths and names are taken verbatim, never YAML-parsed
        setattr(obj, parts[-1], raw)
        return
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    setattr(obj, parts[-1], _coerce(value, tp, key, raw=raw))


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key, raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: Config | None = None) -> Config:
    """Defaults (or ``base``) <- YAML file <- ``key=value`` overrides; then validated."""
    cfg = base if base is not None else Config()
    if path:
        path = Path(path)
        data = read_yaml(path, "config file")
        merged = merge_dicts(to_dict(cfg), data, path)
        cfg = _build(Config, merged, "")
    for item in overrides:
        set_key(cfg, *parse_override(item))
    return cfg.validate()


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a missing file or bad YAML names the file."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def merge_into(cfg: Config, sections: dict, source: Path | str = "") -> Config:
    """``cfg`` with YAML-like ``sections`` (``{"stage2": {"epochs": 4}}``) merged over it;
    unknown keys and wrong types name ``source``."""
    try:
        return _build(Config, merge_dicts(to_dict(cfg), sections, source), "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def merge_dicts(base: dict, update: Any, source: Path | str = "") -> dict:
    if not isinstance(update, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v, source)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "config.yaml"
    atomic_write_text(path, to_yaml(cfg))
    return path
