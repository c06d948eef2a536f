"""DeepSpeed engine construction from a file in ``ds_configs/`` with ``"auto"`` values filled
from our config, so that no number is written twice.

``ds_config`` is a name (``zero0`` ... ``zero3``, ``zero2_offload``, ``zero3_offload``:
``ds_configs/NAME.json``) or a path to a JSON file. Keys starting with ``_`` are comments (each
file's ``_usage`` is the command that uses it) and are dropped. What ``"auto"`` becomes, from the
stage's section (``stage1`` / ``stage2``) of the experiment config:

=====================================  ===================================================
``train_batch_size``                   ``batch_size`` (global, all ranks and micro steps)
``train_micro_batch_size_per_gpu``     ``batch_size / (ranks x grad_accum)``
``gradient_accumulation_steps``        ``grad_accum``
``gradient_clipping``                  ``grad_clip`` (0 = off)
``optimizer.params.lr`` / ``weight_decay``   ``lr`` / ``weight_decay``
``optimizer.params.torch_adam``        ``adam``: ``torch`` (torch's Adam, no build), ``deepspeed``
                                       (FusedAdam; DeepSpeedCPUAdam with optimizer offload; JIT
                                       built on first use), ``auto`` = torch, except deepspeed
                                       (DeepSpeedCPUAdam) on GPUs with the optimizer offloaded
``optimizer.params.fused``             added (true) on CUDA for torch's Adam when the file sets
                                       neither ``fused`` nor ``foreach`` and the optimizer is not
                                       offloaded (``foreach`` where torch has no fused kernel)
``bf16.enabled`` / ``fp16.enabled``    ``precision``: ``auto`` = bf16 where the GPU has it,
                                       else fp32 (bf16 GEMMs are ~400x slower than fp32 on CPUs
                                       without native bf16); fp16 needs a GPU
``*.pin_memory``                       true where CUDA is
``zero_optimization.reduce_bucket_size``  the number of trainable parameters, at most 5e8
                                       (DeepSpeed's default): ZeRO allocates this bucket (twice
                                       with ``overlap_comm``) every step whatever the trainable
                                       count, 1.86 GiB in bf16 for a few thousand prompt weights
=====================================  ===================================================

A concrete value in the file that disagrees with what the config gives is a
:class:`~ptmrec_dist.errors.ConfigError` (exit 2) naming both; so is a ``"auto"`` we do not know.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ptmrec_dist.errors import ConfigError

# ds_configs/ of the checkout; an installed package carries a copy as ptmrec_dist/ds_configs/
# (pyproject.toml package-dir), which wins where it exists
DS_DIR = next((d for d in (Path(__file__).resolve().parents[1] / "ds_configs",
                           Path(__file__).resolve().parents[2] / "ds_configs") if d.is_dir()),
              Path(__file__).resolve().parents[2] / "ds_configs")


def ds_config_path(name_or_path: str) -> Path:
    if name_or_path.endswith(".json") or "/" in name_or_path:
        path = Path(name_or_path)
    else:
        path = DS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in DS_DIR.glob("*.json"))) or "none found"
        raise ConfigError(f"DeepSpeed config {name_or_path!r} not found ({path}); "
                          f"names in {DS_DIR}: {names}")
    return path


def _unresolved(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _unresolved(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _strip_comments(node):
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if not k.startswith("_")}
    return node


def native_bf16() -> bool:
    """The current GPU computes in bf16 natively (compute capability 8.0+, A100 and later; or
    ROCm). ``torch.cuda.is_bf16_supported()`` alone also counts the emulation on V100 / T4 (a
    bf16 tensor can be made there, and bf16 math runs slowly through fp32);
    ``including_emulation`` exists since torch 2.4, the floor in pyproject.toml."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, key: str = "stage2") -> str:
    """``auto`` -> ``bf16`` on a GPU with native bf16 (:func:`native_bf16`), else ``fp32``;
    ``fp16`` needs CUDA."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"config key '{key}.precision' is fp16, which DeepSpeed runs on GPUs "
                          "only; use fp32 (or bf16) on CPU")
    return precision


def resolve_ds_config(name_or_path: str, *, batch_size: int, world_size: int, lr: float,
                      weight_decay: float, key: str = "stage1", grad_accum: int = 1,
                      grad_clip: float = 0.0, precision: str = "fp32",
                      adam: str = "auto", trainable: int | None = None) -> dict:
    path = ds_config_path(name_or_path)
    try:
        ds = _strip_comments(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if batch_size % (world_size * grad_accum):
        raise ConfigError(f"config key '{key}.batch_size' ({batch_size}) must be a multiple of "
                          f"the number of ranks ({world_size}) x '{key}.grad_accum' "
                          f"({grad_accum})")
    cuda = torch.cuda.is_available()
    precision = resolve_precision(precision, key)
    zero = ds.get("zero_optimization", {})
    offloaded = {k for k in ("offload_optimizer", "offload_param")
                 if isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"}
    offload = bool(offloaded)
    adam = resolve_adam(adam, cuda, "offload_optimizer" in offloaded)
    # (ds key path, value from the config, the config key it comes from)
    fills = [(("train_batch_size",), batch_size, "batch_size"),
             (("train_micro_batch_size_per_gpu",), batch_size // (world_size * grad_accum),
              "batch_size / (ranks x grad_accum)"),
             (("gradient_accumulation_steps",), grad_accum, "grad_accum"),
             (("gradient_clipping",), float(grad_clip), "grad_clip"),
             (("optimizer", "params", "lr"), lr, "lr"),
             (("optimizer", "params", "weight_decay"), weight_decay, "weight_decay"),
             (("optimizer", "params", "torch_adam"), adam == "torch", "adam"),
             (("bf16", "enabled"), precision == "bf16", "precision"),
             (("fp16", "enabled"), precision == "fp16", "precision")]
    for sub in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(sub), dict):
            fills.append((("zero_optimization", sub, "pin_memory"), cuda, "(CUDA available)"))
    if zero.get("reduce_bucket_size") == "auto":   # a number written there is the user's choice
        fills.append((("zero_optimization", "reduce_bucket_size"), reduce_bucket(trainable),
                      "(trainable parameters)"))
    for keys, value, source in fills:
        node = ds
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node = None
                break
            node = node[k]
        if node is None or keys[-1] not in node:
            # absent: a precision the run needs gets its section; the rest keeps DeepSpeed's default
            if keys[-1] == "enabled" and value:
                ds[keys[0]] = {"enabled": True}
            continue
        current = node[keys[-1]]
        if current == "auto":
            node[keys[-1]] = value
        elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                        and float(current) == value):
            where = f"config key '{key}.{source}'" if not source.startswith("(") else source
            raise ConfigError(f"{path}: {'.'.join(keys)} is {current!r} but {where} gives "
                              f"{value!r}: write \"auto\" there (or the same value)")
    left = _unresolved(ds)
    if left:
        raise ConfigError(f"{path}: cannot resolve \"auto\" for {', '.join(left)}")
    params = (ds.get("optimizer") or {}).get("params")
    if cuda and adam == "torch" and "offload_optimizer" not in offloaded \
            and isinstance(params, dict) and params.get("torch_adam") is True \
            and not {"fused", "foreach"} & params.keys():
        params[torch_adam_kernel()] = True      # a choice written in the file is kept
    if offload and adam == "deepspeed" and not cuda:
        logging.getLogger(__name__).info("DeepSpeedCPUAdam is JIT-built on first use (~70 s)")
    return ds


def resolve_adam(adam: str, cuda: bool, offload_optimizer: bool) -> str:
    """``auto`` -> ``torch`` (torch's Adam: nothing to build, fused on CUDA, see
    :func:`torch_adam_kernel`), except ``deepspeed`` on CUDA with the optimizer offloaded to the
    host (ZeRO-Offload needs DeepSpeedCPUAdam there, JIT-built unless prebuilt). DeepSpeed's
    FusedAdam is JIT-built with nvcc on first use (racing on a shared extension dir when many
    ranks start at once), so ``auto`` never picks it; ``adam: deepspeed`` still does. On CPU
    ``auto`` is ``torch``, as before."""
    if adam != "auto":
        return adam
    return "deepspeed" if cuda and offload_optimizer else "torch"


def torch_adam_kernel() -> str:
    """``fused`` where torch has a fused Adam kernel for CUDA tensors (torch 2.4+; also ROCm),
    else ``foreach`` (the multi-tensor kernel)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return "fused" if "cuda" in _get_fused_kernels_supported_devices() else "foreach"
    except (ImportError, AttributeError):
        return "foreach"


