"""What trains in each encoder layer (read off the meta backbone) and the bytes autograd saves
for one micro batch (docs/plan.md, "Activations")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ptmrec_dist.config import Config

LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
QKV = ("q_proj", "k_proj", "v_proj")
LN_STATS = 8                            # fp32 bytes per token of a layer norm (mean, rstd)


@dataclass
class LayerSpec:
    """What trains in one encoder layer (read off the wrapped meta model)."""

    weights: dict[str, bool]            # Linear name -> its own weight trains
    lora: dict[str, int]                # Linear name -> LoRA rank
    ia3: set[str]                       # Linears whose output IA3 scales
    ln1: bool = False                   # layer_norm1 / layer_norm2 train
    ln2: bool = False
    params: int = 0

    def saves_input(self, name: str) -> bool:
        return self.weights.get(name, False) or name in self.lora

    def adapted(self, names) -> bool:
        return any(self.saves_input(n) or n in self.ia3 for n in names)


@dataclass
class TowerSpec:
    name: str
    layers: list[LayerSpec]
    width: int
    intermediate: int
    heads: int
    tokens: int
    act: str
    input_grad: bool                    # the first layer's input needs a gradient
    pre_ln_trains: bool = False         # vision: embeddings / pre_layrnorm train
    final_ln: bool = True               # a layer norm after the layers sees the tower output
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading the model

def _has_trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _layer_spec(layer) -> LayerSpec:
    linears = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj,
               "v_proj": layer.self_attn.v_proj, "out_proj": layer.self_attn.out_proj,
               "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
    weights, lora, ia3 = {}, {}, set()
    for name, linear in linears.items():
        base = getattr(linear, "base_layer", linear)
        weights[name] = bool(base.weight.requires_grad)
        if hasattr(linear, "lora_A") and len(linear.lora_A):
            lora[name] = int(next(iter(linear.r.values())))
        if hasattr(linear, "ia3_l") and len(linear.ia3_l):
            ia3.add(name)
    return LayerSpec(weights, lora, ia3, ln1=_has_trainable(layer.layer_norm1),
                     ln2=_has_trainable(layer.layer_norm2),
                     params=sum(p.numel() for p in layer.parameters()))


def tower_specs(backbone, cfg: Config) -> list[TowerSpec]:
    clip, stage2 = backbone.clip, cfg.stage2
    prompts = backbone.prompts is not None and stage2.prompt_len > 0 and stage2.prompt_depth > 0
    n_prompt = stage2.prompt_len if prompts else 0
    vision_cfg, text_cfg = clip.config.vision_config, clip.config.text_config
    vision_model, text_model = clip.vision_model, clip.text_model
    vision_pre = _has_trainable(vision_model.embeddings) or \
        _has_trainable(vision_model.pre_layrnorm)
    vision = TowerSpec(
        "vision", [_layer_spec(layer) for layer in vision_model.encoder.layers],
        vision_cfg.hidden_size, vision_cfg.intermediate_size, vision_cfg.num_attention_heads,
        (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + 1 + n_prompt,
        vision_cfg.hidden_act,
        # post_layernorm saves h[:, 0]: a view that keeps the last layer's whole output alive
        input_grad=prompts or vision_pre, pre_ln_trains=vision_pre, final_ln=True,
        extra={"image_size": vision_cfg.image_size, "patch_size": vision_cfg.patch_size})
    text = TowerSpec(
        "text", [_layer_spec(layer) for layer in text_model.encoder.layers],
        text_cfg.hidden_size, text_cfg.intermediate_size, text_cfg.num_attention_heads,
        text_cfg.max_position_embeddings, text_cfg.hidden_act,
        input_grad=prompts or _has_trainable(text_model.embeddings), final_ln=True)
    return [vision, text]


# --------------------------------------------------------------------------- saved tensors

def _layer_saved(tower: TowerSpec, layer: LayerSpec, input_grad: bool, attn: str,
                 act_bytes: int) -> tuple[int, bool]:
    """Bytes per token that autograd saves in one layer whose input needs a gradient iff
    ``input_grad``; and whether its output does."""
    width, mlp, heads, tokens = tower.width, tower.intermediate, tower.heads, tower.tokens
    units = 0.0          # in activation elements
    fp32 = 0             # in bytes
    if input_grad or layer.ln1:
        units += width                                 # ln1 input
        fp32 += LN_STATS
    ln1_out_grad = input_grad or layer.ln1
    if any(layer.saves_input(x) for x in QKV):
        units += width                                 # ln1 output (q/k/v input)
    attn_grad = ln1_out_grad or layer.adapted(QKV)
    if attn_grad:
        units += 3 * width                             # q, k, v
        units += width * len(layer.ia3 & set(QKV))     # IA3's unscaled q/k/v
        if attn == "eager":
            units += heads * tokens                    # attention probabilities
            fp32 += 4 * heads * tokens if act_bytes < 4 else 0   # fp32 softmax before the cast
        else:
            units += width                             # the kernel's output (= out_proj input)
            fp32 += 4 * heads                          # logsumexp
    if layer.saves_input("out_proj") and (attn == "eager" or not attn_grad):
        units += width                                 # out_proj's own copy of its input
    units += width * ("out_proj" in layer.ia3)
    attn_out_grad = attn_grad or layer.adapted(("out_proj",))
    ln2_in_grad = input_grad or attn_out_grad
    units += sum(layer.lora.values())                  # lora_A's outputs
    if ln2_in_grad or layer.ln2:
        units += width                                 # ln2 input
        fp32 += LN_STATS
    if layer.saves_input("fc1"):
        units += width                                 # ln2 output
    fc1_grad = ln2_in_grad or layer.ln2 or layer.adapted(("fc1",))
    if fc1_grad:
        units += mlp * (2 if tower.act == "quick_gelu" else 1)
        if "fc1" in layer.ia3:
            units += mlp
    if layer.saves_input("fc2"):
        units += mlp                                   # activation output
    units += width * ("fc2" in layer.ia3)
    output_grad = ln2_in_grad or fc1_grad or layer.adapted(("fc2",))
    return int(units * act_bytes + fp32), output_grad


def _tower_saved(tower: TowerSpec, micro: int, checkpointing: bool, attn: str,
                 act_bytes: int) -> dict:
    """One tower's saved bytes (whole micro batch), its largest recomputed layer under
    checkpointing, its backward workspace and its detail row."""
    input_grad = tower.input_grad
    per_layer, started = [], False
    for layer in tower.layers:
        started = started or input_grad or layer.ln1 or layer.adapted(LINEARS) or layer.ln2
        if not started:
            per_layer.append(0)
            continue
        nbytes, input_grad = _layer_saved(tower, layer, input_grad, attn, act_bytes)
        per_layer.append(nbytes)
    grad_layers = sum(1 for x in per_layer if x)
    tokens = micro * tower.tokens
    outside = 0                                        # layer norms outside the layers
    if tower.pre_ln_trains:
        outside += tower.width * act_bytes + LN_STATS  # pre_layrnorm input
    if tower.final_ln and input_grad:
        outside += tower.width * act_bytes + LN_STATS  # final_layer_norm input
    recompute = 0
    if checkpointing:
        kept = grad_layers * tower.width * act_bytes + outside
        recompute = tokens * max(per_layer, default=0)
    else:
        kept = sum(per_layer) + outside
    mlp_ws = (3 if tower.act == "quick_gelu" else 2) * tokens * tower.intermediate * act_bytes
    attn_ws = 2 * micro * tower.heads * tower.tokens ** 2 * 4 if attn == "eager" else 0
    detail = {"tokens": tower.tokens, "layers": len(tower.layers),
              "layers_saving": grad_layers, "width": tower.width,
              "intermediate": tower.intermediate, "heads": tower.heads, "act": tower.act,
              "saved_bytes_per_token": kept}
    return {"saved": tokens * kept, "recompute": recompute,
            "workspace": max(mlp_ws, attn_ws), "detail": detail}


def activation_bytes(towers: list[TowerSpec], micro: int, checkpointing: bool, attn: str,
                     act_bytes: int) -> dict:
    """Peak activation bytes of one micro batch (docs/plan.md), with its parts."""
    saved = recompute = workspace = 0
    detail = {}
    for tower in towers:
        part = _tower_saved(tower, micro, checkpointing, attn, act_bytes)
        saved += part["saved"]
        recompute = max(recompute, part["recompute"])
        workspace = max(workspace, part["workspace"])
        detail[tower.name] = part["detail"]
    vision = next(t for t in towers if t.name == "vision")
    size = vision.extra["image_size"]
    text_tokens = next(t for t in towers if t.name == "text").tokens
    pixels = micro * 3 * size * size * (4 + (act_bytes if act_bytes != 4 else 0))
    inputs = pixels + 2 * micro * text_tokens * 8      # + token ids and mask (int64)
    if not any(d["layers_saving"] for d in detail.values()):
        saved = recompute = 0                          # frozen: forward only, nothing kept
    total = inputs + saved + recompute + workspace
    return {"inputs": inputs, "saved": saved, "recompute": recompute, "workspace": workspace,
            "total": total, "towers": detail}


# --------------------------------------------------------------------------- auto checkpointing

AUTO_CKPT_MIN_BYTES = 1 << 30           # below 1 GiB of activations recomputation is not worth it
AUTO_CKPT_DEVICE_SHARE = 0.25           # on a GPU: activations above a quarter of its memory
GIB_F = float(1 << 30)


def auto_checkpointing(towers: list[TowerSpec], micro: int, attn: str, act_bytes: int,
                       device_bytes: int = 0) -> tuple[bool, str]:
    """``stage2.activation_checkpointing: auto``: on when one micro batch's activations without
    checkpointing reach :data:`AUTO_CKPT_MIN_BYTES` (and, with ``device_bytes`` of GPU memory,
    :data:`AUTO_CKPT_DEVICE_SHARE` of it) and checkpointing saves at least a third of them.
    Recomputation costs 40-50 % more step time on CPU (``bench/stage2_cost.py``), so it is only
    chosen where memory is the constraint; the reason, with both estimates, as text."""
    off = activation_bytes(towers, micro, False, attn, act_bytes)["total"]
    on = activation_bytes(towers, micro, True, attn, act_bytes)["total"]
    threshold = max(AUTO_CKPT_MIN_BYTES, AUTO_CKPT_DEVICE_SHARE * device_bytes)
    pays = off >= threshold and on <= off * 2 / 3
    return pays, (f"activation checkpointing auto: {'on' if pays else 'off'} (activations of "
                  f"a micro batch of {micro}: {off / GIB_F:.2f} GiB without, "
                  f"{on / GIB_F:.2f} GiB with; on from {threshold / GIB_F:.2f} GiB when it "
                  "saves a third)")


def resolve_checkpointing(backbone, cfg: Config, world_size: int) -> str | None:
    """Decide ``auto`` for a training run's backbone (``apply_method`` output) and set its
    ``use_checkpoint``; returns the reason (None when the config said true or false). The GPU's
    memory counts where CUDA is; a backbone the planner cannot read (a non-CLIP text tower)
    stays without checkpointing."""
    if cfg.stage2.activation_checkpointing != "auto":
        return None
    import torch

    from ptmrec_dist.plan.zero import DTYPE_BYTES, precision_of, resolve_stage2_ds

    ds = resolve_stage2_ds(cfg, world_size)
    mixed = precision_of(ds) != "fp32"
    act_bytes = 2 if mixed else DTYPE_BYTES[cfg.backbone.dtype]
    device_bytes = (torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
                    if torch.cuda.is_available() else 0)
    try:
        towers = tower_specs(backbone, cfg)
    except (AttributeError, KeyError, TypeError) as exc:
        backbone.use_checkpoint = False
        return f"activation checkpointing auto: off (the planner cannot read this backbone: {exc})"
    pays, why = auto_checkpointing(towers, int(ds["train_micro_batch_size_per_gpu"]),
                                   cfg.backbone.attn_implementation, act_bytes, device_bytes)
    backbone.use_checkpoint = pays
    return why
