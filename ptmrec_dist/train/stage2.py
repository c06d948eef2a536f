"""``ptmrec stage2``: knowledge-guided parameter-efficient tuning of the backbone together with
the base recommender (the student), under a DeepSpeed engine on 1..N ranks.

* Batches stream items from the shards (:class:`~ptmrec_dist.data.readers.StreamingItems`): B
  items per step (global); for each item ``stage2.users_per_item`` training users who
  interacted with it are drawn from the item -> users CSR (1 is DESIGN.md's scheme; more give the
  recommender more interactions per backbone pass at almost no cost); items without a training
  user are skipped. The in-batch matrices are (users x B) with user r's positive at ``pos[r]``.
* The student is the stage-1 model (``stage2.teacher``'s weights; from scratch in one-stage runs
  without a teacher) whose item modal inputs are the adapted backbone's features of the batch
  items. Loss: in-batch BPR (each user's other batch items are its negatives, its known positives
  excluded) + ``stage2.kt_weight`` x the in-batch KT KL against the teacher's scores (the
  stage-1 ``user_repr``/``item_repr``).
* Every item's features live in a feature bank: written for the batch items each step,
  re-extracted with the current backbone (all ranks) every epoch; the student ranks with it
  (FREEDOM rebuilds its item-item graph from it).
* Each epoch: re-extract, evaluate on valid, early stop after ``stage2.patience`` epochs without
  improvement, keep the best (epoch -1 is the state before training).

Outputs (main rank): ``OUT/adapter.safetensors`` (the PEFT method's trainable weights),
``OUT/checkpoints/best/model.safetensors`` (student), ``OUT/features/`` (the adapted backbone's
features of every item, loadable as ``data.features``), ``OUT/user_repr.npy``/``item_repr.npy``,
``OUT/metrics.json``, ``OUT/log.jsonl``, ``OUT/config.yaml``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist import dist, seeds
from ptmrec_dist.clip.extract import Preprocess, extract_all
from ptmrec_dist.clip.methods import param_counts, tower_of, trainable_state_dict
from ptmrec_dist.config import Config, to_dict
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.data.readers import SharedEpoch, StreamingItems
from ptmrec_dist.errors import ConfigError, TrainingError
from ptmrec_dist.eval.evaluate import Evaluator
from ptmrec_dist.logs import get_logger, progress as progress_bar
from ptmrec_dist.run import provenance
from ptmrec_dist.train.bank import FeatureBank
from ptmrec_dist.train.checkpoint import (StopSignals, check_finite, loader_worker_options,
                                          own_handlers)
from ptmrec_dist.train.engine import (build_engine, describe_engine, set_group_lr,
                                      stage_ds_config, warmup_schedule, zero_stage)
from ptmrec_dist.train.outputs import representations, save_stage2_best
from ptmrec_dist.train.runstate import Resume, RunState, interrupted, main_rank_log
from ptmrec_dist.train.sampler import UserSampler, item_batches
from ptmrec_dist.train.stage2_model import (FeatureGate, GradNormProbe, Stage2Model,
                                            backbone_groups, build_backbone, build_student,
                                            build_teacher_head, check_dims, check_stage2_config,
                                            load_teacher)

_log = get_logger(__name__)

@dataclass
class Position:
    """Where training starts: an epoch, the micro steps of it already done, and the partial
    loss sums and item count of those steps (a run resumed mid-epoch)."""
    epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=dict)
    items_seen: int = 0


class Stage2Run:
    """One ``ptmrec stage2`` run on this rank: :meth:`__init__` builds everything (teacher,
    student, adapted backbone, engine, item stream; the checkpoint's state when resuming),
    :meth:`run` trains and returns the metrics."""

    # settings that may change between a run and its resumption (the rest must not)
    RESUMABLE_CHANGES = ("stage2.epochs", "stage2.patience", "stage2.checkpoint_every",
                         "stage2.keep_checkpoints", "dist.", "backbone.name_or_path")

    def __init__(self, cfg: Config, out: Path, env: dist.DistEnv, log, resume: bool = False,
                 on_epoch=None):
        stage = cfg.stage2
        self.cfg, self.out, self.env, self.on_epoch = cfg, out, env, on_epoch
        self.say = main_rank_log(log, env)
        self.t_start = time.perf_counter()
        check_stage2_config(cfg)
        self.device = dist.device(env)
        self.inter = load_interactions(cfg.data.path, cfg.data)
        self.teacher = load_teacher(cfg)
        # the frozen features only seed the student and the prompt init: not kept for the run
        self.student, frozen_features = build_student(cfg, self.inter, self.teacher, self.device)
        if stage.graph_refresh_every and not self.student.derives_from_features:
            raise ConfigError(f"config key 'stage2.graph_refresh_every' rebuilds what a model "
                              f"derives from the features (freedom's item graph); "
                              f"{self.student.name} reads its features directly: set it to 0")
        self.backbone, self.backbone_hash, self.knowledge_guided = build_backbone(
            cfg, frozen_features, self.teacher, self.device)
        self.shards = cfg.data.shards          # a folder, URL, brace list or pipe:
        self.resume = Resume(out, cfg, env, resume, self.say, self.RESUMABLE_CHANGES,
                             stage.keep_checkpoints, self.backbone_hash)
        self.run_dir = self.resume.run_dir(out, cfg, env)
        self.evaluator = Evaluator(cfg, self.inter, env)
        head = build_teacher_head(cfg, self.inter, self.teacher, frozen_features, self.device) \
            if stage.kt_target == "content" else None
        gate = FeatureGate({m: torch.from_numpy(frozen_features.get(m))
                            for m in self.student.modalities}) if stage.feature_gate else None
        self.model = Stage2Model(self.backbone, self.student, self.teacher, stage.kt_weight,
                                 stage.kt_tau, stage.kt_target, head, gate).to(self.device)
        self.counts = {"backbone": param_counts(self.backbone),
                       "recommender": param_counts(self.student)}
        self.engine, self.ds_cfg = self._engine()
        # how far the backbone's trainable weights moved (relative L2), logged per epoch;
        # skipped for methods that train most of the backbone (a second copy of it)
        bb = self.counts["backbone"]
        self.initial_trainable = trainable_state_dict(self.backbone) \
            if 0 < bb["trainable"] <= 0.1 * bb["total"] else None
        self.sampler = UserSampler(self.inter.csr("train"), cfg.seed)
        # what the loader's workers read: the epoch they stream, micro steps to skip at its start
        self.stream_epoch, self.stream_skip = SharedEpoch(0), SharedEpoch(0)
        self.loader = self._loader()
        self.meta = {"method": self.backbone.method, "backbone": self.backbone.name_or_path,
                     "prompt_len": stage.prompt_len, "prompt_depth": stage.prompt_depth,
                     "coupled": cfg.peft.coupled, "recommender": self.student.name}
        self.state = RunState(cfg.eval.metric, stage.patience, ("train", "extract", "eval"),
                              self.say, "epochs")
        self.bank = FeatureBank(self.student)
        self.start = Position()
        if self.resume.state is not None:
            self.start = self._restore()

    # ------------------------------------------------------------------ set-up
    def _engine(self):
        stage = self.cfg.stage2
        groups = backbone_groups(self.model, stage) + [
            {"params": [p for p in self.student.parameters() if p.requires_grad],
             "lr": stage.rec_lr}]
        ds_cfg = stage_ds_config(stage, self.env.world_size, "stage2",
                                 trainable=sum(p.numel() for g in groups for p in g["params"]))
        if zero_stage(ds_cfg) == 3 and stage.compile:
            raise ConfigError("config key 'stage2.compile' with ZeRO-3 (stage2.ds_config) is not "
                              "tested: compiled layers and ZeRO-3's per-module parameter hooks; "
                              "use ZeRO-2, or compile=false")
        if zero_stage(ds_cfg) == 3 and stage.grad_norms_every:
            raise ConfigError("config key 'stage2.grad_norms_every' needs whole parameters: "
                              "ZeRO-0/1/2 (stage2.ds_config), not ZeRO-3")
        if zero_stage(ds_cfg) == 3:
            # the recommenders read their tables directly (not through a submodule call), so
            # ZeRO-3 must gather them around the whole forward
            import deepspeed
            for p in self.student.parameters():
                deepspeed.zero.register_external_parameter(self.model, p)
        engine = build_engine(self.model, ds_cfg,
                              param_groups=[g for g in groups if g["params"]],
                              lr_scheduler=warmup_schedule(stage.warmup_steps))
        return engine, ds_cfg

    def _loader(self):
        from torch.utils.data import DataLoader

        stage, env = self.cfg.stage2, self.env
        micro = stage.batch_size // (env.world_size * stage.grad_accum)
        reader = StreamingItems(self.shards, rank=env.rank, world_size=env.world_size,
                                num_workers=stage.num_workers, seed=self.cfg.seed,
                                epoch=self.stream_epoch,
                                on_bad_sample=self.cfg.data.on_bad_sample,
                                batch_size=micro, skip=self.stream_skip,
                                passes=stage.passes_per_epoch)
        return DataLoader(reader, batch_size=micro,
                          num_workers=stage.num_workers, collate_fn=Preprocess(self.backbone),
                          persistent_workers=stage.num_workers > 0,
                          **loader_worker_options(),
                          pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ checkpoints
    def _restore(self) -> Position:
        """Engine, RNG, bookkeeping and the feature bank of the checkpoint (collective); where
        training goes on."""
        saved, path = self.resume.state, self.resume.path
        rank_state = self.resume.checkpointer.load(self.engine, path)
        self.state.restore(saved, epochs_run=saved["epochs_run"])
        self.bank.restore(self.resume.checkpointer, path, saved["bank_keys"],
                          rank_state["written"])
        every = self.cfg.stage2.graph_refresh_every
        if every and not saved["epoch_done"]:
            if saved["step"] % every == 0:     # the graph was rebuilt at this very step
                self.student.rebuild_derived()
            else:
                self.say(f"resumed at optimizer step {saved['step']}, not a multiple of "
                         f"stage2.graph_refresh_every ({every}): the item graph is the "
                         "epoch start's until the next rebuild (not bit-exact)")
        where = "done" if saved["epoch_done"] else f"after micro step {saved['next_step']}"
        self.say(f"resumed from {path}: epoch {saved['epoch']} {where}, optimizer "
                 f"step {saved['step']}")
        if saved["epoch_done"]:
            return Position(epoch=saved["epoch"] + 1)
        return Position(saved["epoch"], saved["next_step"], rank_state["sums"],
                        rank_state["items_seen"])

    def checkpoint(self, epoch: int, next_step: int, epoch_done: bool, sums: dict,
                   items_seen: int) -> Path:
        """A resumable checkpoint (collective): after ``next_step`` micro steps of ``epoch``,
        or after the epoch and its evaluation (``epoch_done``). A non-finite loss so far or
        non-finite trainable weights stop the run here instead (TrainingError), on every rank."""
        where = f"after epoch {epoch}" if epoch_done else \
            f"at epoch {epoch}, micro step {next_step}"
        check_finite(self.engine, sums, f"stage 2: {where} (optimizer step "
                                        f"{int(self.engine.global_steps)})",
                     "lower stage2.lr / stage2.rec_lr")
        state = {"epoch": epoch, "next_step": next_step, "epoch_done": epoch_done,
                 **self.state.state(), "log_lines": self.run_dir.lines,
                 "bank_keys": self.bank.keys(), "backbone_sha256": self.backbone_hash,
                 "config": to_dict(self.cfg)}
        rank_state = {"written": self.bank.rank_rows(),
                      "sums": {k: v.detach().cpu() for k, v in sums.items()},
                      "items_seen": items_seen}
        path = self.resume.checkpointer.save(
            self.engine, int(self.engine.global_steps), state, rank_state, self.bank.arrays(),
            link_from=self.bank.saved_in)
        self.bank.saved_in = path
        return path

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int, stop: StopSignals | None = None) -> tuple[dict, int]:
        """One pass over the item stream (the rest of it, when resumed mid-epoch); the epoch's
        record (mean loss terms, time, items) and the number of micro steps it ended at."""
        stage, env, engine = self.cfg.stage2, self.env, self.engine
        t0 = time.perf_counter()
        first = self.start.step if epoch == self.start.epoch else 0
        sums: dict[str, torch.Tensor] = dict(self.start.sums) if first else {}
        items_seen = self.start.items_seen if first else 0
        self.stream_epoch.set(epoch)
        self.stream_skip.set(first)
        engine.module.train()
        if stage.rec_warmup_epochs:      # every epoch: a resumed run restores the saved rate
            set_group_lr(engine, -1, 0.0 if epoch < stage.rec_warmup_epochs else stage.rec_lr)
        self.student.pre_epoch(epoch, torch.Generator().manual_seed(
            seeds.epoch_seed(self.cfg.seed, epoch)))
        steps, refreshes = first, 0
        probe = GradNormProbe(self.model, stage.grad_norms_every)
        batches = item_batches(self.loader, self.sampler, epoch, env.rank, engine.device,
                               stage.popularity_weighting, stage.users_per_item,
                               first_step=first,
                               loader_start=self.loader.dataset.skip_start(first))
        for batch in progress_bar(batches, total=sum(self.loader.dataset.worker_batches()),
                                  initial=first, desc=f"epoch {epoch}", unit="step",
                                  leave=False, main=env.is_main):
            probe.before(steps)
            losses, features = engine(batch)
            probe.after()
            engine.backward(losses["loss"])
            engine.step()
            self.bank.write(batch["items"], features)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            steps += 1
            items_seen += len(batch["items"]) if batch["weight"] else 0
            if steps % stage.grad_accum:
                continue                      # mid-accumulation: nothing can be saved here
            if stage.graph_refresh_every and \
                    engine.global_steps % stage.graph_refresh_every == 0:
                self.student.rebuild_derived()      # from the bank, batch rows written
                refreshes += 1
            if stop is not None and stop.due(steps // stage.grad_accum, env.world_size,
                                             stage.stop_check_every) and stop.requested():
                path = self.checkpoint(epoch, steps, False, sums, items_seen)
                raise interrupted(stop, f"at epoch {epoch}, step {steps}", path)
            if stage.checkpoint_every > 0 and engine.global_steps % stage.checkpoint_every == 0:
                self.checkpoint(epoch, steps, False, sums, items_seen)
        self.stream_skip.set(0)
        values = dist.allreduce_sum(np.array([float(v) for v in sums.values()] + [items_seen]))
        record = {"epoch": epoch, **{k: round(v / (steps * env.world_size), 6)
                                     for k, v in zip(sums, values[:-1])}}
        if not np.isfinite(record["loss"]):
            raise TrainingError(f"stage 2: the loss of epoch {epoch} is {record['loss']} "
                                f"(terms: {record}); lower stage2.lr / stage2.rec_lr")
        train_s = time.perf_counter() - t0
        self.state.times["train"].append(train_s)
        if stage.graph_refresh_every:
            record["graph_refreshes"] = refreshes
        return {**record, **probe.record(), "train_s": round(train_s, 3),
                "items": int(values[-1]), "items_per_s": round(values[-1] / train_s, 1)}, steps

    def refresh_bank(self, first: bool = False) -> dict:
        """Re-extract every item's features with the current backbone (all ranks) into the
        bank; returns the extraction (``image``, ``text``, ``present``)."""
        t0 = time.perf_counter()
        self.engine.module.eval()
        features = extract_all(self.backbone, self.shards, self.cfg, self.env, self.device,
                               verify=first, show_progress=True,
                               modalities=tuple(self.student.modalities),
                               loader_options=loader_worker_options())
        if first:
            check_dims(self.student, features)
        if self.model.gate is not None:
            with torch.no_grad():
                gated = self.model.gate(None, {m: torch.from_numpy(features[m])
                                               for m in self.model.gate.modalities})
            features = {**features, **{m: v.cpu().numpy() for m, v in gated.items()}}
        self.bank.reset(features)
        self.state.times["extract"].append(time.perf_counter() - t0)
        return features

    def evaluate(self, epoch: int, record: dict, features: dict) -> None:
        """Valid metrics of the student on the refreshed bank; the best is kept (exports)."""
        env, metric = self.env, self.cfg.eval.metric
        t1 = time.perf_counter()
        with dist.gathered(list(self.student.parameters())):
            users_r, items_r = representations(self.student)
        reps = (users_r.float(), items_r.float())
        valid = self.evaluator(reps, "valid")
        self.state.times["eval"].append(time.perf_counter() - t1)
        improved = self.state.record(epoch, valid, lambda: self.evaluator(reps, "test"),
                                     self.evaluator.cold_fn(reps))
        if improved:
            save_stage2_best(self.out, self.backbone, self.student, features, reps, self.meta,
                             env, self.cfg.extract.feature_dtype, self.model.gate)
        if self.initial_trainable is not None:
            record["backbone_shift"], record["backbone_shift_tower"] = self.backbone_shift()
        if self.model.gate is not None:
            record["gate"] = self.model.gate.values()
        record.update(valid={k: round(v, 6) for k, v in valid.items()}, best=improved,
                      extract_s=round(self.state.times["extract"][-1], 3),
                      eval_s=round(self.state.times["eval"][-1], 3))
        self.run_dir.log(**record)
        loss = f"loss {record['loss']:.4f}" if "loss" in record else "before training"
        self.say(f"epoch {epoch:3d}  {loss}  valid {metric} {valid[metric]:.4f}"
                 f"{'  *' if improved else ''}  (train {record.get('train_s', 0):.1f}s, "
                 f"re-extract {record['extract_s']:.1f}s, eval {record['eval_s']:.1f}s)")

    def backbone_shift(self) -> tuple[float, dict[str, float]]:
        """How far the trainable backbone weights moved from their start (relative L2), in all
        and per tower."""
        now = trainable_state_dict(self.backbone)

        def shift(keys) -> float:
            moved = sum(float((now[k] - self.initial_trainable[k]).pow(2).sum()) for k in keys)
            size = sum(float(self.initial_trainable[k].pow(2).sum()) for k in keys)
            return round((moved / max(size, 1e-30)) ** 0.5, 6)
        towers = {t: [k for k in now if tower_of(k) == t] for t in ("text", "vision")}
        return shift(list(now)), {t: shift(keys) for t, keys in towers.items() if keys}

    # ------------------------------------------------------------------ the run
    def run(self, stop: StopSignals | None = None) -> dict:
        """``stop``: the signal handlers the caller installed before set-up; else installed
        here. A signal that arrived during set-up (epoch -1's re-extraction included) ends the
        run before its first step, with exit 3 like any stop."""
        stage, state = self.cfg.stage2, self.state
        bb = self.counts["backbone"]
        self.say(dist.runtime_line(self.engine.device, *describe_engine(self.ds_cfg)))
        self.say(f"stage 2: {self.student.name} + {self.backbone.method} on "
                 f"{self.inter.n_users} users x {self.inter.n_items} items; backbone trainable "
                 f"{bb['trainable']} of {bb['total']} ({bb['trainable_pct']}%); teacher: "
                 f"{self.teacher['run'] if self.teacher else 'none (one stage)'}; "
                 f"{self.env.world_size} rank(s), ZeRO-{zero_stage(self.ds_cfg)}"
                 f"{'; bf16' if self.ds_cfg.get('bf16', {}).get('enabled') else ''}")
        with own_handlers(stop) as stop:
            if self.resume.path is None:            # epoch -1: the state before training
                self.evaluate(-1, {"epoch": -1}, self.refresh_bank(first=True))
            if stop.requested():                    # collective: every rank, once
                raise interrupted(stop, "during set-up, before the first step", None)
            for epoch in state.epochs(self.start.epoch, stage.epochs):
                record, steps = self.train_epoch(epoch, stop)
                state.epochs_run = epoch + 1
                self.evaluate(epoch, record, self.refresh_bank())
                stopping = stop.requested()      # collective: every rank, every epoch
                path = None
                if stage.checkpoint_every >= 0 or stopping:
                    if steps % stage.grad_accum == 0:
                        path = self.checkpoint(epoch, 0, True, {}, 0)
                    else:
                        self.say(f"epoch {epoch}: {steps} micro steps is not a multiple of "
                                 f"stage2.grad_accum ({stage.grad_accum}): gradients are "
                                 "mid-accumulation, no epoch-end checkpoint")
                if self.on_epoch is not None:    # after the checkpoint: a retry resumes here
                    self.on_epoch(self.progress(epoch, record))
                if stopping:
                    state.stop_after_epoch(stop, epoch, path)
        return state.finish(self.run_dir, self._metrics(), self.out)

    def progress(self, epoch: int, record: dict) -> dict:
        """What an epoch reports to a sweep (the same on every rank): this epoch's loss and
        valid metrics, and the best epoch so far with its valid and test metrics."""
        best = self.state.best
        return {"epoch": epoch, "epochs": epoch + 1, "loss": record.get("loss"),
                "valid": dict(record["valid"]), "best_epoch": best["epoch"],
                "best_valid": dict(best["valid"]), "best_test": dict(best["test"])}

    def _metrics(self) -> dict:
        stage, counts, state = self.cfg.stage2, self.counts, self.state
        return {
            "model": self.student.name, "method": self.backbone.method,
            "metric": state.metric,
            "teacher": self.teacher["run"] if self.teacher else None, "kt_weight": stage.kt_weight,
            "prompt_init": self.cfg.peft.prompt_init if self.backbone.prompts is not None
            else None,
            "knowledge_init": self.knowledge_guided, "kt_target": stage.kt_target,
            "feature_gate": self.model.gate.values() if self.model.gate is not None else None,
            "best_epoch": state.best["epoch"],
            "valid": state.best["valid"], "test": state.best["test"],
            **({"cold": state.best["cold"]} if state.best.get("cold") else {}),
            "epochs_run": state.epochs_run, "stopped_early": state.stopped_early,
            "params": counts,
            "trainable_params": counts["backbone"]["trainable"]
            + counts["recommender"]["trainable"],
            "world_size": self.env.world_size,
            "bf16": bool(self.ds_cfg.get("bf16", {}).get("enabled")),
            "train_s_mean": state.mean_time("train", 3),
            "extract_s_mean": state.mean_time("extract", 3),
            "eval_s_mean": state.mean_time("eval", 3),
            **state.summary(self.t_start),
            "provenance": provenance(self.cfg),
        }


def run_stage2(cfg: Config, out: str | Path, env: dist.DistEnv | None = None,
               log=None, resume: bool = False, on_epoch=None) -> dict:
    """The whole command on this rank (see the module doc); returns the metrics; messages go
    to ``log`` (default: this module's logger), on the main rank only. ``resume``:
    continue from the newest checkpoint in ``OUT/checkpoints`` (from scratch if none).
    ``on_epoch(progress)`` is called on every rank after each trained epoch's evaluation and
    checkpoint (:meth:`Stage2Run.progress`; ``ptmrec tune`` reports it to Ray Tune)."""
    dist.check_devices()
    with StopSignals() as stop:          # from the start: a signal during set-up still stops
        env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, env, cfg.dist.deterministic)
        return Stage2Run(cfg, Path(out), env, log or _log.info, resume, on_epoch).run(stop)
