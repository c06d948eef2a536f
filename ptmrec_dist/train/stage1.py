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

import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptmrec_dist import dist, rec
from ptmrec_dist.config import Config, to_dict
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.errors import Interrupted, TrainingError
from ptmrec_dist.eval.evaluate import Evaluator
from ptmrec_dist.io import atomic_save_npy, atomic_save_safetensors, atomic_write_json
from ptmrec_dist.rec.features import ItemFeatures, resolve_features
from ptmrec_dist.run import RunDir
from ptmrec_dist.train.checkpoint import Checkpointer, StopSignals, latest_checkpoint
from ptmrec_dist.train.engine import build_engine, stage_ds_config
from ptmrec_dist.train.sampler import BPRSampler, step_seed


class _LossModule(nn.Module):
    """What the engine runs: ``batch -> model.loss(batch)`` (keeps ``Recommender.forward`` the
    scoring function of the interface)."""

    def __init__(self, model: rec.base.Recommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return self.model.loss(batch)


def _representations(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (users, items) representations, once per evaluation (a full propagation for
    the graph models): scored for valid and test, and saved when best."""
    with torch.no_grad():
        users_r, items_r = model.representations()
    return users_r.detach(), items_r.detach()


def save_model_and_representations(out: Path, state: dict,
                                   reps: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The best model's weights (``checkpoints/best/model.safetensors``) and representations
    (``user_repr.npy``, ``item_repr.npy``: the teacher of stage 2, what ``evaluate`` reads)."""
    atomic_save_safetensors(out / "checkpoints" / "best" / "model.safetensors",
                            {k: v.detach().cpu() for k, v in state.items()})
    atomic_save_npy(out / "user_repr.npy", reps[0].cpu().float().numpy())
    atomic_save_npy(out / "item_repr.npy", reps[1].cpu().float().numpy())


def _save_best(out: Path, model, engine, env: dist.DistEnv,
               reps: tuple[torch.Tensor, torch.Tensor]) -> None:
    if engine is not None:   # collective: every rank calls it
        engine.save_checkpoint(str(out / "checkpoints"), tag="best")
    if env.is_main:
        save_model_and_representations(out, model.state_dict(), reps)


def build_model(cfg: Config, inter, feats: ItemFeatures | None = None) -> rec.base.Recommender:
    """The configured recommender on ``feats`` (default: the run's features, loaded here if the
    model needs them)."""
    cls = rec.model_class(cfg.recommender.name)
    if feats is None:
        feats = (resolve_features(cfg.data, inter.path, inter.n_items, required=True)
                 if cls.needs_features else ItemFeatures())
    torch.manual_seed(cfg.seed)          # the same initial weights on every rank
    model = cls(inter.n_users, inter.n_items, feats, cfg.recommender, inter.csr("train"))
    model.features_info = feats.describe() if cls.needs_features else "none (ID only)"
    return model


# settings that may change between a run and its resumption (the rest must not)
RESUMABLE_CHANGES = ("stage1.epochs", "stage1.patience", "stage1.checkpoint_every", "dist.")


def run_stage1(cfg: Config, out: str | Path, env: dist.DistEnv | None = None,
               log=print, resume: bool = False) -> dict:
    """The whole command on this rank; returns the metrics. ``resume``: continue after the
    epoch of the newest checkpoint in ``OUT/checkpoints`` (from scratch if none)."""
    out = Path(out)
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s, env)
    say = log if env.is_main else (lambda *_: None)
    t_start = time.perf_counter()
    inter = load_interactions(cfg.data.path, cfg.data)
    model = build_model(cfg, inter)
    checkpointer = Checkpointer(out / "checkpoints", env)
    resume_from = latest_checkpoint(out / "checkpoints") if resume else None
    if resume and resume_from is None:
        say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
    if resume_from is None and checkpointer.clear():
        say(f"removed the resumable checkpoints of an earlier run in {out / 'checkpoints'}")
    state = checkpointer.read(resume_from, cfg, RESUMABLE_CHANGES) if resume_from else None
    run = RunDir(out, cfg, env.is_main).start(state["log_lines"] if state else None)
    evaluator = Evaluator(cfg, inter, env)
    s = cfg.stage1
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"stage 1: {model.name} on {inter.n_users} users x {inter.n_items} items, "
        f"{n_params} trainable parameters, features: {model.features_info}; "
        f"{env.world_size} rank(s)")

    engine = None
    if model.trainable:
        engine = build_engine(_LossModule(model), stage_ds_config(s, env.world_size, "stage1",
                                                                 trainable=n_params))
    # one micro batch per sampler step; DeepSpeed steps the optimizer every grad_accum of them
    sampler = BPRSampler(inter.csr("train"), s.batch_size // max(1, s.grad_accum), cfg.seed,
                         env.rank, env.world_size, negatives=model.uses_negatives)

    metric = cfg.eval.metric
    best = {"epoch": -1, "valid": None, "test": None}
    bad_evals, epochs_run, stopped_early = 0, 0, False
    epoch_times, eval_times = [], []
    if state is not None and engine is not None:
        checkpointer.load(engine, resume_from)
        best, bad_evals, epochs_run = state["best"], state["bad"], state["epoch"] + 1
        epoch_times, eval_times = state["times"]["epoch"], state["times"]["eval"]
        say(f"resumed from {resume_from}: epoch {state['epoch']} done")

    def checkpoint(epoch: int) -> Path:
        return checkpointer.save(engine, int(engine.global_steps), {
            "epoch": epoch, "best": best, "bad": bad_evals, "log_lines": run.lines,
            "times": {"epoch": epoch_times, "eval": eval_times}, "config": to_dict(cfg)}, {})

    with StopSignals() as stop:
        for epoch in range(epochs_run if state else 0, s.epochs if model.trainable else 1):
            if bad_evals >= s.patience:            # resumed after the stopping evaluation
                stopped_early = True
                break
            t0 = time.perf_counter()
            record = {"epoch": epoch}
            if model.trainable:
                model.train()
                seed = step_seed(cfg.seed, epoch, 0, stream=1)
                model.pre_epoch(epoch, torch.Generator().manual_seed(seed))
                sums: dict[str, torch.Tensor] = {}
                for batch in sampler.epoch(epoch):
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
                record.update({k: round(v / len(sampler), 6) for k, v in zip(sums, sums_vec)})
                if not np.isfinite(record["loss"]):
                    raise TrainingError(f"stage 1: the loss of epoch {epoch} is {record['loss']} "
                                        f"(terms: {record}); lower stage1.lr or check the features")
                epoch_times.append(time.perf_counter() - t0)
                record["epoch_s"] = round(epoch_times[-1], 3)
            epochs_run = epoch + 1
            if epoch % s.eval_every and epoch != s.epochs - 1:
                run.log(**record)
            else:
                t1 = time.perf_counter()
                model.eval()
                reps = _representations(model)
                valid = evaluator(reps, "valid")
                eval_times.append(time.perf_counter() - t1)
                record.update(valid={k: round(v, 6) for k, v in valid.items()},
                              eval_s=round(eval_times[-1], 3))
                improved = best["valid"] is None or valid[metric] > best["valid"][metric]
                if improved:
                    best = {"epoch": epoch, "valid": valid, "test": evaluator(reps, "test")}
                    _save_best(out, model, engine, env, reps)
                    bad_evals = 0
                else:
                    bad_evals += 1
                record["best"] = improved
                run.log(**record)
                say(f"epoch {epoch:4d}  loss {record.get('loss', float('nan')):.4f}  "
                    f"valid {metric} {valid[metric]:.4f}{'  *' if improved else ''}  "
                    f"({record.get('epoch_s', 0):.1f}s + eval {record['eval_s']:.1f}s)")
            if engine is not None:
                stopping = stop.requested()        # collective: every rank, every epoch
                if stopping or (s.checkpoint_every and epochs_run % s.checkpoint_every == 0):
                    path = checkpoint(epoch)
                    if stopping:
                        who = stop.received or "a signal on another rank"
                        raise Interrupted(f"stopped by {who} after epoch {epoch}; checkpoint "
                                          f"{path}; continue with --resume")
            if bad_evals >= s.patience:
                stopped_early = True
                say(f"early stop: no better valid {metric} in {s.patience} evaluations")
                break

    metrics = {
        "model": model.name, "metric": metric, "best_epoch": best["epoch"],
        "valid": best["valid"], "test": best["test"],
        "epochs_run": epochs_run, "stopped_early": stopped_early,
        "trainable_params": n_params, "world_size": env.world_size,
        "n_users": inter.n_users, "n_items": inter.n_items,
        "epoch_s_mean": round(float(np.mean(epoch_times)), 4) if epoch_times else 0.0,
        "eval_s_mean": round(float(np.mean(eval_times)), 4) if eval_times else 0.0,
        "seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    run.write_metrics(metrics)
    if env.is_main:
        atomic_write_json(out / "checkpoints" / "best" / "meta.json",
                          {"epoch": best["epoch"], "model": model.name,
                           "valid": best["valid"], "test": best["test"]})
    say(f"best epoch {best['epoch']}: valid {metric} {best['valid'][metric]:.4f}, "
        f"test {metric} {best['test'][metric]:.4f} -> {out}")
    dist.barrier()
    return metrics
