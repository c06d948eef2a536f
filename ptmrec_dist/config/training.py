"""Sections for training and evaluation: the recommender (with its per-model settings), the
backbone's PEFT method, stage 1, evaluation, stage 2, process groups and ``ptmrec tune``.

``checks()`` as in :mod:`ptmrec_dist.config.inputs`: ``(key within the section, passed, what
the value must be)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def _metric_ok(metric: str, ks: list[int] | None = None) -> bool:
    """METRIC@K with a known METRIC, and K in ``ks`` (any K when ``ks`` is None)."""
    name, _, k = metric.partition("@")
    return name in ("recall", "ndcg", "precision", "map", "hit") and k.isdigit() \
        and (ks is None or int(k) in ks)


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
    knn: str = "auto"                   # exact | faiss (approximate, IVF) | auto: exact up to
                                        # 100k items, faiss above where it is installed
    knn_nprobe: int = 16                # faiss: inverted lists searched per item
    mm_image_weight: float = 0.1        # image graph weight; text gets 1 - this
    n_mm_layers: int = 1                # propagation layers on the item-item graph
    n_ui_layers: int = 2                # LightGCN layers on the user-item graph
    dropout: float = 0.8                # fraction of user-item edges pruned each epoch
    reg_weight: float = 1e-4            # weight of the modal BPR terms

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("knn_k", self.knn_k >= 1, "must be >= 1"),
            ("knn", self.knn in ("auto", "exact", "faiss"), "must be auto, exact or faiss"),
            ("knn_nprobe", self.knn_nprobe >= 1, "must be >= 1"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("mm_image_weight", 0 <= self.mm_image_weight <= 1, "must be in [0, 1]"),
        ]


@dataclass
class BM3Config:
    n_layers: int = 1                   # LightGCN layers
    dropout: float = 0.3                # dropout of the target views
    reg_weight: float = 0.1             # embedding-norm regulariser
    cl_weight: float = 2.0              # weight of the modal alignment/masking losses

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("dropout", 0 <= self.dropout < 1, "must be in [0, 1)")]


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

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("embedding_dim", self.embedding_dim >= 1, "must be >= 1"),
            ("feat_embed_dim", self.feat_embed_dim >= 1, "must be >= 1"),
            *((f"freedom.{key}", ok, what) for key, ok, what in self.freedom.checks()),
            *((f"bm3.{key}", ok, what) for key, ok, what in self.bm3.checks()),
        ]


@dataclass
class PeftConfig:
    """Parameter-efficient method for the backbone in stage 2."""

    method: Literal["prompt", "lora", "ia3", "full", "frozen"] = "prompt"
    coupled: bool = False               # MaPLe-style text->vision prompt projection
    prompt_init: Literal["random", "teacher"] = "teacher"   # teacher: knowledge-guided
    prompt_std: float = 0.02            # std of random prompt initialisation
    target_modules: list[str] = field(default_factory=list)   # lora, ia3: module names the
                                        # adapters wrap; [] = per family, each model's attention
                                        # query/value (CLIP q_proj/v_proj, BERT query/value, ...;
                                        # clip/methods.py TARGET_MODULES)
    lora_r: int = 8
    lora_alpha: float = 16.0

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("prompt_std", self.prompt_std > 0, "must be > 0"),
            ("lora_r", self.lora_r >= 1, "must be >= 1"),
        ]


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
    adam: Literal["auto", "torch", "deepspeed"] = "auto"   # auto: torch (fused on GPUs); CPUAdam
    #                                     with offload on GPUs; deepspeed: FusedAdam / CPUAdam
    checkpoint_every: int = 5           # epochs between resumable checkpoints (0: only on a stop
                                        # signal); `stage1 --resume` continues from the newest
    sparse_embeddings: bool | Literal["auto"] = "auto"   # bpr/vbpr: sparse gradients for the
    #                                     ID tables and a lazy row-wise Adam (train/sparse_adam.py):
    #                                     per step, work of the batch, not the catalog; not
    #                                     MMRec's dense Adam. auto: on from 100,000 items where
    #                                     it applies (zero0, fp32, no clipping), else off

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("patience", self.patience >= 1, "must be >= 1"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ]


@dataclass
class EvalConfig:
    """Full-ranking evaluation (MMRec protocol)."""

    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    metric: str = "recall@20"           # model selection and early stopping, on valid only
    mask_valid_at_test: bool = False    # MMRec masks only training items at test time
    chunk_users: int = 0                # users scored at once; 0 = from memory_mb
    memory_mb: int = 512                # score-matrix budget per chunk when chunk_users is 0

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("ks", bool(self.ks) and all(k >= 1 for k in self.ks),
             "must be a non-empty list of K >= 1"),
            ("metric", _metric_ok(self.metric, self.ks),
             "must be METRIC@K with METRIC in recall, ndcg, precision, map, hit and K in eval.ks"),
            ("chunk_users", self.chunk_users >= 0, "must be >= 0 (0 = from memory_mb)"),
            ("memory_mb", self.memory_mb >= 1, "must be >= 1"),
        ]


@dataclass
class Stage2Config:
    teacher: str = ""                   # stage-1 run folder; "" = one stage (no teacher, no KT)
    epochs: int = 10
    batch_size: int = 64                # items per step, global (all ranks together)
    lr: float = 0.01                    # backbone's trainable weights (prompts; ~3e-3 for lora,
    #                                     1e-4 for full fine-tuning)
    rec_lr: float = 1e-3                # the recommender's weights
    text_lr: float = 0.0                # per-tower rates for the backbone (0: stage2.lr); the
    vision_lr: float = 0.0              # prompt scales differ ~10x between towers
    weight_decay: float = 0.0
    patience: int = 5                   # epochs without a better valid metric before stopping
    prompt_len: int = 4
    prompt_depth: int = 4               # layers that get (new) prompts, from the first
    kt_weight: float = 10.0             # weight of the in-batch knowledge-transfer KL
    kt_tau: float = 0.5                 # softmax temperature of the KL
    kt_target: Literal["full-content", "full", "content"] = "full-content"   # teacher vs student
    #                                     scores in the KL (docs/stage2.md)
    feature_gate: bool = False          # the student reads ref + g (adapted - ref), g from 0:
    #                                     epoch -1 equals stage 1 exactly (docs/stage2.md)
    grad_norms_every: int = 0           # every N steps, log each loss term's gradient norm on
    #                                     the backbone and the recommender (0: never; ZeRO <= 2)
    passes_per_epoch: int = 1           # item-stream passes per epoch (a stage-2 epoch is one
    #                                     pass over the items by default)
    graph_refresh_every: int = 0        # optimizer steps between rebuilds of what the model
    #                                     derives from the features (freedom's item graph) from
    #                                     the feature bank; 0: at re-extractions only (epoch ends)
    rec_warmup_epochs: int = 0          # first epochs with the recommender frozen (rec lr 0):
    #                                     a prompt-only warm-up
    users_per_item: int = 8             # training users drawn per streamed item (rows of the loss)
    popularity_weighting: bool = True   # weight BPR rows by item degree / mean degree
    activation_checkpointing: bool | Literal["auto", "mlp"] = "auto"   # recompute the encoder
    #                                     layers in backward (true), only their MLPs ("mlp": less
    #                                     memory saved, less recomputed); auto: what the planner
    #                                     says pays (plan.activations.auto_checkpointing)
    num_workers: int = 1                # dataloader workers that decode and preprocess items
    ds_config: str = "zero2"            # zero0..zero3, zero2_offload, zero3_offload or a JSON path
    grad_accum: int = 1                 # micro steps per optimizer step (in-batch sets: per micro)
    grad_clip: float = 0.0              # gradient-norm clipping; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on GPUs with it
    adam: Literal["auto", "torch", "deepspeed"] = "auto"   # auto: torch (fused on GPUs); CPUAdam
    #                                     with offload on GPUs; deepspeed: FusedAdam / CPUAdam
    compile: bool = False               # torch.compile each encoder layer
    warmup_steps: int = 0               # linear lr warm-up over this many optimizer steps
    checkpoint_every: int = 0           # optimizer steps between resumable checkpoints (0: epoch
    #                                     ends only; -1: none); --resume continues the newest
    keep_checkpoints: int = 2           # resumable checkpoints kept (the newest)
    stop_check_every: int = 10          # with several ranks, optimizer steps between their
    #                                     collective check for a stop signal (one all-reduce and,
    #                                     on GPUs, a host sync); one process checks every step

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("prompt_len", self.prompt_len >= 0, "must be >= 0"),
            ("prompt_depth", self.prompt_depth >= 0, "must be >= 0"),
            ("kt_tau", self.kt_tau > 0, "must be > 0"),
            ("kt_weight", self.kt_weight >= 0, "must be >= 0"),
            ("grad_norms_every", self.grad_norms_every >= 0, "must be >= 0 (0: never)"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 2, "must be >= 2 (in-batch negatives)"),
            ("patience", self.patience >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("rec_lr", self.rec_lr >= 0, "must be >= 0"),
            ("text_lr", self.text_lr >= 0, "must be >= 0 (0: stage2.lr)"),
            ("vision_lr", self.vision_lr >= 0, "must be >= 0 (0: stage2.lr)"),
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
            ("users_per_item", self.users_per_item >= 1, "must be >= 1"),
            ("passes_per_epoch", self.passes_per_epoch >= 1, "must be >= 1"),
            ("graph_refresh_every", self.graph_refresh_every >= 0,
             "must be >= 0 (0: at epoch ends only)"),
            ("rec_warmup_epochs", self.rec_warmup_epochs >= 0, "must be >= 0"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("checkpoint_every", self.checkpoint_every >= -1,
             "must be >= 1, 0 (epoch ends only) or -1 (never)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("stop_check_every", self.stop_check_every >= 1, "must be >= 1"),
        ]


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl with CUDA, else gloo
    timeout_s: int = 600                # seconds a collective waits for the other ranks (a
    #                                     rank that died ends the others at once; a hung rank or
    #                                     a lost node after this long)
    deterministic: bool = False         # deterministic kernels (GPU: slower; docs/scaling.md)


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

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            # K must also be in eval.ks; `ptmrec tune` checks that (other commands may
            # narrow eval.ks, e.g. evaluate --dump-topk)
            ("metric", self.metric.startswith("valid/")
             and _metric_ok(self.metric[len("valid/"):]),
             "must be valid/METRIC@K (METRIC@K as eval.metric; the test set never chooses)"),
            ("num_samples", self.num_samples >= 1, "must be >= 1"),
            ("max_concurrent_trials", self.max_concurrent_trials >= 1, "must be >= 1"),
            ("grace_period", self.grace_period >= 1, "must be >= 1"),
            ("reduction_factor", self.reduction_factor >= 2, "must be >= 2"),
            ("max_failures", self.max_failures >= 0, "must be >= 0"),
            ("workers_per_trial", self.workers_per_trial >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("gpus_per_worker", self.gpus_per_worker >= 0, "must be >= 0"),
            ("gpus_per_worker", self.gpus_per_worker <= 1
             or float(self.gpus_per_worker).is_integer(),
             "must be a fraction up to 1 or a whole number (Ray's rule)"),
            ("gpus_per_worker", self.workers_per_trial == 1 or self.gpus_per_worker == 0
             or float(self.gpus_per_worker).is_integer(),
             f"must be 0 or a whole number with tune.workers_per_trial "
             f"{self.workers_per_trial}: a fraction lets Ray put two ranks of one trial on the "
             "same GPU, which nccl refuses (a fraction is for several one-worker trials "
             "sharing a GPU)"),
            ("num_cpus", self.num_cpus >= 0, "must be >= 0 (0 = all)"),
        ]


@dataclass
class LogConfig:
    """What a training run writes besides ``log.jsonl`` (``ptmrec_dist.run.RunDir``)."""
    tensorboard: bool = False           # every numeric field of each epoch record as a scalar
    #                                     in OUT/tensorboard/ (tag: its key path, step: epoch)
