"""``ptmrec stage1``: train a base recommender with its loss (BPR + model terms) under a DeepSpeed
engine on 1..N ranks, evaluate on valid every ``stage1.eval_every`` epochs, stop early after
``stage1.patience`` evaluations without a better ``eval.metric``, and keep the best model.

Test metrics are computed only when valid improves (so the reported test figures are those of the
best-valid epoch) and never influence any choice. Outputs (the teacher of stage 2), main rank:
``OUT/checkpoints/best/`` (DeepSpeed checkpoint + ``model.safetensors``), ``OUT/user_repr.npy`` and
``OUT/item_repr.npy`` (scores = user_repr @ item_repr.T), ``OUT/metrics.json``, ``OUT/log.jsonl``,
``OUT/config.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptmrec_dist import dist, rec, seeds
from ptmrec_dist.config import Config, to_dict
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.errors import ConfigError, TrainingError
from ptmrec_dist.eval.evaluate import Evaluator
from ptmrec_dist.io import atomic_write_json
from ptmrec_dist.logs import get_logger, progress
from ptmrec_dist.rec.features import ItemFeatures, resolve_features
from ptmrec_dist.run import provenance
from ptmrec_dist.train.checkpoint import StopSignals, check_finite, own_handlers
from ptmrec_dist.train.engine import build_engine, describe_engine, stage_ds_config
from ptmrec_dist.train.outputs import mark_cold_items, representations, \
    save_model_and_representations
from ptmrec_dist.train.runstate import Resume, RunState, main_rank_log
from ptmrec_dist.train.sampler import BPRSampler

_log = get_logger(__name__)


class _LossModule(nn.Module):
    """What the engine runs: ``batch -> model.loss(batch)`` (keeps ``Recommender.forward`` the
    scoring function of the interface)."""

    def __init__(self, model: rec.base.Recommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return self.model.loss(batch)


SPARSE_AUTO_ITEMS = 100_000     # stage1.sparse_embeddings auto: on from this many items


def sparse_optimizer(model: rec.base.Recommender, stage, ds_cfg: dict, n_items: int = 0,
                     say=None):
    """With ``stage1.sparse_embeddings``: the model reads its ID tables through sparse rows and
    trains with :class:`~ptmrec_dist.train.sparse_adam.RowSparseAdam` (the config's Adam betas
    and eps); None without. Only where it is exact to DeepSpeed's handling: models that read
    their tables row by row, ZeRO stage 0 (ZeRO 1-3 flatten gradients: no sparse ones), fp32
    (DeepSpeed's bf16 / fp16 optimizers wrap theirs), no gradient clipping (DeepSpeed's norm
    reads dense gradients): ``true`` elsewhere is refused; ``auto`` takes it from
    :data:`SPARSE_AUTO_ITEMS` items where it applies (dense Adam's step costs the whole catalog:
    16x slower at 1M items, docs/scaling.md) and says which it took."""
    if stage.sparse_embeddings is False:
        return None
    auto = stage.sparse_embeddings == "auto"
    if auto and n_items < SPARSE_AUTO_ITEMS:
        return None
    from ptmrec_dist.train.engine import zero_stage
    from ptmrec_dist.train.sparse_adam import RowSparseAdam

    problems = []
    if not model.row_tables:
        problems.append(f"{model.name} reads its tables whole every step (works for bpr, vbpr)")
    if zero_stage(ds_cfg) != 0:
        problems.append(f"stage1.ds_config {stage.ds_config!r} is ZeRO stage "
                        f"{zero_stage(ds_cfg)} (needs zero0)")
    if (ds_cfg.get("bf16") or {}).get("enabled") or (ds_cfg.get("fp16") or {}).get("enabled"):
        problems.append(f"stage1.precision is {stage.precision} (needs fp32)")
    if stage.grad_clip:
        problems.append(f"stage1.grad_clip is {stage.grad_clip} (needs 0)")
    if problems and auto:
        if say is not None:
            say(f"stage1.sparse_embeddings auto: dense Adam at {n_items:,} items, since "
                + "; ".join(problems))
        return None
    if problems:
        raise ConfigError("stage1.sparse_embeddings: " + "; ".join(problems))
    params = (ds_cfg.get("optimizer") or {}).get("params") or {}
    model.sparse_rows = True
    return RowSparseAdam([p for p in model.parameters() if p.requires_grad], lr=stage.lr,
                         betas=tuple(params.get("betas", (0.9, 0.999))),
                         eps=float(params.get("eps", 1e-8)), weight_decay=stage.weight_decay)


def build_model(cfg: Config, inter, feats: ItemFeatures | None = None) -> rec.base.Recommender:
    """The configured recommender on ``feats`` (default: the run's features, loaded here if the
    model needs them)."""
    cls = rec.model_class(cfg.recommender.name)
    if feats is None:
        feats = (resolve_features(cfg.data, inter.path, inter.n_items, required=True,
                                  modalities=cfg.backbone.modalities)
                 if cls.needs_features else ItemFeatures())
    torch.manual_seed(cfg.seed)          # the same initial weights on every rank
    model = cls(inter.n_users, inter.n_items, feats, cfg.recommender, inter.csr("train"))
    model.features_info = feats.describe() if cls.needs_features else "none (ID only)"
    mark_cold_items(model, inter)
    return model


class Stage1Run:
    """One ``ptmrec stage1`` run on this rank: :meth:`__init__` builds everything (data, model,
    engine, sampler; the checkpoint's state when resuming), :meth:`run` trains and returns the
    metrics."""

    # settings that may change between a run and its resumption (the rest must not)
    RESUMABLE_CHANGES = ("stage1.epochs", "stage1.patience", "stage1.checkpoint_every", "dist.")

    def __init__(self, cfg: Config, out: Path, env: dist.DistEnv, log, resume: bool = False):
        stage = cfg.stage1
        self.cfg, self.out, self.env = cfg, out, env
        self.say = main_rank_log(log, env)
        self.t_start = time.perf_counter()
        self.inter = load_interactions(cfg.data.path, cfg.data, need_valid=True)
        self.model = build_model(cfg, self.inter)
        self.resume = Resume(out, cfg, env, resume, self.say, self.RESUMABLE_CHANGES)
        self.run_dir = self.resume.run_dir(out, cfg, env)
        self.evaluator = Evaluator(cfg, self.inter, env)
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.say(f"stage 1: {self.model.name} on {self.inter.n_users} users x "
                 f"{self.inter.n_items} items, {self.n_params} trainable parameters, features: "
                 f"{self.model.features_info}; {env.world_size} rank(s)")
        ds_cfg = stage_ds_config(stage, env.world_size, "stage1", trainable=self.n_params) \
            if self.model.trainable else None
        optimizer = (sparse_optimizer(self.model, stage, ds_cfg, self.inter.n_items, self.say)
                     if ds_cfg is not None else None)
        self.engine = None if ds_cfg is None else \
            build_engine(_LossModule(self.model), ds_cfg, optimizer=optimizer)
        precision, adam = describe_engine(ds_cfg)
        if optimizer is not None:
            how = (f"auto: {self.inter.n_items:,} items >= {SPARSE_AUTO_ITEMS:,}"
                   if stage.sparse_embeddings == "auto" else "on")
            adam = (f"RowSparseAdam (lazy rows of {', '.join(self.model.row_tables)}; "
                    f"stage1.sparse_embeddings {how})")
        self.say(dist.runtime_line(self.engine.device if self.engine else dist.device(env),
                                   precision, adam))
        # one micro batch per sampler step; DeepSpeed steps the optimizer every grad_accum of them
        self.sampler = BPRSampler(self.inter.csr("train"),
                                  stage.batch_size // max(1, stage.grad_accum), cfg.seed,
                                  env.rank, env.world_size, negatives=self.model.uses_negatives,
                                  exclude_items=self.inter.cold_items)
        self.state = RunState(cfg.eval.metric, stage.patience, ("epoch", "eval"), self.say,
                              "evaluations", best_epoch=-1)
        self.first_epoch = 0
        if self.resume.state is not None and self.engine is not None:
            saved = self.resume.state
            self.resume.checkpointer.load(self.engine, self.resume.path)
            self.state.restore(saved, epochs_run=saved["epoch"] + 1)
            self.first_epoch = saved["epoch"] + 1
            self.say(f"resumed from {self.resume.path}: epoch {saved['epoch']} done")

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training interactions; the epoch's mean loss terms."""
        model, engine, env = self.model, self.engine, self.env
        t0 = time.perf_counter()
        model.train()
        model.pre_epoch(epoch, torch.Generator().manual_seed(
            seeds.step_seed(self.cfg.seed, epoch, 0, stream=seeds.EPOCH_MODEL)))
        sums: dict[str, torch.Tensor] = {}
        for batch in progress(self.sampler.epoch(epoch), total=len(self.sampler),
                              desc=f"epoch {epoch}", unit="step", leave=False, main=env.is_main):
            batch = {k: v.to(engine.device) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            terms = engine(batch)
            engine.backward(terms["loss"])
            engine.step()
            for k, v in terms.items():   # summed on the device: no sync per step
                sums[k] = sums.get(k, 0.0) + v.detach()
        # each rank's value estimates the batch mean: average over ranks and steps
        values = np.array([float(v) for v in sums.values()])
        sums_vec = dist.allreduce_sum(values) / env.world_size
        record = {"epoch": epoch,
                  **{k: round(v / len(self.sampler), 6) for k, v in zip(sums, sums_vec)}}
        if not np.isfinite(record["loss"]):
            raise TrainingError(f"stage 1: the loss of epoch {epoch} (optimizer step "
                                f"{int(engine.global_steps)}) is {record['loss']} (terms: "
                                f"{record}); lower stage1.lr or check the features")
        self.state.times["epoch"].append(time.perf_counter() - t0)
        record["epoch_s"] = round(self.state.times["epoch"][-1], 3)
        return record

    def evaluate(self, epoch: int, record: dict) -> None:
        """Valid metrics of the model as it is; the best is kept (checkpoint + exports)."""
        t1 = time.perf_counter()
        self.model.eval()
        reps = representations(self.model)
        valid = self.evaluator(reps, "valid")
        self.state.times["eval"].append(time.perf_counter() - t1)
        record.update(valid={k: round(v, 6) for k, v in valid.items()},
                      eval_s=round(self.state.times["eval"][-1], 3))
        improved = self.state.record(epoch, valid, lambda: self.evaluator(reps, "test"),
                                     self.evaluator.cold_fn(reps))
        if improved:
            self._save_best(reps)
        record["best"] = improved
        metric = self.cfg.eval.metric
        self.say(f"epoch {epoch:4d}  loss {record.get('loss', float('nan')):.4f}  "
                 f"valid {metric} {valid[metric]:.4f}{'  *' if improved else ''}  "
                 f"({record.get('epoch_s', 0):.1f}s + eval {record['eval_s']:.1f}s)")

    def _save_best(self, reps: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.engine is not None:   # collective: every rank calls it
            self.engine.save_checkpoint(str(self.out / "checkpoints"), tag="best")
        if self.env.is_main:
            save_model_and_representations(self.out, self.model.state_dict(), reps)

    def checkpoint(self, epoch: int) -> Path:
        """A resumable checkpoint after ``epoch`` (collective); non-finite trainable weights
        stop the run here instead (TrainingError: the epoch's loss is checked already)."""
        check_finite(self.engine, {}, f"stage 1: after epoch {epoch} (optimizer step "
                                      f"{int(self.engine.global_steps)})",
                     "lower stage1.lr or check the features")
        return self.resume.checkpointer.save(self.engine, int(self.engine.global_steps), {
            "epoch": epoch, **self.state.state(), "log_lines": self.run_dir.lines,
            "config": to_dict(self.cfg)}, {})

    def run(self, stop: StopSignals | None = None) -> dict:
        """``stop``: the signal handlers the caller installed before set-up (a signal that
        arrived then stops the run after its first epoch); else installed here."""
        stage, state = self.cfg.stage1, self.state
        with own_handlers(stop) as stop:
            for epoch in state.epochs(self.first_epoch,
                                      stage.epochs if self.model.trainable else 1):
                record = self.train_epoch(epoch) if self.model.trainable else {"epoch": epoch}
                state.epochs_run = epoch + 1
                if epoch % stage.eval_every == 0 or epoch == stage.epochs - 1:
                    self.evaluate(epoch, record)
                self.run_dir.log(**record)
                if self.engine is None:
                    continue
                stopping = stop.requested()        # collective: every rank, every epoch
                if stopping or (stage.checkpoint_every
                                and state.epochs_run % stage.checkpoint_every == 0):
                    path = self.checkpoint(epoch)
                    if stopping:
                        state.stop_after_epoch(stop, epoch, path)
        metrics = self._metrics()
        self._write_best_meta()
        return state.finish(self.run_dir, metrics, self.out)

    def _metrics(self) -> dict:
        state, inter = self.state, self.inter
        return {
            "model": self.model.name, "metric": state.metric, "best_epoch": state.best["epoch"],
            "valid": state.best["valid"], "test": state.best["test"],
            **({"cold": state.best["cold"]} if state.best.get("cold") else {}),
            "epochs_run": state.epochs_run, "stopped_early": state.stopped_early,
            "trainable_params": self.n_params, "world_size": self.env.world_size,
            "n_users": inter.n_users, "n_items": inter.n_items,
            "epoch_s_mean": state.mean_time("epoch", 4), "eval_s_mean": state.mean_time("eval", 4),
            **state.summary(self.t_start),
            "provenance": provenance(self.cfg),
        }

    def _write_best_meta(self) -> None:
        best = self.state.best
        if self.env.is_main:
            atomic_write_json(self.out / "checkpoints" / "best" / "meta.json",
                              {"epoch": best["epoch"], "model": self.model.name,
                               "valid": best["valid"], "test": best["test"]})


def run_stage1(cfg: Config, out: str | Path, env: dist.DistEnv | None = None,
               log=None, resume: bool = False) -> dict:
    """The whole command on this rank; returns the metrics; messages go to ``log`` (default:
    this module's logger), on the main rank only. ``resume``: continue after the epoch of the
    newest checkpoint in ``OUT/checkpoints`` (from scratch if none)."""
    dist.check_devices()
    with StopSignals() as stop:          # from the start: a signal during set-up still stops
        env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, env, cfg.dist.deterministic)
        return Stage1Run(cfg, Path(out), env, log or _log.info, resume).run(stop)
