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

import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptmrec_dist import dist
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.extract import Preprocess, extract_all
from ptmrec_dist.clip.methods import (apply_method, param_counts, save_trainable,
                                      trainable_state_dict)
from ptmrec_dist.config import Config, load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.data.readers import SharedEpoch, StreamingItems
from ptmrec_dist.errors import ConfigError, InputError, Interrupted, TrainingError
from ptmrec_dist.eval.evaluate import Evaluator
from ptmrec_dist.io import atomic_save_npy, atomic_write_json
from ptmrec_dist.rec.base import terms
from ptmrec_dist.run import RunDir
from ptmrec_dist.train.checkpoint import Checkpointer, StopSignals, latest_checkpoint
from ptmrec_dist.train.engine import (build_engine, gathered, stage_ds_config, warmup_schedule,
                                      zero_stage)
from ptmrec_dist.train.losses import in_batch_bpr, kt_loss
from ptmrec_dist.train.sampler import UserSampler, item_batches
from ptmrec_dist.train.stage1 import (_representations, build_model,
                                      save_model_and_representations)


class Stage2Model(nn.Module):
    """What the engine runs: adapted backbone + student; ``batch -> loss terms``."""

    def __init__(self, backbone, student, teacher: dict | None, kt_weight: float, tau: float):
        super().__init__()
        self.backbone, self.student = backbone, student
        self.kt_weight, self.tau = kt_weight, tau
        self.has_teacher = teacher is not None
        if teacher is not None:
            self.register_buffer("teacher_users", teacher["users"], persistent=False)
            self.register_buffer("teacher_items", teacher["items"], persistent=False)

    def forward(self, batch: dict) -> dict:
        image, text = self.backbone(batch["pixel_values"], batch["input_ids"],
                                    batch["attention_mask"])
        dtype = next(self.student.parameters()).dtype
        modal = {m: f.to(dtype) for m, f in (("image", image), ("text", text))
                 if m in self.student.modalities}
        users, items = batch["users"], batch["items"]
        out = self.student.stage2_scores(users, items, modal)
        bpr = sum(w * in_batch_bpr(s, batch["known"], batch.get("row_weights"), batch["pos"])
                  for w, s in out["bpr"])
        values = {"bpr": bpr, "reg": out["reg"]}
        loss = bpr + out["reg"]
        if self.has_teacher:
            teacher = self.teacher_users[users].float() @ self.teacher_items[items].float().T
            kt = kt_loss(teacher, out["student"], self.tau)
            values["kt"] = kt
            loss = loss + self.kt_weight * kt
        result = terms(loss=loss * batch["weight"], **values)
        result["modal"] = {m: f.detach() for m, f in modal.items()}
        return result


def load_teacher(cfg: Config) -> dict | None:
    """The stage-1 run in ``stage2.teacher``: representations, weights, and its config (whose
    recommender must be the one configured here)."""
    if not cfg.stage2.teacher:
        return None
    run = Path(cfg.stage2.teacher)
    files = {k: run / f for k, f in (("users", "user_repr.npy"), ("items", "item_repr.npy"),
                                      ("weights", "checkpoints/best/model.safetensors"),
                                      ("config", "config.yaml"))}
    for f in files.values():
        if not f.is_file():
            raise InputError(f, "missing: stage2.teacher must be a finished `ptmrec stage1` run")
    tcfg = load_config(files["config"])
    for key in ("name", "embedding_dim", "feat_embed_dim"):
        mine, theirs = getattr(cfg.recommender, key), getattr(tcfg.recommender, key)
        if mine != theirs:
            raise ConfigError(f"config key 'recommender.{key}' is {mine!r} but the teacher "
                              f"{run} was trained with {theirs!r}")
    return {"users": torch.from_numpy(np.load(files["users"])),
            "items": torch.from_numpy(np.load(files["items"])),
            "weights": files["weights"], "run": str(run)}


