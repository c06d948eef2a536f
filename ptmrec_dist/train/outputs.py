"""What a training run leaves for the next step: the best model's weights and representations
(the teacher of stage 2, what ``ptmrec evaluate`` reads), and stage 2's adapter and features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptmrec_dist import dist
from ptmrec_dist.clip.methods import save_trainable
from ptmrec_dist.io import atomic_save_npy, atomic_save_safetensors, atomic_write_json


def representations(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (users, items) representations, once per evaluation (a full propagation for
    the graph models): scored for valid and test, and saved when best. Under ZeRO-3 the caller
    gathers the parameters first. Always fp32: a bf16 model is scored as `evaluate` scores its
    exported (fp32) representations, so training-time and after-the-fact metrics agree."""
    with torch.no_grad():
        users_r, items_r = model.representations()
        cold = getattr(model, "cold_items", None)
        if cold is not None and len(cold):
            # held-out items are scored by the content branch alone (their ID rows never trained)
            items_r = items_r.clone()
            index = cold.to(items_r.device)
            items_r[index] = model.content_item_representations(index).to(items_r.dtype)
    return users_r.detach().float(), items_r.detach().float()


def mark_cold_items(model, inter) -> None:
    """Let ``model`` score the held-out items of ``data.cold_items`` (``inter.cold_items``) by
    its content branch in :func:`representations`; a ConfigError for a model without one."""
    from ptmrec_dist.errors import ConfigError
    if not inter.has_cold:
        return
    if not getattr(model, "needs_features", False):
        raise ConfigError(f"data.cold_items: {model.name} reads no item features, so it cannot "
                          "score items it never trained on; use vbpr, freedom or bm3")
    model.cold_items = torch.as_tensor(inter.cold_items, dtype=torch.long)


def save_model_and_representations(out: Path, state: dict,
                                   reps: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The best model's weights (``checkpoints/best/model.safetensors``) and representations
    (``user_repr.npy``, ``item_repr.npy``: the teacher of stage 2, what ``evaluate`` reads)."""
    atomic_save_safetensors(out / "checkpoints" / "best" / "model.safetensors",
                            {k: v.detach().cpu() for k, v in state.items()})
    atomic_save_npy(out / "user_repr.npy", reps[0].cpu().float().numpy())
    atomic_save_npy(out / "item_repr.npy", reps[1].cpu().float().numpy())


def save_stage2_best(out: Path, backbone, student, bank: dict, reps, meta: dict,
                     env: dist.DistEnv, feature_dtype: str, gate=None) -> None:
    """Stage 2's best epoch: ``adapter.safetensors`` (the method's trainable weights), the
    student and its representations, ``features/`` (the features the student ranked with, of
    every item, loadable as ``data.features``) and, with ``stage2.feature_gate`` (``gate``, the
    ``FeatureGate``), ``feature_gate.json``: the exact gate values, with which ``extract
    --adapter`` rebuilds those features. Collective: ZeRO-3 gathers on every rank first, then
    the main rank writes."""
    save_trainable(backbone, out / "adapter.safetensors", meta, write=env.is_main)
    with dist.gathered(list(student.parameters())):
        state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    gate_values = None
    if gate is not None:
        with dist.gathered(list(gate.parameters())):
            gate_values = gate.exact_values()
    if not env.is_main:
        return
    save_model_and_representations(out, state, reps)
    if gate_values is not None:
        atomic_write_json(out / "feature_gate.json", gate_values)
    dtype = np.float16 if feature_dtype == "fp16" else np.float32
    for key in ("image", "text"):
        if key not in bank:       # backbone.modalities left it out: no stale file either
            (out / "features" / f"{key}.npy").unlink(missing_ok=True)
            continue
        atomic_save_npy(out / "features" / f"{key}.npy", bank[key].astype(dtype))
    atomic_save_npy(out / "features" / "present.npy", bank["present"])
    atomic_write_json(out / "features" / "meta.json", {**meta, "dtype": feature_dtype})
