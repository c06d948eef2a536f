"""DeepSpeed engine construction from a file in ``ds_configs/`` with ``"auto"`` values filled
from our config.

``ds_config`` is a name (``zero0``, ``zero1``, ``zero2``, ...: ``ds_configs/NAME.json``) or a path
to a JSON file. ``"auto"`` is resolved for: ``train_batch_size`` (the global batch),
``train_micro_batch_size_per_gpu`` (global / ranks), ``gradient_accumulation_steps`` (1),
``optimizer.params.lr`` / ``weight_decay``, and ``optimizer.params.torch_adam`` (torch's Adam on
CPU, which needs no JIT build; DeepSpeed's fused Adam on GPU). A value left ``"auto"`` that we do
not know is an error naming the key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ptmrec_dist.errors import ConfigError

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


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


def resolve_ds_config(name_or_path: str, *, batch_size: int, world_size: int, lr: float,
                      weight_decay: float, key: str = "stage1") -> dict:
    path = ds_config_path(name_or_path)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if batch_size % world_size:
        raise ConfigError(f"config key '{key}.batch_size' ({batch_size}) must be a multiple of "
                          f"the number of ranks ({world_size})")
    fill = {"train_batch_size": batch_size,
            "train_micro_batch_size_per_gpu": batch_size // world_size,
            "gradient_accumulation_steps": 1}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    params = ds.get("optimizer", {}).get("params", {})
    for k, v in (("lr", lr), ("weight_decay", weight_decay),
                 ("torch_adam", not torch.cuda.is_available())):
        if params.get(k) == "auto":
            params[k] = v
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":   # bf16 only where the hardware has it (never on CPU)
        bf16["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    left = _unresolved(ds)
    if left:
        raise ConfigError(f"{path}: cannot resolve \"auto\" for {', '.join(left)}")
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if ds["train_batch_size"] != micro * gas * world_size:
        raise ConfigError(f"{path}: train_batch_size {ds['train_batch_size']} != micro batch "
                          f"{micro} x accumulation {gas} x ranks {world_size}")
    return ds


def build_engine(module: torch.nn.Module, ds_config: dict, param_groups: list | None = None):
    """``deepspeed.initialize`` over the trainable parameters, or over ``param_groups``
    (``[{"params": [...], "lr": ...}, ...]``); torch.distributed must already be initialised,
    by :func:`ptmrec_dist.dist.init`."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    params = param_groups if param_groups is not None else \
        [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                           config=ds_config)
    return engine


def gathered(params: list):
    """A context in which ZeRO-3-partitioned ``params`` are whole (read-only); a no-op for
    parameters DeepSpeed does not partition."""
    import contextlib
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
