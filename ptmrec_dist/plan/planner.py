"""The plan: everything that does not depend on the micro batch built once (:class:`Planner`),
the rows for a micro batch, the largest micro batch that fits, and :func:`estimate`, what
``ptmrec plan`` prints (docs/plan.md, "Total")."""

from __future__ import annotations

from ptmrec_dist.config import Config
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.plan.activations import activation_bytes, auto_checkpointing, tower_specs
from ptmrec_dist.plan.meta import build_meta_backbone
from ptmrec_dist.plan.recommender import (data_sizes, recommender_activation_elems,
                                          recommender_sizes)
from ptmrec_dist.plan.zero import (DTYPE_BYTES, Group, partition, precision_of,
                                   resolve_stage2_ds, zero_buffer_bytes, zero_settings)
from ptmrec_dist.rec.features import modality_names

GIB = 2 ** 30
HEADROOM = 0.10


class Planner:
    """Everything that does not depend on the micro batch, built once; :meth:`at` gives the
    plan for a micro batch."""

    def __init__(self, cfg: Config, world_size: int | None = None, users: int | None = None,
                 items: int | None = None, device_memory_gib: float = 0.0):
        from ptmrec_dist import dist
        self.cfg = cfg
        self.world = world_size if world_size is not None else dist.detect().world_size
        if self.world < 1:
            raise ConfigError(f"--world-size must be >= 1 (got {self.world})")
        self.notes: list[str] = []
        self._resolve_deepspeed()
        self.attn = cfg.backbone.attn_implementation
        # DeepSpeed's bf16/fp16 casts the whole module; activations follow the parameters
        self.param_bytes = 2 if self.mixed else DTYPE_BYTES[cfg.backbone.dtype]
        self.act_bytes = self.param_bytes
        self.backbone = build_meta_backbone(cfg)
        self.towers = tower_specs(self.backbone, cfg)
        self.checkpointing = cfg.stage2.activation_checkpointing is True
        if cfg.stage2.activation_checkpointing == "auto":
            self.checkpointing, why = auto_checkpointing(self.towers, self.micro, self.attn,
                                                         self.act_bytes,
                                                         int(device_memory_gib * GIB))
            self.notes.append(why)
        elif cfg.stage2.activation_checkpointing == "mlp":
            self.notes.append("activation checkpointing mlp: estimated as off (an upper bound; "
                              "recomputing the MLPs saved 22 % of a ViT-B/16 prompt step's "
                              "activations on CPU, docs/scaling.md)")
        self.groups = self._backbone_groups() + self._recommender_groups(users, items)
        self._partition()
        self._closing_notes()

    # ------------------------------------------------------------------ built once
    def _resolve_deepspeed(self) -> None:
        """The resolved DeepSpeed config, its micro batch, ZeRO settings and precision."""
        self.ds = resolve_stage2_ds(self.cfg, self.world)
        self.micro = int(self.ds["train_micro_batch_size_per_gpu"])
        self.zero = zero_settings(self.ds)
        self.precision = precision_of(self.ds)
        self.mixed = self.precision != "fp32"
        if self.cfg.stage2.precision == "auto" and not self.mixed:
            self.notes.append("stage2.precision=auto is fp32 on this machine (no bf16 GPU); "
                              "add stage2.precision=bf16 to plan for GPUs that have bf16")
        opt = str((self.ds.get("optimizer") or {}).get("type", "adam")).lower()
        if "adam" not in opt and "lamb" not in opt:
            self.notes.append(f"optimizer {opt!r} counted as Adam (2 states per parameter)")

    def _backbone_groups(self) -> list[Group]:
        """The backbone's trainable and frozen parameters (with ZeRO-3's persistent ones)."""
        threshold = self.zero["persistence_threshold"]
        params = list(self.backbone.parameters())
        self.counts = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                       "frozen": sum(p.numel() for p in params if not p.requires_grad)}
        self.largest_layer = max(layer.params for tower in self.towers for layer in tower.layers)

        def persistent(requires_grad: bool) -> int:
            return sum(p.numel() for p in params
                       if p.requires_grad == requires_grad and p.numel() < threshold)

        return [Group(self.counts["trainable"], self.param_bytes, True, persistent(True)),
                Group(self.counts["frozen"], self.param_bytes, False, persistent(False))]

    def _recommender_groups(self, users: int | None, items: int | None) -> list[Group]:
        """The recommender's trainable tables (fp32 unless bf16/fp16), and its buffers."""
        self.data = data_sizes(self.cfg, users, items)
        self.rec, self.rec_buffers = None, 0
        self.rec_bytes = 2 if self.mixed else 4
        if self.data is None:
            self.notes.append("recommender left out: set data.path or pass --users and --items")
            return []
        self.rec = recommender_sizes(self.cfg, self.data["n_users"], self.data["n_items"],
                                     self.backbone.clip.config.projection_dim,
                                     self.data["n_interactions"],
                                     modality_names(self.cfg.backbone.modalities))
        self.notes += self.rec["notes"]
        self.rec_buffers = int(self.rec["buffers_bytes"] * self.rec_bytes / 4)
        return [Group(self.rec["trainable"], self.rec_bytes, True, 0)]

    def _partition(self) -> None:
        """ZeRO's split of the groups over the ranks, and DeepSpeed's own buffers."""
        groups = self.groups
        # the reduce bucket's "auto" is the trainable count (as stage 2 resolves it)
        self.ds = resolve_stage2_ds(self.cfg, self.world,
                                    sum(g.numel for g in groups if g.trainable))
        self.zero = zero_settings(self.ds)
        self.rows = partition(groups, self.zero, self.world, self.mixed)
        grad_dtypes = {g.elem_bytes for g in groups if g.trainable and g.numel}
        if self.zero["stage"] == 3:
            total = self.counts["trainable"] + self.counts["frozen"]
            gathered = min(total, int(self.zero["prefetch_bucket_size"])
                           + self.largest_layer) * self.param_bytes
            if self.rec is not None:        # ZeRO-3 gathers the recommender for the forward
                gathered += self.rec["trainable"] * self.rec_bytes
        else:
            gathered = sum(g.numel * g.elem_bytes for g in groups if g.trainable)
        self.zero_buffers = zero_buffer_bytes(self.zero, grad_dtypes, self.world, gathered)

    def _closing_notes(self) -> None:
        if self.zero["offload_optimizer"] == "nvme" or self.zero["offload_param"] == "nvme":
            self.notes.append("nvme offload: the offloaded parts are shown in the host column "
                              "but live on the NVMe device (plus pinned host staging buffers)")
        if self.cfg.stage2.compile:
            self.notes.append("stage2.compile: torch.compile may fuse ops and save fewer "
                              "activations than counted here")
        if self.attn == "sdpa":
            self.notes.append("attention sdpa: a fused kernel keeps no [B, heads, L, L] "
                              "tensor (eager keeps the softmax)")

    # ------------------------------------------------------------------ per micro batch
    def activations(self, micro: int) -> dict:
        act = activation_bytes(self.towers, micro, self.checkpointing, self.attn,
                               self.act_bytes)
        if self.rec is not None:
            act["recommender"] = recommender_activation_elems(self.rec, micro) * self.rec_bytes
            act["total"] += act["recommender"]
        return act

    def at(self, micro: int) -> dict:
        rows = {k: dict(v) for k, v in self.rows.items()}
        act = self.activations(micro)
        rows["activations"] = {"device": act["total"], "host": 0}
        rows["zero_buffers"] = {"device": self.zero_buffers, "host": 0}
        rows["buffers"] = {"device": self.rec_buffers, "host": 0}
        device = {k: v["device"] for k, v in rows.items()}
        fixed = (device["parameters_trainable"] + device["parameters_frozen"]
                 + device["optimizer"] + device["zero_buffers"] + device["buffers"])
        rows["total"] = {"device": fixed + max(device["gradients"], device["activations"]),
                         "host": sum(v["host"] for v in rows.values())}
        upper = fixed + device["gradients"] + device["activations"]
        return {"rows": rows, "activations_detail": act, "upper_bound_device": upper,
                "micro_batch": micro}

    def suggest(self, device_memory_gib: float, limit: int = 1 << 20) -> dict:
        """The largest micro batch whose device total fits ``device_memory_gib`` less
        ``HEADROOM`` (doubling, then bisection)."""
        budget = device_memory_gib * GIB * (1 - HEADROOM)

        def fits(micro: int) -> bool:
            return self.at(micro)["rows"]["total"]["device"] <= budget

        best = 0
        if fits(1):
            lo, hi = 1, 2
            while hi <= limit and fits(hi):
                lo, hi = hi, hi * 2
            hi = min(hi, limit + 1)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            best = lo
        accumulation = int(self.ds.get("gradient_accumulation_steps", 1))
        out = {"device_memory_gib": device_memory_gib, "headroom": HEADROOM,
               "budget_gib": round(budget / GIB, 3), "micro_batch": best,
               "global_batch": best * self.world * accumulation}
        if best:
            out["total_gib"] = round(self.at(best)["rows"]["total"]["device"] / GIB, 3)
        else:
            out["reason"] = "even a micro batch of 1 does not fit"
        return out


def estimate(cfg: Config, world_size: int | None = None, device_memory_gib: float = 80.0,
             users: int | None = None, items: int | None = None) -> dict:
    """The plan as a dict (what ``ptmrec plan --json`` prints); bytes unless named ``_gib``."""
    if device_memory_gib <= 0:
        raise ConfigError(f"--device-memory must be > 0 GiB (got {device_memory_gib})")
    try:
        planner = Planner(cfg, world_size, users, items, device_memory_gib)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    plan = planner.at(planner.micro)
    stage2, rec = cfg.stage2, planner.rec
    plan.update({
        "world_size": planner.world, "method": cfg.peft.method,
        "backbone": cfg.backbone.name_or_path, "precision": planner.precision,
        "attn_implementation": planner.attn,
        "activation_checkpointing": planner.checkpointing,
        "activation_checkpointing_setting": stage2.activation_checkpointing,
        "ds_config": stage2.ds_config, "zero": planner.zero,
        "counts": {"backbone": planner.counts,
                   "recommender": None if rec is None else
                   {"name": rec["name"], "trainable": rec["trainable"], **planner.data}},
        "suggestion": planner.suggest(device_memory_gib), "notes": planner.notes,
    })
    return plan
