"""``ptmrec`` command line: parses, loads the config, calls one function per subcommand."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ptmrec_dist import __version__
from ptmrec_dist.config import Config, load_config, to_yaml
from ptmrec_dist.errors import ConfigError, PtmrecError
from ptmrec_dist.io import dumps_json
from ptmrec_dist.logs import get_logger, setup_logging

_log = get_logger("ptmrec_dist.cli")     # not __name__: "__main__" when run as a script


# One example per subcommand (as in README.md's "The command line", the documented layout), shown
# at the end of its --help with the exit codes; tests/test_help.py parses each with its parser.
EXAMPLES = {
    "make-data": "ptmrec make-data synthetic --out data/syn --items 5000 --users 5000 --seed 0",
    "stats": "ptmrec stats data/syn --json data.split=random",
    "catalog": "ptmrec catalog --items ../shared/data/ml100k-posters/items.csv --title title "
               "--text \"{overview}\" --image \"posters/{movie_id}.jpg\" "
               "--interactions ../shared/data/ml100k-posters/ratings.csv --out data/ml100k",
    "shard": "ptmrec shard data/syn --out shards/syn --shard-size 1000 --image-size 224",
    "make-backbone": "ptmrec make-backbone --data data/syn --out backbones/demo",
    "extract": "ptmrec extract --shards shards/syn --backbone backbones/demo --out features/syn",
    "stage1": "ptmrec stage1 --data data/syn --features features/syn --model vbpr --out runs/vbpr",
    "stage2": "ptmrec stage2 --config runs/vbpr/config.yaml --teacher runs/vbpr --shards "
              "shards/syn --backbone backbones/demo --out runs/ptmrec peft.method=lora",
    "evaluate": "ptmrec evaluate --run runs/vbpr --split test --dump-topk runs/vbpr/top50.jsonl",
    "recommend": "ptmrec recommend --run runs/vbpr --users users.txt -k 20 --exclude-seen "
                 "--out recs.jsonl",
    "export": "ptmrec export runs/ptmrec --out exported/",
    "encode-items": "ptmrec encode-items --run runs/ptmrec --catalog data/new_items "
                    "--out runs/ptmrec/new_items",
    "report": "ptmrec report runs/ptmrec --out runs/ptmrec/report",
    "diagnose": "ptmrec diagnose runs/ptmrec",
    "verify": "ptmrec verify shards/syn",
    "demo": "ptmrec demo --out out/demo --size tiny",
    "plan": "ptmrec plan --config configs/vit-l14.yaml --world-size 16 --device-memory 80",
    "tune": "ptmrec tune tuning/demo.yaml --out runs/sweep",
    "config": "ptmrec config --config configs/demo.yaml stage2.kt_weight=0.5",
}

EXIT_CODES = """exit codes:
  0  done
  1  failed: a run that could not go on (e.g. a lost rank, a non-finite loss)
  2  bad input: the message names the file and line, or the config key
  3  stopped by a signal (SIGTERM/SIGUSR1) after writing a checkpoint; --resume continues"""


def _epilog(command: str) -> str:
    return f"example:\n  {EXAMPLES[command]}\n\n{EXIT_CODES}"


class _SubParsers(argparse._SubParsersAction):
    """``add_parser`` with the command's example and the exit codes as its epilog."""

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("epilog", _epilog(name))
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        parser = super().add_parser(name, **kwargs)
        _verbosity_flags(parser, argparse.SUPPRESS)   # `ptmrec stage1 ... -q` too
        return parser