def knowledge_init(backbone, feats, teacher_items: torch.Tensor) -> dict:
    """Knowledge-guided prompt initialisation: each tower's prompts start as the directions of
    its feature space that the teacher's item representations load on most
    (:func:`~ptmrec_dist.clip.prompts.teacher_directions`), mapped into the tower's width by the
    pseudo-inverse of its projection and scaled like the tokens they sit among."""
    from ptmrec_dist.clip.prompts import teacher_directions, to_width

    learner, clip = backbone.prompts, backbone.clip
    n = learner.prompt_len
    out = {}
    for m, proj, scale in (
            ("text", clip.text_projection.weight,
             float(clip.text_model.embeddings.token_embedding.weight.norm(dim=1).mean())),
            ("image", clip.visual_projection.weight,
             float(clip.vision_model.pre_layrnorm.weight.norm()))):
        f = feats.get(m)
        if f is None or f.shape[1] != proj.shape[0]:
            raise ConfigError(f"peft.prompt_init=teacher needs {m} features of this backbone "
                              f"({proj.shape[0]}-d) in data.features; set peft.prompt_init=random")
        out[m] = to_width(teacher_directions(f, teacher_items.numpy(), n), proj, scale)
    learner.init_from(out["text"], out["image"])
    return {m: v.shape for m, v in out.items()}


def _check_dims(student, bank: dict) -> None:
    for m, table in student.item_modal_inputs().items():
        if table.shape[1] != bank[m].shape[1]:
            raise ConfigError(f"the recommender's {m} inputs are {table.shape[1]}-d "
                              f"(data.features) but the backbone gives {bank[m].shape[1]}-d: "
                              "stage 2 needs data.features extracted with backbone.name_or_path")


def _save_best(out: Path, model: Stage2Model, bank: dict, reps, meta: dict, env, cfg) -> None:
    # collectives first (ZeRO-3 gathers on every rank), then the main rank writes
    save_trainable(model.backbone, out / "adapter.safetensors", meta, write=env.is_main)
    with gathered(list(model.student.parameters())):
        state = {k: v.detach().cpu().clone() for k, v in model.student.state_dict().items()}
    if not env.is_main:
        return
    save_model_and_representations(out, state, reps)
    dtype = np.float16 if cfg.extract.feature_dtype == "fp16" else np.float32
    for key in ("image", "text"):
        atomic_save_npy(out / "features" / f"{key}.npy", bank[key].astype(dtype))
    atomic_save_npy(out / "features" / "present.npy", bank["present"])
    atomic_write_json(out / "features" / "meta.json", {**meta, "dtype": cfg.extract.feature_dtype})


