"""Stage-2 training cost of each PEFT method on a CLIP backbone: step time, throughput, peak
memory and trainable parameters, against full fine-tuning.

    .venv/bin/python bench/stage2_cost.py [--preset vit-b16|tiny] [--batch 8] [--text-len 32]
        [--steps 3] [--warmup 1] [--threads N] [--methods prompt,lora,ia3,full]
        [--switches eager,ckpt,ckpt-mlp,compile,cpuadam,fusedadam|none]
        [--switch-methods prompt,full] [--out bench/results]
        [--model-cache DIR] [--child-timeout 3600] [--compile-backend inductor]

What it measures: a CLIP of OpenAI's ViT-B/16 shape with random weights (``--preset tiny``: a
small shape, seconds per configuration, a few minutes in all with compilation) is saved once under
``OUT/<preset>-random/`` (or ``--model-cache``) and loaded through ``load_backbone`` +
``apply_method`` exactly as stage 2 does, with the config overrides ``peft.method=...`` (and, for
the switch rows, ``backbone.attn_implementation=eager``, ``stage2.activation_checkpointing=true``
(``ckpt-mlp``: ``mlp``, only the MLPs recomputed),
or ``torch.compile`` of every encoder layer; ``cpuadam`` / ``fusedadam``: DeepSpeed's
DeepSpeedCPUAdam / FusedAdam instead of torch's AdamW, JIT-built on first use and cached in
``TORCH_EXTENSIONS_DIR``). A training step is: both towers forward on
``--batch`` random images and ``--text-len`` random token ids, a symmetric in-batch contrastive
loss on the two features, backward, and an AdamW step over the trainable weights (timed on its
own too: ``optimizer_step_s``);
``--warmup`` untimed steps, then ``--steps`` timed ones (median reported, with images/s). Each
(method, switch) runs in a fresh ``--child`` process so that its peak resident memory is its own:
the loaded-model RSS (every weight paged in) is the baseline, the high-water mark (VmHWM) is
reset after loading (``/proc/self/clear_refs``) and again after warm-up, and the peak over the
timed steps is reported as a total and as the increase over the loaded model (the peak including
warm-up, i.e. optimizer-state creation and any compilation, is kept in the JSON too). Compile
time (the first step's time less a timed step's) is reported apart from the step time; a failed
compile is a row saying ``failed: <reason>``. Ratios are against ``full`` with the default
switches (sdpa, no checkpointing, no compile), and the issue's goals for ``prompt`` (trainable
<= 1 %, peak memory <= 0.5x full, step time <= 0.7x full) are printed as PASS / MISS. Prints a
table and writes ``OUT/stage2_cost.json``. Figures, not assertions; CPU, fp32. Times are only
meaningful with the machine to itself: each row records the load average around its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _util import reset_peak, status_mb, write_result  # noqa: E402

METHODS = ("prompt", "lora", "ia3", "full")
SWITCHES = {   # switch name -> config overrides (compile is applied by this script)
    # the defaults: sdpa attention, stage2.activation_checkpointing=auto (decided as stage 2
    # decides it: plan.activations.resolve_checkpointing); every other row sets one switch with
    # checkpointing off, so that each switch's own effect shows
    "sdpa": [],
    "no-ckpt": ["stage2.activation_checkpointing=false"],
    "eager": ["backbone.attn_implementation=eager", "stage2.activation_checkpointing=false"],
    "ckpt": ["stage2.activation_checkpointing=true"],
    "ckpt-mlp": ["stage2.activation_checkpointing=mlp"],      # only the MLPs recomputed
    "compile": ["stage2.activation_checkpointing=false"],
    # DeepSpeedCPUAdam (what ZeRO-Offload steps with), JIT-built on first use
    "cpuadam": ["stage2.activation_checkpointing=false"],
    # DeepSpeed's FusedAdam (its CPU op here; CUDA kernel on GPUs)
    "fusedadam": ["stage2.activation_checkpointing=false"],
}
ADAMS = {"torch": "torch.optim.AdamW (foreach)", "cpuadam": "deepspeed.ops.adam.DeepSpeedCPUAdam",
         "fusedadam": "deepspeed.ops.adam.FusedAdam"}
def _shape_preset(name: str) -> dict:
    """A named OpenAI shape (ptmrec_dist.clip.shapes) in this bench's preset form."""
    from ptmrec_dist.clip.shapes import clip_config
    c = clip_config(name)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return dict(vision={k: getattr(c.vision_config, k) for k in (*keys, "image_size",
                                                                    "patch_size")},
                text={k: getattr(c.text_config, k) for k in (*keys, "max_position_embeddings",
                                                                  "vocab_size")},
                projection_dim=c.projection_dim)