def _verbosity_flags(p: argparse.ArgumentParser, default) -> None:
    """-q/-v: on the top-level parser (``ptmrec -q stage1 ...``) and, with a suppressed
    default so that they do not undo the top-level ones, on every subcommand."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="warnings and errors only, no progress bars (results still go to "
                            "stdout)")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also debug messages, each line with its time and logger name")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. stage2.kt_weight=0.5 data.split=random")


def _resume_flag(p) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints (from scratch "
                        "if there is none); the configuration must be the same")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptmrec", description="PTMRec: parameter-efficient CLIP tuning for multimodal "
                                   "recommendation, distributed.",
        epilog="`ptmrec COMMAND --help` shows a command's options and an example.\n\n"
               + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ptmrec_dist {__version__}")
    _verbosity_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                action=_SubParsers)

    _data_commands(sub)
    _training_commands(sub)
    _tool_commands(sub)
    return parser


def _data_commands(sub) -> None:
    """From raw items to features: make-data, stats, shard, make-backbone, extract."""
    p = sub.add_parser("make-data", help="generate the built-in synthetic benchmark data")
    p.add_argument("kind", choices=["synthetic"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--items", type=int, help="number of items (synthetic.n_items)")
    p.add_argument("--users", type=int, help="number of users (synthetic.n_users)")
    p.add_argument("--seed", type=int, help="generator seed (synthetic.seed)")
    p.add_argument("--image-size", type=int, help="image side in pixels (synthetic.image_size)")
    p.add_argument("--shards", metavar="DIR",
                   help="write the items straight into WebDataset shards in DIR (what `ptmrec "
                        "shard` would make; no image files): the fast path for big catalogs")
    p.add_argument("--shard-size", type=int, default=1000, help="items per shard (with --shards)")
    p.add_argument("--workers", type=int,
                   help="rendering processes (default: min(2, CPU cores))")
    _common(p)

    p = sub.add_parser("stats", help="users, items, interactions and split sizes of a data set")
    p.add_argument("path", nargs="?", help=".inter / .csv file, or a folder holding one "
                                           "(default: data.path)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)

    from ptmrec_dist.data.build_catalog import add_catalog_arguments

    p = sub.add_parser("catalog", help="a user's item table (+ interactions) -> the catalog "
                                       "`ptmrec shard` reads, with one item index")
    add_catalog_arguments(p)
    _common(p)

    p = sub.add_parser("shard", help="write a catalog as WebDataset tar shards + manifest.json")
    p.add_argument("catalog", nargs="?",
                   help="folder with items.jsonl and the images it names (default: data.catalog)")
    p.add_argument("--out", help="output folder for the shards (default: data.shards)")
    p.add_argument("--shard-size", type=int, help="items per shard (data.shard_size)")
    p.add_argument("--image-size", type=int,
                   help="resize the shorter image side at shard time (data.image_size; 0 keeps)")
    p.add_argument("--interactions", help="interactions defining item indices (default: the "
                                          "one in the catalog folder, if any)")
    p.add_argument("--workers", type=int, help="image encoding processes (default: min(2, CPUs))")
    _common(p)

    p = sub.add_parser("make-backbone",
                       help="pretrain the small demo CLIP on a synthetic catalog's captions")
    p.add_argument("--data", required=True, help="synthetic data folder (make-data output)")
    p.add_argument("--out", required=True, help="output folder (an HF CLIP checkpoint)")
    _common(p)

    p = sub.add_parser("extract", help="frozen-backbone image and text features of every item")
    p.add_argument("--shards", help="shard folder, http(s) URL, brace list of tars or pipe: "
                                     "command (data.shards; with --adapter, default: the run's)")
    p.add_argument("--backbone", help="CLIP: local folder or hub id (backbone.name_or_path)")
    p.add_argument("--out", required=True, help="features folder: image.npy, text.npy, meta.json")
    p.add_argument("--adapter", metavar="RUN",
                   help="encode with the tuned encoders of this stage-2 run folder (its "
                        "backbone, method and adapter.safetensors): the features it evaluated "
                        "with")
    _common(p)


def _training_commands(sub) -> None:
    """stage1, stage2, evaluate, recommend, export."""
    p = sub.add_parser("stage1", help="train a base recommender (BPR) under DeepSpeed; "
                                      "early stopping on valid")
    p.add_argument("--out", required=True, help="run folder (checkpoints, representations, "
                                                "metrics.json, log.jsonl)")
    p.add_argument("--data", help="interactions file or folder (data.path)")
    p.add_argument("--features", help="item features folder (data.features)")
    p.add_argument("--model", help="base recommender: pop, bpr, vbpr, freedom, bm3 "
                                   "(recommender.name)")
    _resume_flag(p)
    _common(p)

    p = sub.add_parser("stage2", help="tune the backbone (prompts/LoRA/IA3/full) with the "
                                      "recommender: in-batch BPR + knowledge transfer")
    p.add_argument("--out", required=True, help="run folder (adapter.safetensors, features/, "
                                                "metrics.json, log.jsonl)")
    p.add_argument("--teacher", help="stage-1 run folder (stage2.teacher)")
    p.add_argument("--data", help="interactions file or folder (data.path)")
    p.add_argument("--shards", help="shard folder, http(s) URL, brace list of tars or pipe: "
                                     "command (data.shards)")
    p.add_argument("--features", help="frozen features folder (data.features)")
    p.add_argument("--backbone", help="CLIP: local folder or hub id (backbone.name_or_path)")
    p.add_argument("--method", help="prompt, lora, ia3, full, frozen (peft.method)")
    _resume_flag(p)
    _common(p)

    p = sub.add_parser("evaluate", help="full-ranking metrics of a finished run")
    p.add_argument("--run", required=True, help="run folder (stage1 or stage2 output)")
    p.add_argument("--split", choices=["valid", "test", "cold"], default="test",
                   help="cold: the held-out items of data.cold_items, ranked among themselves")
    p.add_argument("--dump-topk", metavar="FILE",
                   help="write each user's top-50 items (.jsonl or .npy)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the run's config, e.g. eval.mask_valid_at_test=true")

    p = sub.add_parser("recommend", help="each user's top-k items of a finished run, by raw id "
                                         "with scores (JSON lines)")
    p.add_argument("--run", required=True, help="run folder (stage1 or stage2 output)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", metavar="FILE", help="file with one raw user id per line")
    who.add_argument("--user", action="append", metavar="ID",
                     help="a raw user id (repeat for more)")
    who.add_argument("--all-users", action="store_true",
                     help="every user with an interaction (scored in chunks: eval.memory_mb)")
    p.add_argument("-k", type=int, default=20, help="items per user (default 20)")
    p.add_argument("--exclude-seen", action="store_true",
                   help="leave out the items each user interacted with (train, valid and test "
                        "rows of the run's interactions)")
    p.add_argument("--out", metavar="FILE.jsonl", help="write here (default: print)")
    p.add_argument("--new-items", metavar="DIR",
                   help="also rank the items of an `ptmrec encode-items` folder (new items, "
                        "scored by the run's content branch)")
    p.add_argument("--only-new", action="store_true",
                   help="rank only the --new-items items (cold start)")

    p = sub.add_parser("encode-items", help="shard, encode and score items never trained on "
                                            "(cold start) with a finished run's encoders and "
                                            "recommender")
    p.add_argument("--run", required=True, help="run folder (stage1 or stage2 output)")
    p.add_argument("--catalog", required=True,
                   help="catalog folder of the new items (`ptmrec catalog --items FILE --out "
                        "DIR`, no interactions needed)")
    p.add_argument("--out", required=True, help="output folder: shards/, features/, "
                                                "item_ids.txt, item_repr.npy, encode.json")
    p.add_argument("--backbone", help="the backbone folder, where it moved since the run "
                                      "(its weights must be the same)")

    p = sub.add_parser("export", help="a finished run's embeddings + id maps, recommender "
                                      "weights and tuned encoders (peft adapter, prompts), "
                                      "with a README.md on loading each")
    p.add_argument("run", help="run folder (stage1 or stage2 output)")
    p.add_argument("--out", required=True, help="export folder (new, empty or an earlier "
                                                "export)")

    p = sub.add_parser("report", help="a self-contained report.html (+ PNGs) of a run, a sweep "
                                      "or a bench result JSON")
    p.add_argument("target", help="run folder, sweep folder (ptmrec tune --out) or bench JSON")
    p.add_argument("--out", help="report folder (default: TARGET/report, or beside the JSON)")

    p = sub.add_parser("diagnose", help="the two gaps (feature vs recommender CKA, co-interaction "
                                        "AUC) before and after stage 2; diagnose.json")
    p.add_argument("run", help="run folder (stage1 or stage2 output)")
    p.add_argument("--pairs", type=int, default=20000,
                   help="co-interacted and random item pairs for the AUC (default 20000)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _tool_commands(sub) -> None:
    """verify, demo, plan, tune, config."""
    p = sub.add_parser("verify", help="check shards against their manifest (size, sha256, tar)")
    p.add_argument("shards", help="folder with items-*.tar and manifest.json (or an http(s) "
                                  "URL, brace list of tars or pipe: command: read in full)")
    p.add_argument("--no-hash", action="store_true", help="check sizes only (fast)")

    p = sub.add_parser("demo", help="run the whole flow on built-in synthetic data")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per step)")
    p.add_argument("--size", choices=["tiny", "default"], default="default")
    _common(p)

    p = sub.add_parser("plan", help="per-rank memory estimate of the stage-2 job (parameters, "
                                    "gradients, optimizer, activations; a micro batch that fits)")
    p.add_argument("--world-size", type=int,
                   help="ranks (default: from the launcher's environment, 1 outside one)")
    p.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of one accelerator, for the micro-batch suggestion (default 80)")
    p.add_argument("--users", type=int, help="users, when data.path is not set")
    p.add_argument("--items", type=int, help="items, when data.path is not set")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)

    p = sub.add_parser("tune", help="Ray Tune sweep over stage 2 (tuning/*.yaml): ASHA on the "
                                    "valid metric; results.csv, best.yaml, sweep.png")
    p.add_argument("sweep", help="sweep file: base config, search space, tune.* settings")
    p.add_argument("--out", required=True, help="sweep folder (shared storage on clusters): "
                                                "trials/, ray/, results.csv, best.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in OUT (after the driver died); finished trials "
                        "are kept, unfinished ones resume from their checkpoints")
    p.add_argument("--base", help="experiment config replacing the sweep file's 'base:'")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the sweep's config, e.g. tune.num_samples=16")

    p = sub.add_parser("config", help="print the resolved configuration as YAML")
    _common(p)


def _flags_to_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    return [f"{key}={getattr(args, flag)}" for flag, key in mapping.items()
            if getattr(args, flag, None) is not None]


def _positional_overrides(args: argparse.Namespace, names: list[str]) -> None:
    """An optional positional that got ``key=value`` (``ptmrec stats a.b=c``) is an override."""
    for name in names:
        value = getattr(args, name, None)
        if value and "=" in value and not Path(value).exists():
            args.overrides.insert(0, value)
            setattr(args, name, None)


def resolve_config(args: argparse.Namespace, flags: dict[str, str] | None = None,
                   base: Config | None = None) -> Config:
    _positional_overrides(args, ["path", "catalog"])
    overrides = list(args.overrides) + _flags_to_overrides(args, flags or {})
    return load_config(args.config, overrides, base=base)


def cmd_make_data(args) -> int:
    from ptmrec_dist.config import save_config
    from ptmrec_dist.data.synthetic import generate

    cfg = resolve_config(args, {"items": "synthetic.n_items", "users": "synthetic.n_users",
                                "seed": "synthetic.seed", "image_size": "synthetic.image_size"})
    summary = generate(cfg.synthetic, args.out, split_seed=cfg.data.split_seed, progress=True,
                       workers=args.workers, shards=args.shards, shard_size=args.shard_size)
    save_config(cfg, args.out)
    print(dumps_json(summary))
    return 0


def cmd_stats(args) -> int:
    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.data.stats import format_stats

    cfg = resolve_config(args, {"path": "data.path"})
    if not cfg.data.path:
        raise ConfigError("no interactions given: pass PATH or set data.path")
    stats = load_interactions(cfg.data.path, cfg.data).stats()
    print(dumps_json(stats) if args.json else format_stats(stats))
    return 0


def cmd_catalog(args) -> int:
    from ptmrec_dist.data.build_catalog import CatalogSpec, build_catalog

    cfg = resolve_config(args)
    spec = CatalogSpec.from_args(args, split_seed=cfg.data.split_seed)
    if args.image and args.image_column:
        raise ConfigError("give --image (a pattern) or --image-column, not both")
    build_catalog(spec, log=print)     # its summary table is the result: stdout
    return 0


def cmd_shard(args) -> int:
    from ptmrec_dist.config import save_config
    from ptmrec_dist.data.shards import write_shards

    cfg = resolve_config(args, {"catalog": "data.catalog", "out": "data.shards",
                                "shard_size": "data.shard_size", "image_size": "data.image_size"})
    for key, value in (("data.catalog", cfg.data.catalog), ("data.shards", cfg.data.shards)):
        if not value:
            raise ConfigError(f"{key} is not set: pass it as an argument or in the config")
    manifest = write_shards(cfg.data.catalog, cfg.data.shards, shard_size=cfg.data.shard_size,
                            image_size=cfg.data.image_size, on_bad_sample=cfg.data.on_bad_sample,
                            interactions=args.interactions, quality=cfg.data.jpeg_quality,
                            workers=args.workers)
    save_config(cfg, cfg.data.shards)
    total = sum(s["bytes"] for s in manifest["shards"])
    print(f"wrote {manifest['n_written']} items in {len(manifest['shards'])} shards "
          f"({total / 1e6:.1f} MB) to {cfg.data.shards}; skipped {manifest['skipped']['total']}")
    return 0


def cmd_make_backbone(args) -> int:
    from ptmrec_dist.clip.demo_backbone import build_demo_backbone
    from ptmrec_dist.config import save_config

    cfg = resolve_config(args)
    summary = build_demo_backbone(args.data, args.out, cfg.demo_backbone, seed=cfg.seed)
    save_config(cfg, args.out)
    print(dumps_json(summary))
    return 0


def cmd_extract(args) -> int:
    from ptmrec_dist import dist
    from ptmrec_dist.clip.extract import run_extract

    cfg = resolve_config(args, {"shards": "data.shards", "backbone": "backbone.name_or_path"})
    if args.adapter and not cfg.data.shards and (Path(args.adapter) / "config.yaml").is_file():
        cfg.data.shards = load_config(Path(args.adapter) / "config.yaml").data.shards
    if not cfg.data.shards:
        raise ConfigError("data.shards is not set: pass --shards or set it in the config")
    env = dist.detect()
    with _one_writer(args.out, "ptmrec extract", env):
        meta = run_extract(cfg, cfg.data.shards, Path(args.out), env,
                           adapter=args.adapter)
    if meta is not None:
        print(f"features of {meta['n_present']} items ({meta['image_dim']}-d image, "
              f"{meta['text_dim']}-d text, {meta['dtype']}) in {args.out}; {meta['seconds']} s")
    return 0


def cmd_stage1(args) -> int:
    from ptmrec_dist.train.stage1 import run_stage1

    return _train(run_stage1, resolve_config(args, {"data": "data.path",
                                                     "features": "data.features",
                                                     "model": "recommender.name"}), args.out,
                  resume=args.resume)


def _one_writer(out, what: str, env):
    """The output folder's lock (``io.run_lock``), held by rank 0 for the whole command: a
    second command writing into the same folder is refused naming the first (before, a second
    stage run there removed the first one's checkpoints). Other ranks take no lock."""
    import contextlib

    from ptmrec_dist.io import run_lock
    return run_lock(out, what) if env.rank == 0 else contextlib.nullcontext()


def _train(run, cfg, out, **kw) -> int:
    """A training command on this process's rank; the process group is finished either way."""
    from ptmrec_dist import dist
    if not cfg.data.path:
        raise ConfigError("no interactions given: pass --data or set data.path")
    try:
        with _one_writer(out, f"ptmrec {run.__name__.removeprefix('run_')}", dist.detect()):
            run(cfg, Path(out), **kw)
    finally:
        dist.finish()
    return 0


def cmd_stage2(args) -> int:
    from ptmrec_dist.train.stage2 import run_stage2

    return _train(run_stage2, resolve_config(args, {
        "teacher": "stage2.teacher", "data": "data.path", "shards": "data.shards",
        "features": "data.features", "backbone": "backbone.name_or_path",
        "method": "peft.method"}), args.out, resume=args.resume)


def cmd_evaluate(args) -> int:
    from ptmrec_dist.eval.evaluate import evaluate_run, format_metrics

    result = evaluate_run(args.run, args.split, args.dump_topk, args.overrides)
    if args.json:
        print(dumps_json(result))
    else:
        ks = sorted({int(k.split("@")[1]) for k in result["metrics"]})
        print(f"{args.split}: {result['users']} users (full ranking, training items masked"
              f"{', valid items masked' if result['mask_valid_at_test'] else ''})")
        print(format_metrics(result["metrics"], ks))
        if args.dump_topk:
            print(f"top-k lists: {args.dump_topk}")
    return 0


def cmd_recommend(args) -> int:
    from ptmrec_dist.eval.recommend import RunRecommender, read_user_file, write_jsonl

    rec = RunRecommender(args.run, args.new_items, args.only_new)
    if args.all_users:
        users = rec.all_users()
    elif args.users:
        ids, lines = read_user_file(args.users)
        users = rec.user_index(ids, args.users, lines)
    else:
        users = rec.user_index(args.user, "--user")
    n = write_jsonl(rec.top(users, args.k, args.exclude_seen), args.out)
    if args.out:
        _log.info("top-%d items of %d users: %s", args.k, n, args.out)
    return 0


def cmd_encode_items(args) -> int:
    from ptmrec_dist.eval.new_items import encode_items

    s = encode_items(args.run, args.catalog, args.out, args.backbone)
    print(f"{s['n_items']} new items encoded by the {s['encoders']} and scored by "
          f"{s['model']}'s content branch: {args.out}")
    return 0


def cmd_export(args) -> int:
    from ptmrec_dist.export import export_run, summary_line

    print(summary_line(export_run(args.run, args.out)))
    return 0


def cmd_report(args) -> int:
    from ptmrec_dist.report import write_report

    print(write_report(args.target, args.out))
    return 0


def cmd_diagnose(args) -> int:
    from ptmrec_dist.diagnose import diagnose_run, format_diagnosis

    result = diagnose_run(args.run, pairs=args.pairs)
    print(dumps_json(result) if args.json else format_diagnosis(result))
    return 0


def cmd_verify(args) -> int:
    from ptmrec_dist.data.readers import iter_shard
    from ptmrec_dist.data.shards import load_manifest, verify_shards
    from ptmrec_dist.data.sources import shard_source

    source = shard_source(args.shards)
    manifest = load_manifest(source)
    good, bad = verify_shards(source, manifest, on_bad_sample="skip",
                              check_hash=not args.no_hash)
    for entry in good:   # sizes and hashes match (remote: checked as read); read every tar
        where, opener = source.reader_args(entry)
        for _ in iter_shard(where, "error", entry["n_items"], opener):
            pass
    items = sum(e["n_items"] for e in good)
    if bad.total:
        for reason, info in bad.to_dict()["by_reason"].items():
            _log.error("%s: %s %s(s): %s", args.shards, info["count"], reason,
                       ", ".join(info["first_ids"]))
        return 2
    print(f"ok: {len(good)} shards, {items} items ({manifest['n_items']} in the index space)")
    return 0


def cmd_demo(args) -> int:
    from ptmrec_dist import dist
    from ptmrec_dist.demo import demo_config, run_demo

    cfg = resolve_config(args, base=demo_config(args.size))
    try:
        run_demo(cfg, Path(args.out), args.size, show=print)   # its tables: stdout
    finally:
        dist.finish()
    return 0


def cmd_plan(args) -> int:
    from ptmrec_dist.plan import estimate, format_plan

    plan = estimate(resolve_config(args), world_size=args.world_size,
                    device_memory_gib=args.device_memory, users=args.users, items=args.items)
    print(dumps_json(plan) if args.json else format_plan(plan))
    return 0


def cmd_tune(args) -> int:
    from ptmrec_dist.tune import load_sweep, run_sweep

    sweep = load_sweep(args.sweep, args.overrides, base_config=args.base)
    summary = run_sweep(sweep, args.out, resume=args.resume)
    print(summary["text"])
    return 0 if summary["trials"] > summary["errors"] else 1


def cmd_config(args) -> int:
    print(to_yaml(resolve_config(args)), end="")
    return 0


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
COMMANDS = {"make-data": cmd_make_data, "make-backbone": cmd_make_backbone, "stats": cmd_stats,
            "catalog": cmd_catalog, "shard": cmd_shard, "extract": cmd_extract, "stage1": cmd_stage1,
            "stage2": cmd_stage2,
            "evaluate": cmd_evaluate, "verify": cmd_verify, "demo": cmd_demo,
            "recommend": cmd_recommend,
            "export": cmd_export, "report": cmd_report, "diagnose": cmd_diagnose,
            "encode-items": cmd_encode_items,
            "plan": cmd_plan, "tune": cmd_tune, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow options (`ptmrec shard C --out O data.x=y`)
    unknown = [x for x in extra if not OVERRIDE.match(x)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    # messages (logging) go to stderr; a command's result is printed to stdout
    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)
    _log.debug("ptmrec_dist %s, Python %s: %s", __version__, sys.version.split()[0], args)
    try:
        return COMMANDS[args.command](args)
    except PtmrecError as exc:
        _log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)   # the terminal's answer to Ctrl-C, not a log line
        return 130
    except Exception as exc:                  # noqa: BLE001  (re-raised unless a lost rank)
        from ptmrec_dist.dist import lost_peer
        lost = lost_peer(exc)
        if lost is None:
            raise
        _log.error("%s", lost)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