class Stage2Run:
    """One ``ptmrec stage2`` run on this rank: :meth:`__init__` builds everything (teacher,
    student, adapted backbone, engine, item stream), :meth:`run` trains and returns the
    metrics."""

    def __init__(self, cfg: Config, out: Path, env: dist.DistEnv, log, resume: bool = False,
                 on_epoch=None):
        s = self.s = cfg.stage2
        self.cfg, self.out, self.env, self.on_epoch = cfg, out, env, on_epoch
        self.say = log if env.is_main else (lambda *_: None)
        self.t_start = time.perf_counter()
        if not cfg.data.shards:
            raise ConfigError("stage 2 streams items from shards: set data.shards "
                              "(`ptmrec shard`)")
        if s.kt_weight > 0 and not s.teacher:
            raise ConfigError("config key 'stage2.kt_weight' > 0 needs a teacher: set "
                              "stage2.teacher to a stage-1 run folder (or kt_weight=0 for one "
                              "stage)")
        self.device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() \
            else torch.device("cpu")
        self.inter = load_interactions(cfg.data.path, cfg.data)
        self.teacher = load_teacher(cfg)
        self.student = self._student()
        self.backbone, self.knowledge_init = self._backbone()
        self.shards = Path(cfg.data.shards)
        self.checkpointer = Checkpointer(out / "checkpoints", env, s.keep_checkpoints)
        self.resume_from = latest_checkpoint(out / "checkpoints") if resume else None
        if resume and self.resume_from is None:
            self.say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        if self.resume_from is None and self.checkpointer.clear():
            self.say(f"removed the resumable checkpoints of an earlier run in "
                     f"{out / 'checkpoints'}")
        # checked before anything is built from it
        self.resume_state = None if self.resume_from is None else self.checkpointer.read(
            self.resume_from, cfg, self.RESUMABLE_CHANGES, self.backbone_hash)
        self.run_dir = RunDir(out, cfg, env.is_main).start(
            self.resume_state["log_lines"] if self.resume_state else None)
        self.evaluator = Evaluator(cfg, self.inter, env)
        self.model = Stage2Model(self.backbone, self.student, self.teacher, s.kt_weight,
                                 s.kt_tau).to(self.device)
        self.counts = {"backbone": param_counts(self.backbone),
                       "recommender": param_counts(self.student)}
        self.engine, self.ds_cfg = self._engine()
        # how far the backbone's trainable weights moved (relative L2), logged per epoch;
        # skipped for methods that train most of the backbone (a second copy of it)
        bb = self.counts["backbone"]
        self.init_state = trainable_state_dict(self.backbone) \
            if 0 < bb["trainable"] <= 0.1 * bb["total"] else None
        self.sampler = UserSampler(self.inter.csr("train"), cfg.seed)
        self.epoch_ref, self.skip_ref = SharedEpoch(0), SharedEpoch(0)
        self.loader = self._loader()
        self.meta = {"method": self.backbone.method, "backbone": self.backbone.name_or_path,
                     "prompt_len": s.prompt_len, "prompt_depth": s.prompt_depth,
                     "coupled": cfg.peft.coupled, "recommender": self.student.name}
        self.best = {"epoch": None, "valid": None, "test": None}
        self.times = {"train": [], "extract": [], "eval": []}
        self.bad = 0
        # resumable state: the feature bank as the epoch began (numpy, all ranks alike), the
        # items this rank wrote into it since, where the last checkpoint of this epoch is
        self.bank_start: dict[str, np.ndarray] = {}
        self.written: set[int] = set()
        self.bank_ckpt: Path | None = None
        self.epochs_run, self.stopped_early = 0, False
        self.start = {"epoch": 0, "step": 0, "sums": {}, "items_seen": 0}
        if self.resume_state is not None:
            self._restore()

    # ------------------------------------------------------------------ set-up
    def _student(self):
        from ptmrec_dist import rec
        from ptmrec_dist.rec.features import resolve_features

        name = self.cfg.recommender.name
        if not rec.model_class(name).needs_features:
            raise ConfigError(f"recommender.name={name} uses no item features: stage 2 "
                              "adapts the backbone that produces them (use vbpr, freedom or bm3)")
        # the frozen features: the student's initial inputs and the knowledge-guided init's
        self.frozen = resolve_features(self.cfg.data, self.inter.path, self.inter.n_items,
                                       required=True)
        student = build_model(self.cfg, self.inter, self.frozen)
        if self.teacher is not None:
            from safetensors.torch import load_file
            student.load_state_dict(load_file(str(self.teacher["weights"])))
        return student.to(self.device)

    def _backbone(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)              # the same prompts / adapters on every rank
        frozen = load_backbone(cfg.backbone)
        # recorded in every checkpoint: a resumed run must rebuild the same pretrained weights
        self.backbone_hash = frozen.weights_hash()
        backbone = apply_method(frozen, cfg)
        if self.s.compile:
            for tower in (backbone.clip.vision_model, backbone.clip.text_model):
                for layer in tower.encoder.layers:
                    layer.compile()
        guided = False
        if backbone.prompts is not None and cfg.peft.prompt_init == "teacher":
            if self.teacher is None:
                raise ConfigError("peft.prompt_init=teacher needs stage2.teacher; use "
                                  "peft.prompt_init=random for one-stage runs")
            knowledge_init(backbone, self.frozen, self.teacher["items"])
            guided = True
        return backbone.to(self.device), guided

    def _engine(self):
        s = self.s
        groups = [{"params": [p for p in self.backbone.parameters() if p.requires_grad],
                   "lr": s.lr},
                  {"params": [p for p in self.student.parameters() if p.requires_grad],
                   "lr": s.rec_lr}]
        ds_cfg = stage_ds_config(s, self.env.world_size, "stage2",
                                 trainable=sum(p.numel() for g in groups for p in g["params"]))
        if zero_stage(ds_cfg) == 3:
            # the recommenders read their tables directly (not through a submodule call), so
            # ZeRO-3 must gather them around the whole forward
            import deepspeed
            for p in self.student.parameters():
                deepspeed.zero.register_external_parameter(self.model, p)
        engine = build_engine(self.model, ds_cfg,
                              param_groups=[g for g in groups if g["params"]],
                              lr_scheduler=warmup_schedule(s.warmup_steps))
        return engine, ds_cfg

    def _loader(self):
        from torch.utils.data import DataLoader

        s, env = self.s, self.env
        micro = s.batch_size // (env.world_size * s.grad_accum)
        reader = StreamingItems(self.shards, rank=env.rank, world_size=env.world_size,
                                num_workers=s.num_workers, seed=self.cfg.seed,
                                epoch=self.epoch_ref, on_bad_sample=self.cfg.data.on_bad_sample,
                                batch_size=micro, skip=self.skip_ref)
        return DataLoader(reader, batch_size=micro,
                          num_workers=s.num_workers, collate_fn=Preprocess(self.backbone),
                          persistent_workers=s.num_workers > 0)

    # ------------------------------------------------------------------ checkpoints
    # settings that may change between a run and its resumption (the rest must not)
    RESUMABLE_CHANGES = ("stage2.epochs", "stage2.patience", "stage2.checkpoint_every",
                         "stage2.keep_checkpoints", "dist.", "backbone.name_or_path")

    def _restore(self) -> None:
        """Engine, RNG, bookkeeping and the feature bank of the checkpoint (collective)."""
        state = self.resume_state
        rank_state = self.checkpointer.load(self.engine, self.resume_from)
        self.best, self.bad = state["best"], state["bad"]
        self.times, self.epochs_run = state["times"], state["epochs_run"]
        self.bank_start = {k: self.checkpointer.array(self.resume_from, f"bank_{k}")
                           for k in state["bank_keys"]}
        self.student.set_modal_inputs({m: torch.from_numpy(self.bank_start[m])
                                       for m in self.student.modalities})
        written = rank_state["written"]
        if len(written["items"]):
            self.student.update_modal_inputs(written["items"], written["values"])
        self.written = set(written["items"].tolist())
        self.bank_ckpt = self.resume_from
        if state["epoch_done"]:
            self.start = {"epoch": state["epoch"] + 1, "step": 0, "sums": {}, "items_seen": 0}
        else:
            self.start = {"epoch": state["epoch"], "step": state["next_step"],
                          "sums": rank_state["sums"], "items_seen": rank_state["items_seen"]}
        where = "done" if state["epoch_done"] else f"after micro step {state['next_step']}"
        self.say(f"resumed from {self.resume_from}: epoch {state['epoch']} {where}, optimizer "
                 f"step {state['step']}")

    def checkpoint(self, epoch: int, next_step: int, epoch_done: bool, sums: dict,
                   items_seen: int) -> Path:
        """A resumable checkpoint (collective): after ``next_step`` micro steps of ``epoch``,
        or after the epoch and its evaluation (``epoch_done``)."""
        from ptmrec_dist.config import to_dict
        student = self.student
        items = torch.tensor(sorted(self.written), dtype=torch.long)
        tables = student.item_modal_inputs()
        values = {m: t.detach()[items.to(t.device)].cpu() for m, t in tables.items()}
        state = {"epoch": epoch, "next_step": next_step, "epoch_done": epoch_done,
                 "best": self.best, "bad": self.bad, "times": self.times,
                 "epochs_run": self.epochs_run, "log_lines": self.run_dir.lines,
                 "bank_keys": sorted(self.bank_start), "backbone_sha256": self.backbone_hash,
                 "config": to_dict(self.cfg)}
        rank_state = {"written": {"items": items, "values": values},
                      "sums": {k: v.detach().cpu() for k, v in sums.items()},
                      "items_seen": items_seen}
        path = self.checkpointer.save(
            self.engine, int(self.engine.global_steps), state, rank_state,
            {f"bank_{k}": v for k, v in self.bank_start.items()},
            link_from=self.bank_ckpt)
        self.bank_ckpt = path
        return path

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int, stop: StopSignals | None = None) -> dict:
        s, env, engine, student = self.s, self.env, self.engine, self.student
        t0 = time.perf_counter()
        first = self.start["step"] if epoch == self.start["epoch"] else 0
        sums: dict[str, torch.Tensor] = dict(self.start["sums"]) if first else {}
        items_seen = self.start["items_seen"] if first else 0
        self.epoch_ref.set(epoch)
        self.skip_ref.set(first)
        engine.module.train()
        student.pre_epoch(epoch, torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.cfg.seed, epoch, 3]).generate_state(1)[0])))
        steps = first
        for batch in item_batches(self.loader, self.sampler, epoch, env.rank, engine.device,
                                  s.popularity_weighting, s.users_per_item, first_step=first,
                                  loader_start=self.loader.dataset.skip_start(first)):
            result = engine(batch)
            engine.backward(result["loss"])
            engine.step()
            student.update_modal_inputs(batch["items"], result["modal"])
            self.written.update(batch["items"].tolist())
            for k, v in result.items():
                if k != "modal":
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
            steps += 1
            items_seen += len(batch["items"]) if batch["weight"] else 0
            if steps % s.grad_accum:
                continue                      # mid-accumulation: nothing can be saved here
            if stop is not None and stop.requested():
                path = self.checkpoint(epoch, steps, False, sums, items_seen)
                raise Interrupted(f"stopped by {stop.received or 'a signal on another rank'} "
                                  f"at epoch {epoch}, step {steps}; checkpoint {path}; continue "
                                  "with --resume")
            if s.checkpoint_every > 0 and engine.global_steps % s.checkpoint_every == 0:
                self.checkpoint(epoch, steps, False, sums, items_seen)
        self.skip_ref.set(0)
        values = dist.allreduce_sum(np.array([float(v) for v in sums.values()] + [items_seen]))
        record = {"epoch": epoch, **{k: round(v / (steps * env.world_size), 6)
                                     for k, v in zip(sums, values[:-1])}}
        if not np.isfinite(record["loss"]):
            raise TrainingError(f"stage 2: the loss of epoch {epoch} is {record['loss']} "
                                f"(terms: {record}); lower stage2.lr / stage2.rec_lr")
        self.times["train"].append(time.perf_counter() - t0)
        self.steps_in_epoch = steps
        return {**record, "train_s": round(self.times["train"][-1], 3), "items": int(values[-1]),
                "items_per_s": round(values[-1] / self.times["train"][-1], 1)}

    def refresh_and_evaluate(self, epoch: int, record: dict, first: bool = False) -> None:
        """Re-extract every item's features into the bank, evaluate on valid, keep the best."""
        env, student, metric = self.env, self.student, self.cfg.eval.metric
        t0 = time.perf_counter()
        self.engine.module.eval()
        bank = extract_all(self.backbone, self.shards, self.cfg, env, self.device, verify=first,
                           show_progress=env.is_main and sys.stderr.isatty())
        if first:
            _check_dims(student, bank)
        student.set_modal_inputs({m: torch.from_numpy(bank[m]) for m in student.modalities})
        self.bank_start = {m: bank[m] for m in student.modalities}
        self.written, self.bank_ckpt = set(), None
        self.times["extract"].append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        with gathered(list(student.parameters())):
            users_r, items_r = _representations(student)
        reps = (users_r.float(), items_r.float())
        valid = self.evaluator(reps, "valid")
        self.times["eval"].append(time.perf_counter() - t1)
        improved = self.best["valid"] is None or valid[metric] > self.best["valid"][metric]
        if improved:
            self.best = {"epoch": epoch, "valid": valid, "test": self.evaluator(reps, "test")}
            _save_best(self.out, self.engine.module, bank, reps, self.meta, env, self.cfg)
            self.bad = 0
        else:
            self.bad += 1
        if self.init_state is not None:
            record["backbone_shift"] = self._shift()
        record.update(valid={k: round(v, 6) for k, v in valid.items()}, best=improved,
                      extract_s=round(self.times["extract"][-1], 3),
                      eval_s=round(self.times["eval"][-1], 3))
        self.run_dir.log(**record)
        loss = f"loss {record['loss']:.4f}" if "loss" in record else "before training"
        self.say(f"epoch {epoch:3d}  {loss}  valid {metric} {valid[metric]:.4f}"
                 f"{'  *' if improved else ''}  (train {record.get('train_s', 0):.1f}s, "
                 f"re-extract {record['extract_s']:.1f}s, eval {record['eval_s']:.1f}s)")

    def _shift(self) -> float:
        now = trainable_state_dict(self.backbone)
        moved = sum(float((now[k] - v).pow(2).sum()) for k, v in self.init_state.items())
        size = sum(float(v.pow(2).sum()) for v in self.init_state.values())
        return round((moved / max(size, 1e-30)) ** 0.5, 6)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        s, metric = self.s, self.cfg.eval.metric
        bb = self.counts["backbone"]
        self.say(f"stage 2: {self.student.name} + {self.backbone.method} on "
                 f"{self.inter.n_users} users x {self.inter.n_items} items; backbone trainable "
                 f"{bb['trainable']} of {bb['total']} ({bb['trainable_pct']}%); teacher: "
                 f"{self.teacher['run'] if self.teacher else 'none (one stage)'}; "
                 f"{self.env.world_size} rank(s), ZeRO-{zero_stage(self.ds_cfg)}"
                 f"{'; bf16' if self.ds_cfg.get('bf16', {}).get('enabled') else ''}")
        if self.resume_from is None:
            self.refresh_and_evaluate(-1, {"epoch": -1}, first=True)
        with StopSignals() as stop:
            for epoch in range(self.start["epoch"], s.epochs):
                if self.bad >= s.patience:       # resumed after the stopping epoch
                    self.stopped_early = True
                    break
                record = self.train_epoch(epoch, stop)
                self.epochs_run = epoch + 1
                self.refresh_and_evaluate(epoch, record)
                stopping = stop.requested()      # collective: every rank, every epoch
                path = None
                if s.checkpoint_every >= 0 or stopping:
                    if self.steps_in_epoch % s.grad_accum == 0:
                        path = self.checkpoint(epoch, 0, True, {}, 0)
                    else:
                        self.say(f"epoch {epoch}: {self.steps_in_epoch} micro steps is not a "
                                 f"multiple of stage2.grad_accum ({s.grad_accum}): gradients "
                                 "are mid-accumulation, no epoch-end checkpoint")
                if self.on_epoch is not None:    # after the checkpoint: a retry resumes here
                    self.on_epoch(self.progress(epoch, record))
                if self.bad >= s.patience:
                    self.stopped_early = True
                    self.say(f"early stop: no better valid {metric} in {s.patience} epochs")
                    break
                if stopping:
                    raise Interrupted(f"stopped by {stop.received or 'a signal on another rank'}"
                                      f" after epoch {epoch}; "
                                      f"{f'checkpoint {path}' if path else 'no new checkpoint'}"
                                      "; continue with --resume")
        metrics = self._metrics(self.epochs_run, self.stopped_early)
        self.run_dir.write_metrics(metrics)
        best = self.best
        self.say(f"best epoch {best['epoch']}: valid {metric} {best['valid'][metric]:.4f}, "
                 f"test {metric} {best['test'][metric]:.4f} -> {self.out}")
        dist.barrier()
        return metrics

    def progress(self, epoch: int, record: dict) -> dict:
        """What an epoch reports to a sweep (the same on every rank): this epoch's loss and
        valid metrics, and the best epoch so far with its valid and test metrics."""
        best = self.best
        return {"epoch": epoch, "epochs": epoch + 1, "loss": record.get("loss"),
                "valid": dict(record["valid"]), "best_epoch": best["epoch"],
                "best_valid": dict(best["valid"]), "best_test": dict(best["test"])}

    def _metrics(self, epochs_run: int, stopped_early: bool) -> dict:
        s, counts, times = self.s, self.counts, self.times
        mean = (lambda xs: round(float(np.mean(xs)), 3) if xs else 0.0)
        return {
            "model": self.student.name, "method": self.backbone.method,
            "metric": self.cfg.eval.metric,
            "teacher": self.teacher["run"] if self.teacher else None, "kt_weight": s.kt_weight,
            "prompt_init": self.cfg.peft.prompt_init if self.backbone.prompts is not None
            else None,
            "knowledge_init": self.knowledge_init, "best_epoch": self.best["epoch"],
            "valid": self.best["valid"], "test": self.best["test"], "epochs_run": epochs_run,
            "stopped_early": stopped_early, "params": counts,
            "trainable_params": counts["backbone"]["trainable"]
            + counts["recommender"]["trainable"],
            "world_size": self.env.world_size,
            "bf16": bool(self.ds_cfg.get("bf16", {}).get("enabled")),
            "train_s_mean": mean(times["train"]), "extract_s_mean": mean(times["extract"]),
            "eval_s_mean": mean(times["eval"]),
            "seconds": round(time.perf_counter() - self.t_start, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def run_stage2(cfg: Config, out: str | Path, env: dist.DistEnv | None = None,
               log=print, resume: bool = False, on_epoch=None) -> dict:
    """The whole command on this rank (see the module doc); returns the metrics. ``resume``:
    continue from the newest checkpoint in ``OUT/checkpoints`` (from scratch if none).
    ``on_epoch(progress)`` is called on every rank after each trained epoch's evaluation and
    checkpoint (:meth:`Stage2Run.progress`; ``ptmrec tune`` reports it to Ray Tune)."""
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, env)
    return Stage2Run(cfg, Path(out), env, log, resume, on_epoch).run()
