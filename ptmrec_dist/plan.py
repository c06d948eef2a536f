"""``ptmrec plan``: per-rank memory of the stage-2 job a config describes, before running it.

Nothing is loaded or allocated: the backbone is built from its ``config.json`` on the ``meta``
device and wrapped exactly as stage 2 wraps it (``FrozenBackbone`` -> ``apply_method``), so the
parameter counts, which weights train and which modules carry adapters are the real ones. The
rest is arithmetic, per rank, in bytes.

Symbols: ``Nt`` / ``Nf`` trainable / frozen parameters; ``W`` ranks; ``b`` micro batch
(``train_micro_batch_size_per_gpu`` of the resolved DeepSpeed config = stage2.batch_size /
(W x grad_accum)); ``p`` bytes of a parameter (2 when the DeepSpeed config enables bf16/fp16,
which casts the whole module, else ``backbone.dtype``; the recommender is fp32 unless bf16/fp16);
``a`` bytes of an activation (same rule as the backbone's ``p``).

Parameters, gradients, optimizer (Adam)
    parameters ``(Nt + Nf) p``; gradients ``Nt p``; optimizer ``Nt x (8 + 4)``: two fp32 Adam
    states plus an fp32 master copy, which DeepSpeed keeps with bf16/fp16, and also in fp32 under
    ZeRO-1/2 (it clones the partition it updates); plain fp32 ZeRO-0/3 has no copy (``Nt x 2p``
    at ZeRO-0: torch's Adam keeps its states in the parameter's dtype).
ZeRO partitioning (per rank)
    stage 0: nothing; stage 1: optimizer / W; stage 2: optimizer and gradients / W; stage 3:
    parameters too, frozen ones included (tensors under ``stage3_param_persistence_threshold``
    elements stay whole), plus a gathered working set ``min(N, prefetch_bucket + largest layer)``
    and the recommender, which ZeRO-3 gathers for the whole forward.
    ``offload_optimizer.device: cpu`` moves the optimizer states and the reduced gradient
    partition (ZeRO-Offload) to host memory; ``offload_param`` (stage 3) moves the parameter
    partition. ZeRO-1/2/3 also allocate a gradient reduce bucket of ``reduce_bucket_size``
    elements (DeepSpeed's default 5e8: 1.86 GiB in fp32, 0.93 GiB in bf16; our configs' "auto":
    the trainable count, at most 5e8) per gradient dtype, twice with ``overlap_comm``; it is the
    "ZeRO buffers" row (with ZeRO-3's gathered working set).
Activations (what autograd saves, counted per saved tensor; ``L`` tokens, ``D`` width, ``I``
MLP size, ``H`` heads, per encoder layer, ``x b L`` tokens, ``x a`` bytes)
    Only layers at or after the first one that needs gradients save anything: ``prompt``
    from layer 0 (the prompts enter before it), ``full``/``lora``/``ia3`` from layer 0 (every
    layer has trainable weights; in the first, the frozen embeddings' output needs no gradient,
    so its first layer norm saves nothing), ``frozen`` none (forward only). A Linear saves its
    input only when its own weight trains (frozen weights need no input to pass a gradient on).
    Per layer, in units of ``D`` per token:
    ``ln1_in`` (1, if the layer input needs grad or ln1 trains) + ``ln1_out`` (1, if q/k/v train
    or carry LoRA) + ``q, k, v`` (3) + attention output (1, sdpa / flash: shared with out_proj's
    input; eager saves the softmax ``H L`` per token instead, ``+4`` bytes of fp32 softmax under
    bf16, and out_proj's input only if it trains) + ``ln2_in`` (1) + ``ln2_out`` (1, if fc1
    trains) + IA3's unscaled outputs (1 each of q/k/v/out_proj/fc2 it scales); in units of ``I``:
    ``fc1_out`` (2 for quick_gelu, which saves x and sigmoid(x); 1 for gelu) + ``act_out`` (1, if
    fc2 trains) + IA3 on fc1 (1); LoRA adds its rank ``r`` per adapted module; layer norms add
    8 fp32 bytes per token (mean, rstd), sdpa ``4 H`` (logsumexp).
    So per layer: full ``8D + 3I``, prompt ``6D + 2I``, lora on q,v ``7D + 2I + 2r`` (quick_gelu,
    sdpa). Per tower add the input of a layer norm outside the layers that sees a gradient
    (text: final_layer_norm; vision under full: pre_layrnorm). Tokens: vision
    ``(image_size / patch)^2 + 1`` (+ ``prompt_len`` under prompt), text
    ``max_position_embeddings`` (texts are padded to the batch's longest; the plan takes the
    longest possible).
    With ``stage2.activation_checkpointing`` each layer keeps only its input (``D``) and the
    backward recomputes one layer at a time: ``+`` the largest single layer's saved set.
    Workspace: the backward of one layer holds a few gradient tensors of its own:
    ``3 b L I a`` (quick_gelu; ``2`` for gelu), or ``2 b H L^2 x 4`` for eager attention if
    larger. Inputs: pixels ``b 3 S^2`` fp32 (+ a cast copy), token ids and mask ``2 b L`` int64.
    activations = inputs + saved (or checkpointed inputs + one recomputed layer) + workspace.
Recommender (needs n_users / n_items: ``data.path`` or ``--users/--items``)
    trainable tables as stage 2 builds them (vbpr: users ``2d``, items ``d``, item_linear;
    freedom/bm3: users, items, and the per-item feature tables, which are parameters when the
    engine is built), buffers (feature bank, teacher representations, graphs when the number of
    interactions is known), activations roughly ``2 (layers + 2)(U + I) d`` for graph models plus
    the in-batch score matrices. Not measured by the tests (small next to the backbone).
Total (device)
    ``parameters + optimizer + ZeRO buffers + buffers + max(gradients, activations)``: the backward
    frees a layer's saved activations as it produces that layer's gradients, so with uniform
    layers the sum of both is largest at one end (all activations, no gradient yet; or all
    gradients); ``upper_bound`` adds both. Tested against the measured peak of a real CPU step
    (forward + backward + AdamW step) within 30 % (tests/test_plan.py; docs/plan.md).

The micro-batch suggestion is the largest ``b`` whose device total fits ``--device-memory`` less
``HEADROOM`` (10 %: CUDA context, allocator fragmentation, NCCL buffers, kernels' scratch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ptmrec_dist.config import Config
from ptmrec_dist.errors import ConfigError, InputError

GIB = 2 ** 30
HEADROOM = 0.10
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py)
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "contiguous_gradients": True,
                 "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}
ROWS = ("parameters_trainable", "parameters_frozen", "gradients", "optimizer", "activations",
        "zero_buffers", "buffers", "total")
LABELS = {"parameters_trainable": "parameters (trainable)",
          "parameters_frozen": "parameters (frozen)", "gradients": "gradients",
          "optimizer": "optimizer states", "activations": "activations",
          "zero_buffers": "ZeRO buffers", "buffers": "buffers (recommender)", "total": "total"}


# --------------------------------------------------------------------------- the backbone

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


def _has_trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _layer_spec(layer) -> LayerSpec:
    mods = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj,
            "v_proj": layer.self_attn.v_proj, "out_proj": layer.self_attn.out_proj,
            "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
    weights, lora, ia3 = {}, {}, set()
    for name, mod in mods.items():
        base = getattr(mod, "base_layer", mod)
        weights[name] = bool(base.weight.requires_grad)
        if hasattr(mod, "lora_A") and len(mod.lora_A):
            lora[name] = int(next(iter(mod.r.values())))
        if hasattr(mod, "ia3_l") and len(mod.ia3_l):
            ia3.add(name)
    return LayerSpec(weights, lora, ia3, ln1=_has_trainable(layer.layer_norm1),
                     ln2=_has_trainable(layer.layer_norm2),
                     params=sum(p.numel() for p in layer.parameters()))


def build_meta_backbone(cfg: Config):
    """The stage-2 backbone (``apply_method(FrozenBackbone(...))``) on the meta device: real
    shapes and ``requires_grad``, no memory."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from ptmrec_dist.clip.backbone import FrozenBackbone
    from ptmrec_dist.clip.methods import apply_method

    b = cfg.backbone
    if not b.name_or_path:
        raise ConfigError("no backbone: set backbone.name_or_path (a local folder or a hub id) "
                          "to plan stage 2")
    if b.text_tower:
        raise ConfigError("ptmrec plan models CLIP's own text tower; backbone.text_tower "
                          f"({b.text_tower!r}) is not supported by the planner")
    try:
        config = CLIPConfig.from_pretrained(b.name_or_path)
    except (OSError, ValueError) as exc:
        path = Path(b.name_or_path).expanduser()
        if path.exists():
            what = f"cannot read a CLIP config.json in this folder: {str(exc).splitlines()[0]}"
        elif b.name_or_path.startswith(("/", ".", "~")):
            what = "no such folder"
        else:
            what = (f"not a local folder, and not a hub id in the HF cache: "
                    f"{str(exc).splitlines()[0]}")
        raise ConfigError(f"config key 'backbone.name_or_path' ({b.name_or_path!r}): "
                          f"{what}") from None
    with torch.device("meta"):
        clip = CLIPModel(config)
        backbone = apply_method(FrozenBackbone(clip, None, b.name_or_path), cfg)
    return backbone


