"""DeepSpeed's side of the plan: the resolved stage-2 config, its precision, and the ZeRO
arithmetic (what each stage divides by the ranks, what offload moves to the host, Adam's bytes
per parameter, DeepSpeed's own buffers); docs/plan.md, "ZeRO partitioning"."""

from __future__ import annotations

from dataclasses import dataclass

from ptmrec_dist.config import Config

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py)
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "contiguous_gradients": True,
                 "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}
PARTITIONED_ROWS = ("parameters_trainable", "parameters_frozen", "gradients", "optimizer")


def resolve_stage2_ds(cfg: Config, world_size: int, trainable: int | None = None) -> dict:
    """The DeepSpeed config stage 2 would run with (its ``"auto"`` values filled in)."""
    from ptmrec_dist.train.engine import stage_ds_config
    return stage_ds_config(cfg.stage2, world_size, "stage2", trainable=trainable)


def zero_settings(ds: dict) -> dict:
    """The ``zero_optimization`` settings the plan uses, DeepSpeed's defaults filled in."""
    zero_cfg = ds.get("zero_optimization", {}) or {}

    def offload_device(key: str) -> str:
        return str((zero_cfg.get(key) or {}).get("device", "none")).lower()

    def setting(key: str):
        return zero_cfg.get(key, ZERO_DEFAULTS[key])

    stage = int(zero_cfg.get("stage", 0))
    return {"stage": stage, "offload_optimizer": offload_device("offload_optimizer"),
            "offload_param": offload_device("offload_param") if stage == 3 else "none",
            "reduce_bucket_size": float(setting("reduce_bucket_size")),
            "contiguous_gradients": bool(setting("contiguous_gradients")),
            "overlap_comm": bool(zero_cfg.get("overlap_comm", stage == 3)),
            "prefetch_bucket_size": float(setting("stage3_prefetch_bucket_size")),
            "persistence_threshold": float(setting("stage3_param_persistence_threshold"))}


def precision_of(ds: dict) -> str:
    for key in ("bf16", "bfloat16", "fp16"):
        if (ds.get(key) or {}).get("enabled") is True:
            return "fp16" if key == "fp16" else "bf16"
    return "fp32"


@dataclass
class Group:
    """Parameters of one dtype and role: ``numel`` elements of ``elem_bytes`` bytes."""

    numel: int
    elem_bytes: int
    trainable: bool
    persistent: int = 0                 # elements ZeRO-3 keeps whole (small tensors)


def optimizer_bytes_per_param(stage: int, mixed: bool, param_bytes: int, offload: bool) -> int:
    if mixed or stage in (1, 2) or (stage == 3 and (param_bytes != 4 or offload)):
        return 12                       # fp32 master copy + exp_avg + exp_avg_sq
    return 2 * param_bytes              # ZeRO-0 / fp32 ZeRO-3: states in the parameter's dtype


def partition(groups: list[Group], zero: dict, world: int, mixed: bool) -> dict:
    """Per-rank ``{row: {"device": bytes, "host": bytes}}`` for parameters (trainable /
    frozen), gradients and optimizer states under ``zero`` (:func:`zero_settings`)."""
    stage, ranks = zero["stage"], max(world, 1)
    offload_opt = zero["offload_optimizer"] in ("cpu", "nvme")
    offload_params = stage == 3 and zero["offload_param"] in ("cpu", "nvme")
    rows = {k: {"device": 0.0, "host": 0.0} for k in PARTITIONED_ROWS}

    def put(row, nbytes, host):
        rows[row]["host" if host else "device"] += nbytes

    for group in groups:
        row = "parameters_trainable" if group.trainable else "parameters_frozen"
        if stage == 3:
            put(row, group.persistent * group.elem_bytes, False)
            put(row, (group.numel - group.persistent) * group.elem_bytes / ranks, offload_params)
        else:
            put(row, group.numel * group.elem_bytes, False)
        if not group.trainable:
            continue
        grads = group.numel * group.elem_bytes
        if offload_opt and stage >= 1:  # ZeRO-Offload: the reduced partition lives on the host
            put("gradients", group.numel * 4 / ranks, True)
        else:
            put("gradients", grads / ranks if stage >= 2 else grads, False)
        opt_bytes = group.numel * optimizer_bytes_per_param(stage, mixed, group.elem_bytes,
                                                            offload_opt)
        put("optimizer", opt_bytes / ranks if stage >= 1 else opt_bytes, offload_opt)
    for where in rows.values():
        where["device"], where["host"] = int(round(where["device"])), int(round(where["host"]))
    return rows


def zero_buffer_bytes(zero: dict, grad_dtypes: set[int], world: int, gathered: int) -> int:
    """Device bytes of DeepSpeed's own buffers: the reduce bucket(s) (ZeRO >= 1), the flattened
    all-reduce copy (ZeRO-0 on several ranks; ``gathered`` holds the trainable bytes then) and
    ZeRO-3's gathered working set (``gathered``)."""
    stage = zero["stage"]
    if stage == 0:
        return min(gathered, int(5e8) * 4) if world > 1 else 0
    bucket = 0
    if zero["contiguous_gradients"]:
        copies = 2 if zero["overlap_comm"] and stage < 3 else 1
        bucket = sum(int(zero["reduce_bucket_size"]) * grad_bytes
                     for grad_bytes in grad_dtypes) * copies
    return bucket + (gathered if stage == 3 else 0)
