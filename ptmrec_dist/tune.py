"""``ptmrec tune SWEEP.yaml --out DIR``: Ray Tune over stage 2 (prompt length and depth, KT
weight, PEFT method, learning rate, ...), every trial running the same code as ``ptmrec stage2``.

A sweep file (``tuning/*.yaml``) holds ``base:`` (an experiment config, relative to the sweep
file), ``space:`` (dotted config key -> domain) and any config sections (``tune:``, ``stage2:``,
...) that apply to every trial. Domains: a list (grid values under ``tune.search=grid``, else a
choice), ``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (both ends included).

Trial ``T`` trains in ``DIR/trials/T/`` (a stage-2 run folder) and reports after every epoch
(the valid metrics; the best epoch's valid and test metrics): ASHA stops weak trials at epoch
rungs on ``tune.metric`` (valid only); a failed trial is retried ``tune.max_failures`` times and
resumes from its own last checkpoint. Ray's state lives in ``DIR/ray/`` so that ``--resume``
continues a sweep whose driver died. At the end: ``DIR/results.csv`` (a row per trial),
``DIR/best.yaml`` (the winning trial's resolved config, runnable with ``ptmrec stage2``) and
``DIR/sweep.png`` (the valid metric against every searched dimension).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ptmrec_dist.config import Config, get_key, load_config, merge_into, read_yaml, set_key
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.logs import get_logger

_log = get_logger(__name__)

SWEEP_NAME = "sweep"
PATH_KEYS = ("data.path", "data.features", "data.shards", "data.catalog", "stage2.teacher",
             "backbone.name_or_path", "backbone.text_tower")
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class Sweep:
    """A parsed sweep file: the config every trial starts from and the search space."""
    path: Path
    cfg: Config
    space: dict[str, Any]          # key -> list (grid/choice) or {kind: args}

    @property
    def keys(self) -> list[str]:
        return list(self.space)


def _set(cfg: Config, key: str, value) -> None:
    set_key(cfg, key, value if isinstance(value, str) else json.dumps(value))


def _domain_values(sweep_path: Path, key: str, spec) -> tuple[str, list]:
    """(kind, values to check against the config) of one ``space:`` entry."""
    where = f"{sweep_path}: space.{key}"
    if isinstance(spec, list):
        kind, args = "list", spec
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS:
        kind, args = next(iter(spec.items()))
    else:
        raise ConfigError(f"{where}: expected a list of values or one of "
                          f"{{{', '.join(DOMAINS)}: ...}}, got {spec!r}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) \
                or not args[0] < args[1]:
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers with low < high, "
                              f"got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint needs integers, got {args!r}")
    return kind, args


def load_sweep(path: str | Path, overrides: list[str] = (),
               base_config: str | Path | None = None) -> Sweep:
    """Parse and check a sweep file: every searched key must exist, and every value at the
    ends of its domain must give a valid config (checked here, not in trial 7 at 3 a.m.).
    ``base_config`` replaces the file's ``base:`` (the same sweep on another experiment)."""
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base, space, sections)")
    data = dict(data)
    base = data.pop("base", None)
    space = data.pop("space", None)
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: 'space' must map config keys to domains, e.g. "
                          "'stage2.kt_weight: {loguniform: [0.1, 100]}'")
    base_path = Path(base_config) if base_config else (path.parent / base) if base else None
    if base_path is not None and not base_path.is_file():
        raise ConfigError(f"{path}: base config not found: {base_path}")
    cfg = merge_into(load_config(base_path), data, path)
    for item in overrides:
        key, _, raw = item.partition("=")
        set_key(cfg, key.strip(), raw)
    cfg.validate()
    k = int(cfg.tune.metric.rpartition("@")[2])
    if k not in cfg.eval.ks:
        raise ConfigError(f"{path}: tune.metric {cfg.tune.metric} needs K={k} in eval.ks "
                          f"(it is {cfg.eval.ks})")
    for key, spec in space.items():
        kind, values = _domain_values(path, key, spec)
        if cfg.tune.search == "grid" and kind in ("uniform", "loguniform", "randint", "choice"):
            raise ConfigError(f"{path}: space.{key}: tune.search=grid needs a list (or grid) of "
                              f"values, not {kind}")
        if cfg.tune.search == "optuna" and kind == "grid":
            raise ConfigError(f"{path}: space.{key}: tune.search=optuna cannot take a grid; use "
                              "a list (a choice) or tune.search=grid")
        for value in values:
            trial = copy.deepcopy(cfg)
            try:
                _set(trial, key, value)
                trial.validate()
            except ConfigError as exc:
                raise ConfigError(f"{path}: space.{key}: value {value!r}: {exc}") from None
    return Sweep(path, _absolute_paths(cfg), dict(space))