def tower_specs(backbone, cfg: Config) -> list[TowerSpec]:
    clip, s = backbone.clip, cfg.stage2
    prompts = backbone.prompts is not None and s.prompt_len > 0 and s.prompt_depth > 0
    n_prompt = s.prompt_len if prompts else 0
    vc, tc = clip.config.vision_config, clip.config.text_config
    vm, tm = clip.vision_model, clip.text_model
    vision_pre = _has_trainable(vm.embeddings) or _has_trainable(vm.pre_layrnorm)
    vision = TowerSpec(
        "vision", [_layer_spec(x) for x in vm.encoder.layers], vc.hidden_size,
        vc.intermediate_size, vc.num_attention_heads,
        (vc.image_size // vc.patch_size) ** 2 + 1 + n_prompt, vc.hidden_act,
        # post_layernorm saves h[:, 0]: a view that keeps the last layer's whole output alive
        input_grad=prompts or vision_pre, pre_ln_trains=vision_pre, final_ln=True,
        extra={"image_size": vc.image_size, "patch_size": vc.patch_size})
    text = TowerSpec(
        "text", [_layer_spec(x) for x in tm.encoder.layers], tc.hidden_size,
        tc.intermediate_size, tc.num_attention_heads, tc.max_position_embeddings, tc.hidden_act,
        input_grad=prompts or _has_trainable(tm.embeddings), final_ln=True)
    return [vision, text]


def _layer_saved(t: TowerSpec, ls: LayerSpec, rg: bool, attn: str, a: int) -> tuple[int, bool]:
    """Bytes per token that autograd saves in one layer whose input needs a gradient iff
    ``rg``; and whether its output does."""
    d, i, h, n = t.width, t.intermediate, t.heads, t.tokens
    units = 0.0          # in activation elements
    fp32 = 0             # in bytes
    if rg or ls.ln1:
        units += d                                     # ln1 input
        fp32 += 8                                      # mean, rstd
    ln1_out_rg = rg or ls.ln1
    if any(ls.saves_input(x) for x in ("q_proj", "k_proj", "v_proj")):
        units += d                                     # ln1 output (q/k/v input)
    attn_rg = ln1_out_rg or ls.adapted(("q_proj", "k_proj", "v_proj"))
    if attn_rg:
        units += 3 * d                                 # q, k, v
        units += d * len(ls.ia3 & {"q_proj", "k_proj", "v_proj"})   # IA3's unscaled q/k/v
        if attn == "eager":
            units += h * n                             # attention probabilities
            fp32 += 4 * h * n if a < 4 else 0          # the fp32 softmax before the cast
        else:
            units += d                                 # the kernel's output (= out_proj input)
            fp32 += 4 * h                              # logsumexp
    if ls.saves_input("out_proj") and (attn == "eager" or not attn_rg):
        units += d                                     # out_proj's own copy of its input
    units += d * ("out_proj" in ls.ia3)
    out_rg = attn_rg or ls.adapted(("out_proj",))
    rg2 = rg or out_rg
    units += sum(ls.lora.values())                     # lora_A's outputs
    if rg2 or ls.ln2:
        units += d                                     # ln2 input
        fp32 += 8
    if ls.saves_input("fc1"):
        units += d                                     # ln2 output
    fc1_rg = rg2 or ls.ln2 or ls.adapted(("fc1",))
    if fc1_rg:
        units += i * (2 if t.act == "quick_gelu" else 1)
        if "fc1" in ls.ia3:
            units += i
    if ls.saves_input("fc2"):
        units += i                                     # activation output
    units += d * ("fc2" in ls.ia3)
    out = rg2 or fc1_rg or ls.adapted(("fc2",))
    return int(units * a + fp32), out


def activation_bytes(towers: list[TowerSpec], micro: int, checkpointing: bool, attn: str,
                     a: int) -> dict:
    """Peak activation bytes of one micro batch (see the module doc), with its parts."""
    saved = recompute = workspace = 0
    detail = {}
    for t in towers:
        rg = t.input_grad
        per_layer, started = [], False
        for ls in t.layers:
            started = started or rg or ls.ln1 or ls.adapted(LINEARS) or ls.ln2
            if not started:
                per_layer.append(0)
                continue
            nbytes, rg = _layer_saved(t, ls, rg, attn, a)
            per_layer.append(nbytes)
        grad_layers = sum(1 for x in per_layer if x)
        tokens = micro * t.tokens
        extra = 0
        if t.pre_ln_trains:
            extra += t.width * a + 8                   # pre_layrnorm input
        if t.final_ln and rg:
            extra += t.width * a + 8                   # final_layer_norm input
        if checkpointing:
            kept = grad_layers * t.width * a + extra
            saved += tokens * kept
            recompute = max(recompute, tokens * max(per_layer, default=0))
        else:
            kept = sum(per_layer) + extra
            saved += tokens * kept
        mlp_ws = (3 if t.act == "quick_gelu" else 2) * tokens * t.intermediate * a
        attn_ws = 2 * micro * t.heads * t.tokens ** 2 * 4 if attn == "eager" else 0
        workspace = max(workspace, mlp_ws, attn_ws)
        detail[t.name] = {"tokens": t.tokens, "layers": len(t.layers),
                          "layers_saving": grad_layers, "width": t.width,
                          "intermediate": t.intermediate, "heads": t.heads, "act": t.act,
                          "saved_bytes_per_token": kept}
    v = next(t for t in towers if t.name == "vision")
    size = v.extra["image_size"]
    text_tokens = next(t for t in towers if t.name == "text").tokens
    inputs = micro * 3 * size * size * (4 + (a if a != 4 else 0)) + 2 * micro * text_tokens * 8
    if not any(d["layers_saving"] for d in detail.values()):
        saved = recompute = 0                          # frozen: forward only, nothing kept
    total = inputs + saved + recompute + workspace
    return {"inputs": inputs, "saved": saved, "recompute": recompute, "workspace": workspace,
            "total": total, "towers": detail}


# --------------------------------------------------------------------------- the recommender

def data_sizes(cfg: Config, users: int | None = None, items: int | None = None) -> dict | None:
    """``n_users``, ``n_items`` (and ``n_interactions``) from ``data.path`` (parsed, not split)
    or the given numbers; None when neither is there."""
    if cfg.data.path:
        from ptmrec_dist.data.interactions import _parse, find_interactions_file
        path = find_interactions_file(cfg.data.path)
        p = _parse(path)
        return {"n_users": p.n_users, "n_items": p.n_items, "n_interactions": p.raw_rows,
                "source": str(path)}
    if users is not None and items is not None:
        if users < 1 or items < 1:
            raise ConfigError(f"--users and --items must be >= 1 (got {users}, {items})")
        return {"n_users": users, "n_items": items, "n_interactions": None,
                "source": "--users/--items"}
    if (users is None) != (items is None):
        raise ConfigError("pass both --users and --items (or set data.path)")
    return None


def recommender_sizes(cfg: Config, n_users: int, n_items: int, feature_dim: int,
                      n_interactions: int | None = None, modalities=("image", "text")) -> dict:
    """Sizes of the stage-2 student on image and text features of ``feature_dim`` (the
    backbone's projection size, as stage 2 requires): ``trainable`` elements (the parameters the
    engine gets), ``buffers_bytes`` (fp32) and what its activations depend on."""
    from ptmrec_dist import rec

    r = cfg.recommender
    name = r.name
    cls = rec.model_class(name)
    if not cls.needs_features:
        raise ConfigError(f"recommender.name={name} uses no item features: stage 2 adapts the "
                          "backbone that produces them (use vbpr, freedom or bm3)")
    d, f, m = r.embedding_dim, r.feat_embed_dim, len(modalities)
    u, i, p = n_users, n_items, feature_dim
    e = n_interactions
    buffers, graph_layers, notes = 0, 0, []
    bank = i * m * p * 4
    if name == "vbpr":
        trainable = u * 2 * d + i * d + m * p * d + d
        buffers += bank                                   # <m>_features (the feature bank)
        rep = 2 * d
    elif name == "freedom":
        trainable = u * d + i * d + m * (i * p + p * f + f)
        buffers += bank
        c = r.freedom
        graph_layers = c.n_ui_layers
        if e is not None:
            def csr(nnz, rows):                        # fp32 values, int64 columns and rows
                return nnz * 12 + (rows + 1) * 8
            buffers += csr(2 * e, u + i) + csr(int(2 * e * (1 - c.dropout)), u + i)
            buffers += e * (8 + 8 + 4)                     # edge_users, edge_items, edge_w
            buffers += 2 * csr(i * c.knn_k, i)             # mm_adj, mm_adj_t
        rep = d
    elif name == "bm3":
        trainable = u * d + i * d + d * d + d + m * (i * p + p * f + f)
        buffers += bank
        graph_layers = r.bm3.n_layers
        if e is not None:
            buffers += 2 * e * 12 + (u + i + 1) * 8
        rep = d
    else:   # a model registered later
        raise ConfigError(f"ptmrec plan does not know the sizes of recommender.name={name}")
    if graph_layers and e is None:
        notes.append("the recommender's graphs are not counted (the number of interactions "
                     "needs data.path)")
    if cfg.stage2.teacher:
        buffers += (u + i) * rep * 4                       # teacher_users / teacher_items
    fixed_act = 2 * (graph_layers + 2) * (u + i) * d if graph_layers else 0
    per_item = cfg.stage2.users_per_item
    return {"name": name, "trainable": trainable, "buffers_bytes": buffers,
            "act_fixed": fixed_act, "act_rows_per_item": per_item, "notes": notes}


def _rec_activation_elems(rs: dict, micro: int) -> int:
    rows = micro * rs["act_rows_per_item"]
    return rs["act_fixed"] + 8 * rows * micro           # in-batch score matrices [R, B]


# --------------------------------------------------------------------------- ZeRO arithmetic

def zero_settings(ds: dict) -> dict:
    z = ds.get("zero_optimization", {}) or {}
    dev = (lambda k: str((z.get(k) or {}).get("device", "none")).lower())
    stage = int(z.get("stage", 0))
    return {"stage": stage, "offload_optimizer": dev("offload_optimizer"),
            "offload_param": dev("offload_param") if stage == 3 else "none",
            "reduce_bucket_size": float(z.get("reduce_bucket_size",
                                              ZERO_DEFAULTS["reduce_bucket_size"])),
            "contiguous_gradients": bool(z.get("contiguous_gradients",
                                               ZERO_DEFAULTS["contiguous_gradients"])),
            "overlap_comm": bool(z.get("overlap_comm", stage == 3)),
            "prefetch_bucket_size": float(z.get("stage3_prefetch_bucket_size",
                                                ZERO_DEFAULTS["stage3_prefetch_bucket_size"])),
            "persistence_threshold": float(z.get(
                "stage3_param_persistence_threshold",
                ZERO_DEFAULTS["stage3_param_persistence_threshold"]))}


def precision_of(ds: dict) -> str:
    for key in ("bf16", "bfloat16", "fp16"):
        if (ds.get(key) or {}).get("enabled") is True:
            return "fp16" if key == "fp16" else "bf16"
    return "fp32"


@dataclass
class Group:
    """Parameters of one dtype and role: ``n`` elements of ``p`` bytes."""

    n: int
    p: int
    trainable: bool
    persistent: int = 0                 # elements ZeRO-3 keeps whole (small tensors)


def optimizer_bytes_per_param(stage: int, mixed: bool, p: int, offload: bool) -> int:
    if mixed or stage in (1, 2) or (stage == 3 and (p != 4 or offload)):
        return 12                       # fp32 master copy + exp_avg + exp_avg_sq
    return 2 * p                        # ZeRO-0 / fp32 ZeRO-3: states in the parameter's dtype


def partition(groups: list[Group], zero: dict, world: int, mixed: bool) -> dict:
    """Per-rank ``{row: {"device": bytes, "host": bytes}}`` for parameters (trainable /
    frozen), gradients and optimizer states under ``zero`` (:func:`zero_settings`)."""
    stage, w = zero["stage"], max(world, 1)
    off_opt = zero["offload_optimizer"] in ("cpu", "nvme")
    off_par = stage == 3 and zero["offload_param"] in ("cpu", "nvme")
    rows = {k: {"device": 0.0, "host": 0.0}
            for k in ("parameters_trainable", "parameters_frozen", "gradients", "optimizer")}

    def put(row, nbytes, host):
        where = "host" if host else "device"
        rows[row][where] += nbytes

    for g in groups:
        row = "parameters_trainable" if g.trainable else "parameters_frozen"
        if stage == 3:
            whole = g.persistent * g.p
            put(row, whole, False)
            put(row, (g.n - g.persistent) * g.p / w, off_par)
        else:
            put(row, g.n * g.p, False)
        if not g.trainable:
            continue
        grads = g.n * g.p
        if off_opt and stage >= 1:      # ZeRO-Offload: the reduced partition lives on the host
            put("gradients", g.n * 4 / w, True)
        else:
            put("gradients", grads / w if stage >= 2 else grads, False)
        opt = g.n * optimizer_bytes_per_param(stage, mixed, g.p, off_opt)
        put("optimizer", opt / w if stage >= 1 else opt, off_opt)
    for v in rows.values():
        v["device"], v["host"] = int(round(v["device"])), int(round(v["host"]))
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
        bucket = sum(int(zero["reduce_bucket_size"]) * g for g in grad_dtypes) * copies
    return bucket + (gathered if stage == 3 else 0)


# --------------------------------------------------------------------------- the plan

def resolve_stage2_ds(cfg: Config, world_size: int, trainable: int | None = None) -> dict:
    from ptmrec_dist.train.engine import stage_ds_config
    return stage_ds_config(cfg.stage2, world_size, "stage2", trainable=trainable)


class Planner:
    """Everything that does not depend on the micro batch, built once; :meth:`at` gives the
    plan for a micro batch."""

    def __init__(self, cfg: Config, world_size: int | None = None, users: int | None = None,
                 items: int | None = None):
        from ptmrec_dist import dist
        self.cfg = cfg
        self.world = world_size if world_size is not None else dist.detect().world_size
        if self.world < 1:
            raise ConfigError(f"--world-size must be >= 1 (got {self.world})")
        self.notes: list[str] = []
        self.ds = resolve_stage2_ds(cfg, self.world)
        self.micro = int(self.ds["train_micro_batch_size_per_gpu"])
        self.zero = zero_settings(self.ds)
        self.precision = precision_of(self.ds)
        self.mixed = self.precision != "fp32"
        if cfg.stage2.precision == "auto" and not self.mixed:
            self.notes.append("stage2.precision=auto is fp32 on this machine (no bf16 GPU); "
                              "add stage2.precision=bf16 to plan for GPUs that have bf16")
        opt = str((self.ds.get("optimizer") or {}).get("type", "adam")).lower()
        if "adam" not in opt and "lamb" not in opt:
            self.notes.append(f"optimizer {opt!r} counted as Adam (2 states per parameter)")
        self.attn = cfg.backbone.attn_implementation
        self.a = 2 if self.mixed else DTYPE_BYTES[cfg.backbone.dtype]
        bb = build_meta_backbone(cfg)
        self.backbone = bb
        self.towers = tower_specs(bb, cfg)
        thr = self.zero["persistence_threshold"]
        params = list(bb.parameters())
        self.counts = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                       "frozen": sum(p.numel() for p in params if not p.requires_grad)}
        self.largest_layer = max(x.params for t in self.towers for x in t.layers)
        pb = self.a
        groups = [Group(self.counts["trainable"], pb, True,
                        sum(p.numel() for p in params if p.requires_grad and p.numel() < thr)),
                  Group(self.counts["frozen"], pb, False,
                        sum(p.numel() for p in params if not p.requires_grad and p.numel() < thr))]
        # the recommender
        self.data = data_sizes(cfg, users, items)
        self.rec, self.rec_buffers = None, 0
        rb = 2 if self.mixed else 4
        if self.data is None:
            self.notes.append("recommender left out: set data.path or pass --users and --items")
        else:
            self.rec = recommender_sizes(cfg, self.data["n_users"], self.data["n_items"],
                                         bb.clip.config.projection_dim,
                                         self.data["n_interactions"])
            self.notes += self.rec["notes"]
            n = self.rec["trainable"]
            groups.append(Group(n, rb, True, 0))
            self.rec_buffers = int(self.rec["buffers_bytes"] * rb / 4)
        self.rb = rb
        self.groups = groups
        # the reduce bucket's "auto" is the trainable count (as stage 2 resolves it)
        self.ds = resolve_stage2_ds(cfg, self.world, sum(g.n for g in groups if g.trainable))
        self.zero = zero_settings(self.ds)
        self.rows = partition(groups, self.zero, self.world, self.mixed)
        grad_dtypes = {g.p for g in groups if g.trainable and g.n}
        if self.zero["stage"] == 3:
            total = self.counts["trainable"] + self.counts["frozen"]
            gathered = min(total, int(self.zero["prefetch_bucket_size"]) + self.largest_layer) * pb
            if self.rec is not None:
                gathered += self.rec["trainable"] * rb
        else:
            gathered = sum(g.n * g.p for g in groups if g.trainable)
        self.zero_buffers = zero_buffer_bytes(self.zero, grad_dtypes, self.world, gathered)
        if self.zero["offload_optimizer"] == "nvme" or self.zero["offload_param"] == "nvme":
            self.notes.append("nvme offload: the offloaded parts are shown in the host column "
                              "but live on the NVMe device (plus pinned host staging buffers)")
        if cfg.stage2.compile:
            self.notes.append("stage2.compile: torch.compile may fuse ops and save fewer "
                              "activations than counted here")
        if self.attn == "sdpa":
            self.notes.append("attention sdpa: a fused kernel keeps no [B, heads, L, L] "
                              "tensor (eager keeps the softmax)")

    def activations(self, micro: int) -> dict:
        act = activation_bytes(self.towers, micro, self.cfg.stage2.activation_checkpointing,
                               self.attn, self.a)
        if self.rec is not None:
            act["recommender"] = _rec_activation_elems(self.rec, micro) * self.rb
            act["total"] += act["recommender"]
        return act

    def at(self, micro: int) -> dict:
        rows = {k: dict(v) for k, v in self.rows.items()}
        act = self.activations(micro)
        rows["activations"] = {"device": act["total"], "host": 0}
        rows["zero_buffers"] = {"device": self.zero_buffers, "host": 0}
        rows["buffers"] = {"device": self.rec_buffers, "host": 0}
        dev = {k: v["device"] for k, v in rows.items()}
        fixed = (dev["parameters_trainable"] + dev["parameters_frozen"] + dev["optimizer"]
                 + dev["zero_buffers"] + dev["buffers"])
        rows["total"] = {"device": fixed + max(dev["gradients"], dev["activations"]),
                         "host": sum(v["host"] for v in rows.values())}
        upper = fixed + dev["gradients"] + dev["activations"]
        return {"rows": rows, "activations_detail": act, "upper_bound_device": upper,
                "micro_batch": micro}

    def suggest(self, device_memory_gib: float, limit: int = 1 << 20) -> dict:
        budget = device_memory_gib * GIB * (1 - HEADROOM)
        fits = (lambda b: self.at(b)["rows"]["total"]["device"] <= budget)
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
        out = {"device_memory_gib": device_memory_gib, "headroom": HEADROOM,
               "budget_gib": round(budget / GIB, 3), "micro_batch": best,
               "global_batch": best * self.world * int(self.ds.get("gradient_accumulation_steps",
                                                                   1))}
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
        pl = Planner(cfg, world_size, users, items)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    plan = pl.at(pl.micro)
    s = cfg.stage2
    plan.update({
        "world_size": pl.world, "method": cfg.peft.method, "backbone": cfg.backbone.name_or_path,
        "precision": pl.precision, "attn_implementation": pl.attn,
        "activation_checkpointing": s.activation_checkpointing,
        "ds_config": s.ds_config, "zero": pl.zero,
        "counts": {"backbone": pl.counts,
                   "recommender": None if pl.rec is None else
                   {"name": pl.rec["name"], "trainable": pl.rec["trainable"], **pl.data}},
        "suggestion": pl.suggest(device_memory_gib), "notes": pl.notes,
    })
    return plan