def describe_engine(ds: dict | None) -> tuple[str, str]:
    """The precision and the Adam implementation a resolved DeepSpeed config gives (for the
    start-up line); ``None`` (no engine: nothing to train) gives fp32 and none."""
    if ds is None:
        return "fp32", "none (nothing to train)"
    precision = "bf16" if (ds.get("bf16") or {}).get("enabled") else \
        "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32"
    opt = ds.get("optimizer") or {}
    kind = str(opt.get("type", "none"))
    if kind.lower() not in ("adam", "adamw"):
        return precision, kind
    p = opt.get("params") or {}
    if p.get("torch_adam"):
        adam_w = kind.lower() == "adamw" or p.get("adam_w_mode", True)   # DeepSpeed's rule
        kernel = " (fused)" if p.get("fused") else " (foreach)" if p.get("foreach") else ""
        return precision, f"torch.optim.{'AdamW' if adam_w else 'Adam'}{kernel}"
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {})
    if offload.get("device", "none") != "none":
        return precision, "DeepSpeedCPUAdam"
    return precision, "DeepSpeed FusedAdam"


def reduce_bucket(trainable: int | None) -> int:
    """``reduce_bucket_size`` for ``trainable`` parameters: all of them, at most DeepSpeed's
    default 5e8 (also when the count is unknown)."""
    return int(5e8) if trainable is None else int(min(5e8, max(1, trainable)))