def _absolute_paths(cfg: Config) -> Config:
    """Trials run in other processes, on other nodes, in other working directories: local
    paths become absolute (hub ids, which are not local paths, stay as they are)."""
    for key in PATH_KEYS:
        value = get_key(cfg, key)
        if value and Path(value).exists():
            _set(cfg, key, str(Path(value).resolve()))
    return cfg


def param_space(sweep: Sweep) -> dict:
    from ray import tune

    grid = sweep.cfg.tune.search == "grid"
    out = {}
    for key, spec in sweep.space.items():
        kind, args = _domain_values(sweep.path, key, spec)
        if kind == "grid" or (kind == "list" and grid):
            out[key] = tune.grid_search(args)
        elif kind in ("list", "choice"):
            out[key] = tune.choice(args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        else:
            out[key] = tune.randint(args[0], args[1] + 1)     # both ends included
    return out


def trial_config(base: Config, params: dict) -> Config:
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        _set(cfg, key, value.item() if hasattr(value, "item") else value)
    return cfg.validate()


# --------------------------------------------------------------------------- trials (Ray workers)

def _metric_columns(progress: dict) -> dict:
    """Flat metrics for Ray: ``valid/recall@20`` (this epoch), ``best_valid/...``,
    ``best_test/...`` (the best-valid epoch's test metrics: reported, never used to choose)."""
    flat = {"epoch": progress["epoch"], "epochs": progress["epochs"],
            "loss": progress["loss"], "best_epoch": progress["best_epoch"]}
    for part in ("valid", "best_valid", "best_test"):
        flat.update({f"{part}/{k}": float(v) for k, v in progress[part].items()})
    return flat


def _attempt(out: Path, env_rank: int) -> None:
    """One line per start of a trial in ``attempts.jsonl`` (retries are counted from it), with
    the Ray node it runs on."""
    if env_rank == 0:
        import ray
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "attempts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"start": time.time(), "pid": os.getpid(),
                                "node": ray.get_runtime_context().get_node_id()}) + "\n")


def _reporter(out: Path, report, checkpoint_cls):
    """``on_epoch`` for a trial: ``report(metrics, checkpoint=...)`` with a pointer checkpoint
    (the run keeps its own state; Tune needs one to restore the trial); ``checkpoint_cls``
    None reports the metrics alone (Ray Train ranks other than 0)."""
    def on_epoch(progress: dict) -> None:
        if checkpoint_cls is None:
            report(_metric_columns(progress))
            return
        with tempfile.TemporaryDirectory() as d:
            Path(d, "trial.json").write_text(json.dumps({"run": str(out), **progress}))
            report(_metric_columns(progress), checkpoint=checkpoint_cls.from_directory(d))
    return on_epoch


def _file_log(out: Path):
    def log(*parts) -> None:
        with open(out / "stdout.log", "a", encoding="utf-8") as f:
            print(*parts, file=f)
    return log