def _gib(x: float) -> str:
    return f"{x / GIB:10.3f}"


def format_plan(plan: dict) -> str:
    z, c = plan["zero"], plan["counts"]
    off = [f"{k.split('_')[1]}->{z[k]}" for k in ("offload_optimizer", "offload_param")
           if z[k] != "none"]
    bb = c["backbone"]
    act = plan["activations_detail"]
    lines = [
        f"stage 2 plan, per rank: {plan['method']} on {plan['backbone']}; "
        f"{plan['world_size']} rank(s), micro batch {plan['micro_batch']}, {plan['precision']}, "
        f"ZeRO-{z['stage']}{' (' + ', '.join(off) + ')' if off else ''}, "
        f"attention {plan['attn_implementation']}, activation checkpointing "
        f"{'on' if plan['activation_checkpointing'] else 'off'}",
        f"backbone parameters: {bb['trainable']:,} trainable, {bb['frozen']:,} frozen",
    ]
    rc = c["recommender"]
    if rc is not None:
        lines.append(f"recommender {rc['name']}: {rc['trainable']:,} trainable "
                     f"({rc['n_users']:,} users x {rc['n_items']:,} items from {rc['source']})")
    towers = ", ".join(f"{k} {v['tokens']} tokens x {v['layers_saving']}/{v['layers']} layers "
                       f"saving" for k, v in act["towers"].items())
    lines.append(f"activations: {towers}")
    lines.append("")
    lines.append(f"{'':26s}{'device GiB':>10s}  {'host GiB':>10s}")
    for key in ROWS:
        r = plan["rows"][key]
        if key == "total":
            lines.append("-" * 48)
        lines.append(f"{LABELS[key]:26s}{_gib(r['device'])}  {_gib(r['host'])}")
    lines.append(f"(total = parameters + optimizer + buffers + max(gradients, activations); "
                 f"both: {plan['upper_bound_device'] / GIB:.3f} GiB)")
    sg = plan["suggestion"]
    if sg["micro_batch"]:
        lines.append(f"suggested micro batch for {sg['device_memory_gib']:g} GiB "
                     f"({sg['headroom']:.0%} headroom): {sg['micro_batch']} per rank "
                     f"(global {sg['global_batch']}), total {sg['total_gib']:.3f} GiB")
    else:
        lines.append(f"no micro batch fits {sg['device_memory_gib']:g} GiB "
                     f"({sg['headroom']:.0%} headroom): {sg['reason']}")
    for note in plan["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