PRESETS = {
    "vit-b16": _shape_preset("vit-b16"),
    "vit-l14": _shape_preset("vit-l14"),          # bench/gpu.py's
    # 4 layers: the default stage2.prompt_depth is 4
    "tiny": dict(
        vision=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=256, image_size=32, patch_size=8),
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=77, vocab_size=1024),
        projection_dim=32),
}
GOALS = {"trainable_pct": 1.0, "peak_ratio": 0.5, "step_time_ratio": 0.7}
LR = 1e-4      # the step's cost does not depend on it; small so that random weights stay finite


# --------------------------------------------------------------------------- the model
def save_random_clip(preset: str, out: Path) -> Path:
    """A CLIP of ``preset``'s shape with random weights + a processor, saved like a real one
    (reused when the folder already holds this shape). The tokenizer is byte-level with no merges
    (as tests/clip_fixtures.py), padded with unused tokens to the text tower's vocabulary, the
    start/end tokens last as in OpenAI's."""
    shape = PRESETS[preset]
    marker = out / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return out
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, \
        CLIPTokenizer

    from ptmrec_dist.clip.tokenizer import bytes_to_unicode

    vocab_size, size = shape["text"]["vocab_size"], shape["vision"]["image_size"]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    tokens += [f"<|unused{i}|>" for i in range(vocab_size - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=shape["text"][
        "max_position_embeddings"])
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}), tokenizer=tok)
    bos, eos = vocab_size - 2, vocab_size - 1
    cfg = CLIPConfig(text_config=dict(**shape["text"], bos_token_id=bos, eos_token_id=eos,
                                      pad_token_id=eos),
                     vision_config=dict(shape["vision"]), projection_dim=shape["projection_dim"])
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    CLIPModel(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    marker.write_text(json.dumps(shape, indent=2) + "\n")   # last: the folder is complete
    return out


# --------------------------------------------------------------------------- one configuration
def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    logits = img @ txt.T / tau
    target = torch.arange(len(img))
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def make_optimizer(switch: str, params: list):
    """AdamW over ``params``: torch's, or one of DeepSpeed's kernels (the ``stage2.adam``
    switch: ``cpuadam`` is what ZeRO-Offload runs, ``fusedadam`` what GPUs run)."""
    if switch == "cpuadam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=LR, adamw_mode=True)
    if switch == "fusedadam":
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(params, lr=LR, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=LR)


def child(args) -> dict:
    """Load, adapt, train ``--warmup`` + ``--steps`` steps; one JSON object."""
    torch.set_num_threads(args.threads)
    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.compile import compile_layers
    from ptmrec_dist.clip.methods import apply_method, param_counts
    from ptmrec_dist.config import load_config
    from ptmrec_dist.plan.activations import resolve_checkpointing

    overrides = [f"backbone.name_or_path={args.model_dir}", f"peft.method={args.method}",
                 "peft.prompt_init=random", f"stage2.batch_size={args.batch}",
                 *SWITCHES[args.switch]]
    cfg = load_config(None, overrides)
    row: dict = {"method": args.method, "switch": args.switch, "overrides": overrides[1:]}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    # stage 2's decision for stage2.activation_checkpointing=auto (the default), one rank
    why = resolve_checkpointing(backbone, cfg, 1)
    row["activation_checkpointing"] = backbone.use_checkpoint      # False, True or "mlp"
    if why:
        row["checkpointing_auto"] = why
    backbone.train()
    row["load_s"] = round(time.perf_counter() - t0, 2)
    row.update(param_counts(backbone))
    if args.switch == "compile":
        import torch._dynamo as dynamo
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        row["compiled_layers"] = compile_layers(backbone, backend=args.compile_backend)
        row["compile_backend"] = args.compile_backend
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = make_optimizer(args.switch, params)
    row["optimizer"] = ADAMS.get(args.switch, ADAMS["torch"])

    g = torch.Generator().manual_seed(1)
    size, vocab = backbone.image_size, backbone.clip.config.text_config.vocab_size
    if args.text_len > backbone.max_text_len:
        raise SystemExit(f"--text-len {args.text_len} exceeds the {backbone.max_text_len} "
                         f"tokens that fit with peft.method={args.method}")
    pixel_values = torch.randn(args.batch, 3, size, size, generator=g)
    input_ids = torch.randint(0, vocab - 2, (args.batch, args.text_len), generator=g)
    input_ids[:, 0] = backbone.clip.config.text_config.bos_token_id
    input_ids[:, -1] = backbone.clip.config.text_config.eos_token_id
    attention_mask = torch.ones_like(input_ids)

    opt_times: list[float] = []

    def step() -> tuple[float, float]:
        t = time.perf_counter()
        img, txt = backbone(pixel_values, input_ids, attention_mask)
        loss = contrastive_loss(img, txt)
        loss.backward()
        t_opt = time.perf_counter()
        opt.step()
        opt_times.append(time.perf_counter() - t_opt)
        for p in params:                  # FusedAdam's zero_grad has no set_to_none
            p.grad = None
        return time.perf_counter() - t, loss.item()

    # transformers maps the safetensors file and pages weights in lazily: read every weight
    # once so that the loaded baseline holds the model and the step's increase does not
    with torch.no_grad():
        tensors = [*backbone.parameters(), *backbone.buffers()]
        for t in tensors:
            t.sum()
    row["weights_mb"] = round(sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20, 1)
    row["loaded_mb"] = round(status_mb("VmRSS"), 1)
    row["hwm_reset"] = reset_peak()
    warm = []
    for _ in range(max(args.warmup, 1 if args.switch == "compile" else 0)):
        warm.append(step())
    row["warmup_s"] = [round(t, 3) for t, _ in warm]
    row["rss_after_warmup_mb"] = round(status_mb("VmRSS"), 1)
    row["peak_incl_warmup_mb"] = round(status_mb("VmHWM"), 1)
    row["hwm_reset"] &= reset_peak()
    row["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    del opt_times[:]
    timed = [step() for _ in range(args.steps)]
    row["optimizer_step_s"] = round(statistics.median(opt_times), 4)
    row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    row["peak_mb"] = round(status_mb("VmHWM"), 1)
    row["step_increase_mb"] = round(row["peak_mb"] - row["loaded_mb"], 1)
    times = [t for t, _ in timed]
    row["step_s"] = round(statistics.median(times), 4)
    row["step_times_s"] = [round(t, 4) for t in times]
    row["images_per_s"] = round(args.batch / row["step_s"], 3)
    row["loss"] = [round(v, 4) for _, v in warm + timed]
    if args.switch == "compile":
        row["compile_s"] = round(warm[0][0] - row["step_s"], 2)   # first step minus a step
        from torch._dynamo.utils import counters
        row["dynamo"] = {k: dict(v) for k, v in counters.items()
                         if k in ("stats", "recompiles", "graph_break") and v}
    row["status"] = "ok"
    return row


# --------------------------------------------------------------------------- parent
def run_one(args, model_dir: Path, method: str, switch: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--preset", args.preset,
           "--model-dir", str(model_dir), "--method", method, "--switch", switch,
           "--batch", str(args.batch), "--text-len", str(args.text_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--compile-backend", args.compile_backend]
    t0 = time.perf_counter()
    base = {"method": method, "switch": switch}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": f"failed: timeout after {args.child_timeout} s"}
    wall = round(time.perf_counter() - t0, 1)
    lines = res.stdout.strip().splitlines()
    if res.returncode == 0 and lines:
        try:
            return {**json.loads(lines[-1]), "child_wall_s": wall}
        except json.JSONDecodeError:
            pass
    err = [x for x in res.stderr.strip().splitlines() if x.strip()]
    reason = err[-1].strip() if err else f"exit {res.returncode}"
    return {**base, "status": f"failed: {reason[:300]}", "child_wall_s": wall,
            "stderr_tail": "\n".join(err[-15:])}


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def add_ratios(rows: list[dict]) -> dict | None:
    """Each ok row against full with the default switches; the goals for prompt (every prompt
    row, the default one first)."""
    full = next((r for r in rows if r["method"] == "full" and r["switch"] == "sdpa"
                 and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok" or full is None:
            continue
        r["vs_full"] = {"trainable_fraction": _ratio(r["trainable"], full["trainable"]),
                        "peak_ratio": _ratio(r["peak_mb"], full["peak_mb"]),
                        "step_increase_ratio": _ratio(r["step_increase_mb"],
                                                      full["step_increase_mb"]),
                        "step_time_ratio": _ratio(r["step_s"], full["step_s"])}
    return full


def goals(rows: list[dict], full: dict | None) -> list[dict]:
    out = []
    for r in sorted((r for r in rows if r["method"] == "prompt"),
                    key=lambda r: r["switch"] != "sdpa"):
        g = {"row": f"prompt/{r['switch']}", "vs": "full/sdpa"}
        if r["status"] != "ok" or full is None:
            g["result"] = "n/a (prompt or full/sdpa row missing or failed)"
            out.append(g)
            continue
        v = r["vs_full"]
        checks = {"trainable_pct": (r["trainable_pct"], GOALS["trainable_pct"]),
                  "peak_ratio": (v["peak_ratio"], GOALS["peak_ratio"]),
                  "step_time_ratio": (v["step_time_ratio"], GOALS["step_time_ratio"])}
        for k, (value, limit) in checks.items():
            g[k] = {"value": value, "goal": f"<= {limit}",
                    "result": "PASS" if value <= limit else "MISS"}
        g["info_step_increase_ratio"] = v["step_increase_ratio"]   # not a goal: no baseline
        out.append(g)
    return out


def _fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], goal_rows: list[dict]) -> None:
    head = (f"{'method':<7} {'switch':<8} {'trainable':>11} {'train%':>8} {'loaded MB':>9} "
            f"{'peak MB':>8} {'step+MB':>8} {'step s':>8} {'adam s':>7} {'img/s':>7} {'compile s':>9} "
            f"{'peak/full':>9} {'time/full':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['method']:<7} {r['switch']:<8} {r['status']}")
            continue
        v = r.get("vs_full", {})
        print(f"{r['method']:<7} {r['switch']:<8} {r['trainable']:>11,} "
              f"{r['trainable_pct']:>8.3f} {r['loaded_mb']:>9.0f} {r['peak_mb']:>8.0f} "
              f"{r['step_increase_mb']:>8.0f} {r['step_s']:>8.3f} "
              f"{_fmt(r.get('optimizer_step_s'), '.3f'):>7} {r['images_per_s']:>7.2f} "
              f"{_fmt(r.get('compile_s'), '.1f'):>9} {_fmt(v.get('peak_ratio'), '.3f'):>9} "
              f"{_fmt(v.get('step_time_ratio'), '.3f'):>9}")
    print()
    for g in goal_rows:
        if "trainable_pct" not in g:
            print(f"goals {g['row']}: {g['result']}")
            continue
        parts = [f"{k} {g[k]['value']} (goal {g[k]['goal']}) {g[k]['result']}"
                 for k in ("trainable_pct", "peak_ratio", "step_time_ratio")]
        print(f"goals {g['row']} vs {g['vs']}: " + "; ".join(parts))


def _list(text: str, allowed) -> list[str]:
    items = [] if text.strip().lower() in ("", "none") else [x.strip() for x in text.split(",")]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; choose among {', '.join(allowed)}")
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="vit-b16")
    ap.add_argument("--batch", type=int, default=8, help="items per step")
    ap.add_argument("--text-len", type=int, default=32, help="tokens per text (random ids)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--switches", default="no-ckpt,eager,ckpt,compile,cpuadam,fusedadam",
                    help="extra rows for --switch-methods: no-ckpt, eager, ckpt, ckpt-mlp, "
                         "compile, cpuadam, fusedadam, or none")
    ap.add_argument("--switch-methods", default="prompt,full")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--child-timeout", type=int, default=3600, help="seconds per configuration")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--model-cache", default="",
                    help="folder of the random model (default OUT/<preset>-random; reused)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--switch", choices=list(SWITCHES), default="sdpa", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0

    methods = _list(args.methods, METHODS)
    switches = _list(args.switches, [s for s in SWITCHES if s != "sdpa"])
    switch_methods = _list(args.switch_methods, METHODS)
    t0, load0 = time.perf_counter(), os.getloadavg()
    model_dir = save_random_clip(args.preset, Path(args.model_cache) if args.model_cache
                                 else Path(args.out) / f"{args.preset}-random")
    print(f"model: {model_dir} ({args.preset}, random weights), saved/checked in "
          f"{time.perf_counter() - t0:.1f} s; batch {args.batch}, text {args.text_len} tokens, "
          f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    if load0[0] > 0.5:
        print(f"note: load average {load0[0]:.2f} before the run: other processes share the "
              f"cores, times will be noisy", flush=True)
    configs = [(m, "sdpa") for m in methods] + \
        [(m, s) for m in switch_methods for s in switches]
    rows = []
    for method, switch in configs:
        row = run_one(args, model_dir, method, switch)
        rows.append(row)
        brief = {k: row.get(k) for k in ("status", "step_s", "optimizer_step_s", "peak_mb",
                                         "step_increase_mb",
                                         "compile_s", "child_wall_s") if k in row}
        print(f"  {method}/{switch}: {json.dumps(brief)}", flush=True)
    full = add_ratios(rows)
    goal_rows = goals(rows, full)
    print()
    print_table(rows, goal_rows)
    import transformers
    res = {
        "preset": args.preset, "shape": PRESETS[args.preset], "model_dir": str(model_dir),
        "batch": args.batch, "text_len": args.text_len, "steps": args.steps,
        "warmup": args.warmup, "threads": args.threads, "lr": LR,
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "processor": platform.processor() or platform.machine()},
        "loadavg_start": [round(x, 2) for x in load0],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "memory_note": "peak_mb: VmHWM over the timed steps (reset after warm-up); "
                       "step_increase_mb: peak_mb - loaded_mb (RSS with model, method, "
                       "optimizer object and inputs); peak_incl_warmup_mb includes the first "
                       "step (optimizer state creation, compilation); for compile rows "
                       "loaded_mb is before compilation, so step_increase_mb includes the "
                       "compiled code kept resident (rss_after_warmup_mb shows it)",
        "noise_note": "each row has the 1/5/15-min load averages around its timed steps: a "
                      "load above the thread count means another process shared the cores",
        "goals_basis": "prompt rows vs full/sdpa: trainable_pct, peak_mb ratio, median step_s "
                       "ratio",
        "rows": rows, "goals": goal_rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    path = write_result(args.out, "stage2_cost", res)
    print(f"\nwrote {path}")
    failed = [f"{r['method']}/{r['switch']}" for r in rows
              if r["status"] != "ok" and r["switch"] != "compile"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