def stage_ds_config(stage_cfg, world_size: int, key: str, trainable: int | None = None) -> dict:
    """:func:`resolve_ds_config` for a ``stage1`` / ``stage2`` config section."""
    s = stage_cfg
    return resolve_ds_config(s.ds_config, batch_size=s.batch_size, world_size=world_size,
                             lr=s.lr, weight_decay=s.weight_decay, key=key,
                             grad_accum=s.grad_accum, grad_clip=s.grad_clip,
                             precision=s.precision, adam=s.adam, trainable=trainable)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def warmup_schedule(warmup_steps: int):
    """A linear warm-up of every parameter group's own lr over ``warmup_steps`` optimizer steps
    (then constant), as the callable ``deepspeed.initialize`` takes; None for no warm-up. Its
    state is part of every DeepSpeed checkpoint."""
    if warmup_steps <= 0:
        return None

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    return build


def set_group_lr(engine, index: int, lr: float) -> None:
    """Set one optimizer group's learning rate (``index`` as in the groups given to
    :func:`build_engine`; -1 the last), also as the base rate of a warm-up schedule, which
    would otherwise write its own back at the next step."""
    groups = engine.optimizer.param_groups
    index = index if index >= 0 else len(groups) + index
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and hasattr(scheduler, "lr_lambdas"):   # LambdaLR: lr = base x f
        scheduler.base_lrs[index] = lr
        lr = lr * scheduler.lr_lambdas[index](scheduler.last_epoch)
    groups[index]["lr"] = lr


def build_engine(module: torch.nn.Module, ds_config: dict, param_groups: list | None = None,
                 lr_scheduler=None, optimizer=None):
    """``deepspeed.initialize`` over the trainable parameters, or over ``param_groups``
    (``[{"params": [...], "lr": ...}, ...]``); torch.distributed must already be initialised,
    by :func:`ptmrec_dist.dist.init`. ``optimizer``: a client optimizer over those parameters
    (the config's ``optimizer`` block is then dropped)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    params = param_groups if param_groups is not None else \
        [p for p in module.parameters() if p.requires_grad]
    if optimizer is not None:
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
        params = None
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                           optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    check_cast(engine, ds_config)
    return engine


# the DeepSpeed release whose casting the code was tested against (constraints.txt; pyproject
# admits later 0.19 patch releases); named in the error when a release casts differently
TESTED_DEEPSPEED = "0.19.8"


def check_cast(engine, ds_config: dict) -> None:
    """What the training code relies on from DeepSpeed's casting: with ``bf16``/``fp16``
    enabled the engine holds the module's trainable weights in that dtype (the student casts
    the encoders' features to it, the graph models propagate in fp32 and cast back to it, the
    losses upcast from it); without, in fp32. A release that casts otherwise (autocast in
    place of a cast, say) would train in another precision than the start-up line says: a
    :class:`~ptmrec_dist.errors.TrainingError` naming the release, before the first step."""
    import deepspeed

    want = torch.bfloat16 if (ds_config.get("bf16") or {}).get("enabled") else \
        torch.float16 if (ds_config.get("fp16") or {}).get("enabled") else torch.float32
    found = {getattr(p, "ds_tensor", p).dtype for p in engine.module.parameters()
             if p.requires_grad}
    if found and found != {want}:
        from ptmrec_dist.errors import TrainingError
        raise TrainingError(
            f"DeepSpeed {deepspeed.__version__} left the trainable weights in "
            f"{sorted(str(d) for d in found)} where the config asks for {want} (precision); "
            f"this code is tested with DeepSpeed {TESTED_DEEPSPEED}, which casts the module: "
            "pip install -c constraints.txt deepspeed")