def run_trial(params: dict, base: Config, trials: Path) -> None:
    """Function trainable: one stage-2 run on this process, reporting every epoch."""
    from ray import tune

    from ptmrec_dist.dist import DistEnv, free_port
    from ptmrec_dist.train.stage2 import run_stage2

    cfg = trial_config(base, params)
    out = trials / tune.get_context().get_trial_id()
    _attempt(out, 0)
    # a retried or restored trial continues from its own newest checkpoint (exact resume)
    run_stage2(cfg, out, DistEnv(master_port=free_port()), log=_file_log(out), resume=True,
               on_epoch=_reporter(out, tune.report, tune.Checkpoint))


def run_trial_workers(params: dict, base: Config, trials: Path) -> None:
    """Function trainable for ``tune.workers_per_trial`` > 1: this trial's Ray Train driver. A
    TorchTrainer runs :func:`_worker_loop` on that many workers, each one DeepSpeed rank of the
    same stage-2 run (gloo on CPUs, nccl on GPUs); rank 0's reports reach Tune (ASHA) through
    ``TuneReportCallback``. Tune reserves only this driver's resources: the sweep caps the
    concurrent trials by the workers' needs (see :func:`resources`)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    t = base.tune
    trial_id = tune.get_context().get_trial_id()
    use_gpu = t.gpus_per_worker > 0
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    TorchTrainer(
        _worker_loop,
        train_loop_config={"params": params, "base": base, "out": str(trials / trial_id)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers_per_trial, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=str(trials.parent
                                                                                   / "ray"),
                                       callbacks=[TuneReportCallback()]),
    ).fit()


def _worker_loop(config: dict) -> None:
    import deepspeed  # noqa: F401  (in the worker, before the engine is built)
    import ray.train

    from ptmrec_dist import dist
    from ptmrec_dist.train.stage2 import run_stage2

    cfg = trial_config(config["base"], config["params"])
    env = dist.from_ray(ray.train.get_context())
    out = Path(config["out"])
    _attempt(out, env.rank)
    report = _reporter(out, ray.train.report, ray.train.Checkpoint if env.is_main else None)
    log = _file_log(out) if env.is_main else (lambda *_: None)
    run_stage2(cfg, out, env, log=log, resume=True, on_epoch=report)


# --------------------------------------------------------------------------- the driver

DRIVER_CPU = 0.01     # a multi-worker trial's Ray Train driver (Ray refuses 0)


def resources(t) -> dict:
    """What Tune reserves per trial. A multi-worker trial's workers get their own placement
    group that Tune does not count, so Tune reserves only the Train driver and
    :func:`concurrency` caps the trials instead (two trials waiting for each other's CPUs
    deadlock: ../shared/notes/stack-on-cpu.md)."""
    if t.workers_per_trial == 1:
        return {"cpu": t.cpus_per_worker, "gpu": t.gpus_per_worker}
    return {"cpu": DRIVER_CPU}


def trial_needs(t) -> tuple[float, float]:
    """(CPUs, GPUs) one trial occupies while it runs."""
    driver = DRIVER_CPU if t.workers_per_trial > 1 else 0.0
    return (t.cpus_per_worker * t.workers_per_trial + driver,
            t.gpus_per_worker * t.workers_per_trial)


def concurrency(t, cluster: dict) -> int:
    """Trials at once: ``tune.max_concurrent_trials``, at most what the cluster holds; a trial
    that cannot fit at all is refused here instead of waiting forever."""
    cpu, gpu = trial_needs(t)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpu > have_cpu + 1e-9 or gpu > have_gpu + 1e-9:
        raise ConfigError(
            f"a trial needs {cpu:g} CPU(s) and {gpu:g} GPU(s) (tune.workers_per_trial "
            f"{t.workers_per_trial} x tune.cpus_per_worker {t.cpus_per_worker:g} / "
            f"tune.gpus_per_worker {t.gpus_per_worker:g}"
            f"{f', + {DRIVER_CPU} CPU for its Ray Train driver' if t.workers_per_trial > 1 else ''}"
            f"); the Ray cluster has {have_cpu:g} CPU(s) and {have_gpu:g} GPU(s)")
    fit = min(have_cpu / cpu if cpu else math.inf, have_gpu / gpu if gpu else math.inf)
    return max(1, min(t.max_concurrent_trials, int(fit + 1e-9)))


def _scheduler(cfg: Config):
    t = cfg.tune
    if t.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="epochs", max_t=cfg.stage2.epochs,
                         grace_period=min(t.grace_period, cfg.stage2.epochs),
                         reduction_factor=t.reduction_factor,
                         stop_last_trials=False)   # trials at max_t finish (metrics.json)


def _search_alg(cfg: Config, n_parallel: int):
    if cfg.tune.search != "optuna":        # grid values x random draws, seeded
        from ray.tune.search.basic_variant import BasicVariantGenerator
        # Tune's max_concurrent_trials does not reach a generator passed in: set it here
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=n_parallel)
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("tune.search=optuna needs the optuna package (pip install optuna, "
                          "or the 'tune' extra)") from None
    return OptunaSearch(seed=cfg.seed)


def run_sweep(sweep: Sweep, out: str | Path, resume: bool = False, log=None) -> dict:
    """The whole sweep; returns the summary (also in ``DIR/results.csv``, ``best.yaml``); its
    one-paragraph form, ``summary["text"]``, is the result ``ptmrec tune`` prints. ``log``:
    the messages on the way (default: this module's logger)."""
    log = log or _log.info
    out = Path(out).resolve()
    exp = out / "ray" / SWEEP_NAME
    if exp.exists() and not resume:
        raise InputError(f"{out} holds a sweep already: pass --resume to continue it, or "
                         "choose another --out (nothing was changed)")
    # the experiment state is saved every second, so a restored sweep never reruns a finished
    # trial (Ray's default is every 10 s or more)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    import ray
    from ray import tune

    cfg, t = sweep.cfg, sweep.cfg.tune
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(sweep.path.read_text(encoding="utf-8"), encoding="utf-8")
    t0 = time.perf_counter()
    if t.address:
        ray.init(address=t.address, include_dashboard=False, log_to_driver=False)
    else:                                  # "local": never join a cluster left on this host
        ray.init(address="local", num_cpus=t.num_cpus or None, include_dashboard=False,
                 log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    try:
        cluster = ray.cluster_resources()
        n_parallel = concurrency(t, cluster)
        fn = run_trial if t.workers_per_trial == 1 else run_trial_workers
        trainable = tune.with_resources(
            tune.with_parameters(fn, base=cfg, trials=out / "trials"), resources(t))
        log(f"sweep {sweep.path}: {', '.join(sweep.keys)}; search {t.search}, scheduler "
            f"{t.scheduler}, {t.num_samples} sample(s), {n_parallel} at a time on "
            f"{cluster.get('CPU', 0):g} CPU(s) / {cluster.get('GPU', 0):g} GPU(s) "
            f"({len(ray.nodes())} node(s)); Ray up in {ray_start_s:.1f} s")
        if resume and tune.Tuner.can_restore(str(exp)):
            log(f"resuming the sweep in {exp}")
            tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space(sweep),
                tune_config=tune.TuneConfig(
                    metric=t.metric, mode="max", num_samples=t.num_samples,
                    scheduler=_scheduler(cfg), search_alg=_search_alg(cfg, n_parallel),
                    max_concurrent_trials=n_parallel),
                run_config=tune.RunConfig(
                    name=SWEEP_NAME, storage_path=str(out / "ray"), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=t.max_failures)))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    from ptmrec_dist.tune_report import write_outputs
    summary = write_outputs(sweep, out, grid, wall_s=time.perf_counter() - t0,
                            ray_start_s=ray_start_s)
    return summary
