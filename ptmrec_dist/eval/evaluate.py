"""``ptmrec evaluate --run DIR``: full-ranking metrics of a finished run from its exported
representations (the :class:`Evaluator` stage 1 uses every epoch) (``user_repr.npy`` @
``item_repr.npy``.T) and the interactions named in its
``config.yaml``; ``--dump-topk FILE`` writes every evaluated user's top-50 items so anyone can
recompute the metrics independently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist.config import Config, load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.dist import DistEnv, allreduce_sum
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.eval.metrics import evaluate
from ptmrec_dist.io import atomic_write_json, temp_file_near
from ptmrec_dist.rec.features import read_representations

DUMP_K = 50


class TopkWriter:
    """Collects ``(user, top-K)`` chunks into FILE: ``.jsonl`` (one ``{"user", "user_id",
    "items", "item_ids"}`` object per line) or ``.npy`` (int64 ``[n, 1 + K]``, column 0 the user
    index, the rest item indices best first). Written atomically on :meth:`close`."""

    def __init__(self, path: str | Path, user_ids=None, item_ids=None, k: int = DUMP_K):
        self.path = Path(path)
        if self.path.suffix not in (".jsonl", ".npy"):
            raise ConfigError(f"--dump-topk {self.path}: use a .jsonl or .npy file name")
        self.k, self.user_ids, self.item_ids = k, user_ids, item_ids
        self.parts: list[np.ndarray] = []

    def __call__(self, users: np.ndarray, topk: np.ndarray) -> None:
        topk = topk[:, :self.k]
        if topk.shape[1] < self.k:        # fewer items than K in the catalog: -1 beyond them
            topk = np.pad(topk, ((0, 0), (0, self.k - topk.shape[1])), constant_values=-1)
        self.parts.append(np.concatenate([users[:, None], topk], axis=1))

    def close(self) -> None:
        rows = np.concatenate(self.parts) if self.parts else np.zeros((0, 1 + self.k), np.int64)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_near(self.path)
        with open(fd, "wb") as f:
            if self.path.suffix == ".npy":
                np.save(f, rows.astype(np.int64))
            else:
                for row in rows:
                    items = row[1:][row[1:] >= 0]      # -1: no item left at that place
                    rec = {"user": int(row[0]), "items": items.tolist()}
                    if self.user_ids is not None:
                        rec["user_id"] = str(self.user_ids[row[0]])
                    if self.item_ids is not None:
                        rec["item_ids"] = [str(self.item_ids[i]) for i in items]
                    f.write((json.dumps(rec) + "\n").encode())
        Path(tmp).replace(self.path)


def load_representations(run: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name in ("user_repr.npy", "item_repr.npy"):
        path = run / name
        if not path.is_file():
            raise InputError(path, "missing: not a finished stage-1/stage-2 run folder "
                                   "(it has no exported representations)")
        array = read_representations(path, name.split("_")[0])
        arrays.append(array)
    return arrays[0], arrays[1]


def score_function(reps: tuple[torch.Tensor, torch.Tensor], exclude: torch.Tensor | None = None):
    """``users LongTensor -> [n, n_items]`` scores of the representations ``(users_r,
    items_r)``: ``users_r[u] @ items_r.T`` on their device (the users are moved there);
    ``exclude`` (bool per item) sets those items' scores to -inf: they are not candidates.

    The scores are written into one buffer kept between calls (grown to the largest chunk):
    a fresh multi-hundred-MB matrix per chunk costs its page faults every time, 40 % of the
    product at 1M items (``bench/eval_reference.py``). A returned matrix is therefore valid
    until the next call; the evaluator and ``recommend`` use each chunk's before scoring the
    next."""
    users_r, items_r = reps
    if exclude is not None:
        exclude = exclude.to(items_r.device)
    dtype = torch.promote_types(users_r.dtype, items_r.dtype)
    buf: list[torch.Tensor] = []

    def into(u, start: int, stop: int):
        n, m = len(u), stop - start
        if not buf or buf[0].numel() < n * m:
            buf[:] = [torch.empty(n * m, dtype=dtype, device=items_r.device)]
        out = buf[0][:n * m].view(n, m)
        torch.mm(users_r[u.to(users_r.device)], items_r[start:stop].T, out=out)
        return out if exclude is None else out.masked_fill_(exclude[start:stop], -torch.inf)

    def scores(u):
        return into(u, 0, items_r.shape[0])

    # items start:stop only (metrics.item_block: large catalogs are ranked a block at a time)
    scores.block = into
    return scores


class Evaluator:
    """Valid/test metrics of representations (scores = users @ items.T) under ``cfg.eval``; on
    N ranks each scores its share of the users and the sums are all-reduced.

    With held-out items (``data.cold_items``) valid and test rank the other (warm) items only,
    and the ``cold`` split ranks the cold items only (strict cold start: each user's cold
    interactions against every cold item), scored by the representations the run exported for
    them (the model's content branch, :func:`~ptmrec_dist.train.outputs.representations`)."""

    def __init__(self, cfg: Config, inter, env: DistEnv | None = None):
        self.cfg, self.env = cfg, env or DistEnv()
        self.train, self.valid = inter.csr("train"), inter.csr("valid")
        self.test = inter.csr("test")
        self.cold = inter.csr("cold") if inter.has_cold else None
        self.cold_mask = torch.from_numpy(inter.cold_mask()) if inter.has_cold else None

    def cold_fn(self, reps: tuple[torch.Tensor, torch.Tensor]):
        """``() -> cold metrics`` of ``reps`` (for :meth:`RunState.record`), None without
        held-out items."""
        return None if self.cold is None else (lambda: self(reps, "cold"))

    def __call__(self, reps: tuple[torch.Tensor, torch.Tensor], split: str,
                 topk_sink=None, sink_k: int = 0, row_sink=None) -> dict[str, float]:
        e = self.cfg.eval
        if split == "cold" and self.cold is None:
            raise ConfigError("the cold split needs data.cold_items > 0")
        target = {"valid": self.valid, "test": self.test, "cold": self.cold}[split]
        extra = self.valid if split == "test" and e.mask_valid_at_test else None
        exclude = None if self.cold_mask is None else \
            (~self.cold_mask if split == "cold" else self.cold_mask)
        users = np.flatnonzero(np.diff(target.indptr) > 0)[self.env.rank::self.env.world_size]
        return evaluate(score_function(reps, exclude), self.train, target,
                        sorted(set(e.ks)), also_mask=extra, chunk=e.chunk_users,
                        memory_mb=e.memory_mb, users=users, topk_sink=topk_sink,
                        sink_k=sink_k, reduce=allreduce_sum, row_sink=row_sink)


def evaluate_run(run: str | Path, split: str = "test", dump_topk: str | None = None,
                 overrides: list[str] | tuple = ()) -> dict:
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise InputError(run / "config.yaml", "missing: not a run folder")
    cfg = load_config(run / "config.yaml", overrides)
    inter = load_interactions(cfg.data.path, cfg.data)
    if split == "cold" and not inter.has_cold:
        raise InputError(run / "config.yaml", "the cold split needs held-out items: this run "
                                              "has data.cold_items=0")
    if not inter.csr(split).nnz:
        raise InputError(cfg.data.path, f"the {split} split of these interactions is empty: "
                                        "there is nothing to evaluate")
    users_r, items_r = load_representations(run)
    if users_r.shape[0] != inter.n_users or items_r.shape[0] != inter.n_items:
        raise InputError(run / "user_repr.npy",
                         f"representations are {users_r.shape[0]} users x {items_r.shape[0]} "
                         f"items, the interactions {inter.n_users} x {inter.n_items}")
    k = max(DUMP_K, *cfg.eval.ks)
    sink = TopkWriter(dump_topk, inter.user_ids, inter.item_ids, k) if dump_topk else None
    metrics = Evaluator(cfg, inter)((torch.from_numpy(users_r), torch.from_numpy(items_r)),
                                    split, topk_sink=sink, sink_k=k)
    if sink is not None:
        sink.close()
    result = {"split": split, "users": int((np.diff(inter.csr(split).indptr) > 0).sum()),
              "mask_valid_at_test": cfg.eval.mask_valid_at_test, "metrics": metrics}
    atomic_write_json(run / f"eval_{split}.json", result)
    return result


def format_metrics(metrics: dict[str, float], ks: list[int]) -> str:
    names = ("recall", "ndcg", "precision", "map", "hit")
    lines = ["metric     " + "".join(f"@{k:<9d}" for k in ks)]
    for n in names:
        lines.append(f"{n:<11s}" + "".join(f"{metrics[f'{n}@{k}']:<10.4f}" for k in ks))
    return "\n".join(lines)


def per_user_metrics(run: str | Path, split: str = "test",
                     metrics: tuple[str, ...] = ("recall@20", "ndcg@20")) -> dict[str, np.ndarray]:
    """A finished run's per-user metrics on ``split`` (``users`` and one array per metric, by
    user index), from its representations; their means are checked against ``metrics.json``
    (paired statistics read these)."""
    run = Path(run)
    cfg = load_config(run / "config.yaml")
    users_r, items_r = load_representations(run)
    rows: dict[str, list] = {"users": [], **{m: [] for m in metrics}}

    def sink(users, values):
        rows["users"].extend(users.tolist())
        for name in metrics:
            rows[name].extend(values[name].tolist())
    inter = load_interactions(cfg.data.path, cfg.data, warn=lambda _m: None)
    means = Evaluator(cfg, inter)((torch.from_numpy(users_r), torch.from_numpy(items_r)), split,
                                  row_sink=sink)
    saved = json.loads((run / "metrics.json").read_text())[split]
    for name in metrics:
        if abs(means[name] - saved[name]) > 1e-6:
            raise InputError(run / "metrics.json", f"per-user {name} averages to "
                                                   f"{means[name]}, the file says {saved[name]}")
    order = np.argsort(rows["users"])
    return {k: np.asarray(v)[order] for k, v in rows.items()}


def paired_user_interval(a: np.ndarray, b: np.ndarray, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """Mean of ``a - b`` (per-user values of two runs on the same users) and its 95 % bootstrap
    interval over users."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = np.array([diff[rng.integers(len(diff), size=len(diff))].mean()
                     for _ in range(n_boot)])
    return {"mean_diff": float(diff.mean()), "ci95": [float(np.quantile(boot, 0.025)),
                                                       float(np.quantile(boot, 0.975))],
            "n_users": int(len(diff))}
