"""``ptmrec extract``: frozen-backbone features of every item, on 1..N ranks, resumable.

Shards are dealt to ranks round-robin; each rank streams its unfinished shards through the
exactly-once reader (dataloader workers decode, preprocess and tokenise), runs the frozen towers
under ``torch.inference_mode()``, and writes one part per finished shard
(``OUT/parts/items-000003.npz``, atomically). After a barrier rank 0 merges the parts into
``OUT/image.npy`` and ``OUT/text.npy`` (item-index order) and ``OUT/meta.json``, checking that
every written item is present exactly once. A rerun skips shards whose part exists and was made
by the same backbone weights from the same shard (the sha256 that manifest.json gives it): after a
re-shard, parts of shards that changed are discarded with a note and recomputed, and parts of
shards no longer listed are removed. ``OUT`` must be on storage all ranks share.

With ``adapter`` (``ptmrec extract --adapter RUN``) the items are encoded by the tuned encoders
of a stage-2 run instead (:func:`~ptmrec_dist.clip.methods.load_stage2_encoders`): the features
that run evaluated with, for the run's own shards bit for bit (tests/test_recommend.py). A
``stage2.feature_gate`` run read ``ref + g (adapted - ref)``: the frozen backbone encodes the
items too (``OUT/reference/parts``) and the saved best-epoch ``g`` (``RUN/feature_gate.json``)
combines the two, as the run did.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist import __version__
from ptmrec_dist.clip.backbone import FrozenBackbone, load_backbone
from ptmrec_dist.config import Config
from ptmrec_dist.data.readers import ExactlyOnceItems
from ptmrec_dist.data.shards import load_manifest
from ptmrec_dist.data.sources import manifest_json, shard_source
from ptmrec_dist.dist import DistEnv
from ptmrec_dist.errors import Interrupted, PtmrecError, ShardError
from ptmrec_dist.io import atomic_save_npy, atomic_write_json, sha256_file, temp_file_near
from ptmrec_dist.logs import get_logger, progress

PARTS = "parts"
REFERENCE = "reference"      # a gated run's frozen-reference parts (OUT/reference/parts)
FEATURE_GATE = "feature_gate.json"   # a stage2.feature_gate run's best-epoch gate values
_log = get_logger(__name__)


class Preprocess:
    """Collate in the dataloader workers: images -> pixel_values, texts -> token ids."""

    def __init__(self, backbone: FrozenBackbone):
        self.image_processor = backbone.processor.image_processor
        self.tokenizer = backbone.tokenizer
        self.max_len = backbone.max_text_len

    def __call__(self, batch: list[dict]) -> dict:
        pixels = self.image_processor(images=[b["image"] for b in batch],
                                      return_tensors="pt")["pixel_values"]
        enc = self.tokenizer([b["text"] for b in batch], padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        return {"index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
                "pixel_values": pixels, "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"]}


def _part_path(out: Path, shard_name: str) -> Path:
    return out / PARTS / (shard_name.removesuffix(".tar") + ".npz")


def _part_state(path: Path, weights: str, entry: dict) -> str:
    """``"ok"`` if the part exists, is readable and was made by these weights from this shard (the
    sha256 and item count of its manifest entry); else ``"missing"``, ``"other weights"``,
    ``"other shards"`` (the shard folder was rewritten since; parts of before the shard's sha256
    was recorded count as such) or ``"unreadable"``. npz members load lazily: this reads only
    the small ones."""
    if not path.is_file():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as part:
            if str(part["weights_hash"]) != weights:
                return "other weights"
            if "shard_sha256" not in part.files or str(part["shard_sha256"]) != entry["sha256"] \
                    or len(part["index"]) != entry["n_items"]:
                return "other shards"
            return "ok"
    except (OSError, ValueError, KeyError):
        return "unreadable"


def _load_part(path: Path, weights: str, entry: dict,
               keys=("index", "image", "text")) -> dict | None:
    """A part's arrays (``keys``) if it is valid for this shard entry and weights; else None."""
    if _part_state(path, weights, entry) != "ok":
        return None
    try:
        with np.load(path, allow_pickle=False) as part:
            return {k: part[k] for k in keys}
    except (OSError, ValueError, KeyError):
        return None


def _save_part(path: Path, index, image, text, weights: str, shard_sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_near(path)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, index=index, image=image, text=text, weights_hash=np.array(weights),
                 shard_sha256=np.array(shard_sha256))
    os.replace(tmp, path)


def _discard_stale_parts(out: Path, manifest: dict, mine: list[dict], states: dict[str, str],
                         env: DistEnv, log) -> None:
    """Remove the parts a rerun must not reuse, and say so: this rank's parts made from other
    shards or by other weights (recomputed), and (rank 0) parts of shards the manifest no
    longer lists."""
    who = f"rank {env.rank}: " if env.world_size > 1 else ""
    for reason in ("other shards", "other weights", "unreadable"):
        names = [e["name"] for e in mine if states[e["name"]] == reason]
        if not names:
            continue
        for name in names:
            _part_path(out, name).unlink(missing_ok=True)
        what = {"other shards": "made from other shards (the shard folder was rewritten since: "
                                "its manifest.json gives them another sha256)",
                "other weights": "made by other backbone weights",
                "unreadable": "that cannot be read"}[reason]
        plural = "s" if len(names) > 1 else ""
        log(f"resume: {who}discarding {len(names)} feature part{plural} {what}; recomputing "
            f"{', '.join(n.removesuffix('.tar') for n in names)}")
    if env.is_main and (out / PARTS).is_dir():
        listed = {_part_path(out, e["name"]).name for e in manifest["shards"]}
        orphans = sorted(p for p in (out / PARTS).glob("items-*.npz") if p.name not in listed)
        for p in orphans:
            p.unlink(missing_ok=True)
        if orphans:
            plural = "s" if len(orphans) > 1 else ""
            log(f"resume: removing {len(orphans)} feature part{plural} of shards no longer in "
                f"manifest.json: {', '.join(p.name for p in orphans)}")


def extract_rank(backbone: FrozenBackbone, weights: str, shards: str | Path, out: Path,
                 entries: list[dict], cfg: Config, device: torch.device,
                 show_progress: bool, times: dict | None = None) -> int:
    """Features of the shards in ``entries`` (this rank's unfinished ones); returns items done.
    ``show_progress``: this rank may show a bar (the main rank; :func:`~ptmrec_dist.logs.progress`
    decides). ``times`` (a dict) receives ``loader_wait_s`` (waiting for the data loader's next
    batch: reading, decoding, preprocessing and tokenising not hidden behind the towers) and
    ``encode_s`` (the two towers)."""
    if not entries:
        return 0
    from torch.utils.data import DataLoader

    workers = cfg.extract.num_workers
    reader = ExactlyOnceItems(shards, num_workers=workers, decode="pil",
                              on_bad_sample=cfg.data.on_bad_sample,
                              names={e["name"] for e in entries})
    loader = DataLoader(reader, batch_size=cfg.extract.batch_size, num_workers=workers,
                        collate_fn=Preprocess(backbone), persistent_workers=False,
                        pin_memory=device.type == "cuda")
    first = np.array([e["first_index"] for e in entries])
    order = np.argsort(first)
    pending = {e["name"]: ([], [], []) for e in entries}
    expected = {e["name"]: e["n_items"] for e in entries}
    shard_sha = {e["name"]: e["sha256"] for e in entries}
    done = 0
    bar = progress(total=sum(expected.values()), unit="item", desc="extract", main=show_progress)
    wait = encode = 0.0
    batches = iter(loader)
    with torch.inference_mode():
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            wait += t1 - t0
            if batch is None:
                break
            img = backbone.encode_images(batch["pixel_values"].to(device)).float().cpu().numpy()
            txt = backbone.encode_texts(batch["input_ids"].to(device),
                                        batch["attention_mask"].to(device)).float().cpu().numpy()
            encode += time.perf_counter() - t1
            idx = batch["index"].numpy()
            # which shard each item came from: shards hold disjoint, sorted index ranges
            which = order[np.searchsorted(first[order], idx, side="right") - 1]
            for k in np.unique(which):
                name = entries[k]["name"]
                sel = which == k
                buf = pending[name]
                buf[0].append(idx[sel]), buf[1].append(img[sel]), buf[2].append(txt[sel])
                if sum(len(a) for a in buf[0]) == expected[name]:
                    _save_part(_part_path(out, name), np.concatenate(buf[0]),
                               np.concatenate(buf[1]), np.concatenate(buf[2]), weights,
                               shard_sha[name])
                    del pending[name]
            done += len(idx)
            bar.update(len(idx))
    bar.close()
    if times is not None:
        times.update(loader_wait_s=wait, encode_s=encode)
    if pending:   # a shard yielded fewer items than its manifest says (skipped bad samples)
        names = ", ".join(sorted(pending))
        raise ShardError(shards, f"incomplete shards after extraction: {names}")
    return done


def _extract_parts(backbone, weights: str, shards: str | Path, out: Path, manifest: dict,
                   cfg: Config, env: DistEnv, device, log,
                   times: dict | None = None) -> tuple[int, float]:
    """This rank's share of the shards into ``OUT/parts``, skipping parts already done (and
    saying so); returns ``(items encoded, seconds)``."""
    mine = [e for k, e in enumerate(manifest["shards"]) if k % env.world_size == env.rank]
    states = {e["name"]: _part_state(_part_path(out, e["name"]), weights, e) for e in mine}
    _discard_stale_parts(out, manifest, mine, states, env, log)
    todo = [e for e in mine if states[e["name"]] != "ok"]
    if env.is_main and len(todo) < len(mine):
        log(f"resume: {len(mine) - len(todo)} of {len(mine)} shards of rank 0 already done")
    t1 = time.perf_counter()
    n = extract_rank(backbone, weights, shards, out, todo, cfg, device,
                     show_progress=env.is_main, times=times)
    return n, time.perf_counter() - t1


def _gate_part(part: dict, ref_part: dict, gate: dict[str, float], ref_dtype: str) -> dict:
    """``ref + g_m (adapted - ref)`` per gated modality, as stage 2's ``FeatureGate`` computes
    it: float32, the reference rounded to the storage dtype the run read it in."""
    out = dict(part)
    store = np.float16 if ref_dtype == "fp16" else np.float32
    for m, g in gate.items():
        f = torch.from_numpy(np.asarray(part[m], dtype=np.float32))
        ref = torch.from_numpy(np.asarray(ref_part[m]).astype(store).astype(np.float32))
        out[m] = (ref + torch.tensor([g], dtype=torch.float32) * (f - ref)).numpy()
    return out


def merge_parts(shards: str | Path, out: Path, manifest: dict, weights: str, dtype: str,
                gated: tuple | None = None) -> dict:
    """Rank 0: parts -> image.npy / text.npy in item-index order; every item exactly once.
    ``gated``: ``(reference folder, its weights hash, {modality: g}, reference dtype)`` of a
    ``stage2.feature_gate`` run: each part is combined with the frozen reference's part."""
    n_items = manifest["n_items"]
    seen = np.zeros(n_items, dtype=np.int64)
    image = text = None
    for entry in manifest["shards"]:
        path = _part_path(out, entry["name"])
        part = _load_part(path, weights, entry)
        if part is None:
            raise ShardError(path, f"missing or stale feature part for {entry['name']}")
        if gated is not None:
            ref_path = _part_path(gated[0], entry["name"])
            ref_part = _load_part(ref_path, gated[1], entry)
            if ref_part is None or not np.array_equal(ref_part["index"], part["index"]):
                raise ShardError(ref_path, f"missing or stale reference part for "
                                           f"{entry['name']}")
            part = _gate_part(part, ref_part, gated[2], gated[3])
        idx = part["index"]
        if image is None:
            np_dtype = np.float16 if dtype == "fp16" else np.float32
            image = np.zeros((n_items, part["image"].shape[1]), dtype=np_dtype)
            text = np.zeros((n_items, part["text"].shape[1]), dtype=np_dtype)
        np.add.at(seen, idx, 1)
        image[idx], text[idx] = part["image"], part["text"]
    written = manifest["n_written"]
    if int((seen > 1).sum()) or int((seen == 1).sum()) != written:
        raise PtmrecError(f"{out}: merge check failed: {int((seen == 1).sum())} items once, "
                          f"{int((seen > 1).sum())} more than once, manifest says {written}")
    atomic_save_npy(out / "image.npy", image)
    atomic_save_npy(out / "text.npy", text)
    atomic_save_npy(out / "present.npy", seen == 1)
    return {"n_items": n_items, "n_present": written, "n_missing": n_items - written,
            "image_dim": int(image.shape[1]), "text_dim": int(text.shape[1])}


def run_extract(cfg: Config, shards: str | Path, out: Path, env: DistEnv, log=None,
                adapter: str | Path | None = None) -> dict | None:
    """The whole command on one rank of ``env``; rank 0 returns the meta, others None.
    ``adapter``: a finished stage-2 run folder whose tuned encoders encode the items (see
    :func:`_encoders`); None: the frozen backbone of ``cfg.backbone``. ``log``: where messages
    go (default: this module's logger)."""
    from ptmrec_dist import dist

    log = log or _log.info

    t0 = time.perf_counter()
    dist.check_devices(uses_deepspeed=False)
    with _stop_on_signal(out):
        if not env.distributed:
            return _run(cfg, shards, out, env, log, t0, adapter)
        dist.init(cfg.dist.backend, cfg.dist.timeout_s, env, cfg.dist.deterministic)
        try:
            return _run(cfg, shards, out, env, log, t0, adapter)
        finally:
            dist.teardown()


def _encoders(cfg: Config, adapter, device, log) -> tuple[FrozenBackbone, Config, dict | None]:
    """``(backbone, config, adapter entry of meta.json)``: the frozen backbone of
    ``cfg.backbone``; or with ``adapter`` (a stage-2 run folder) that run's tuned encoders, and
    ``cfg`` with the run's ``backbone``, ``peft`` and ``stage2`` sections, which shape the
    encoders (so ``OUT/config.yaml`` says how the features were made). A backbone other than
    the run's is refused (exit 2, naming both). ``extract.*`` stays the command's: which items
    share a batch (and so the text padding) changed no bit of the features on CPU (the demo:
    batch 50 without loader workers against the run's 64 with 2); other kernels (a GPU) may
    round differently for other batch shapes."""
    import dataclasses

    from ptmrec_dist.clip.methods import ADAPTER, load_stage2_encoders

    if adapter is None:
        return load_backbone(cfg.backbone, device), cfg, None
    backbone, run_cfg, meta = load_stage2_encoders(adapter, cfg.backbone, device)
    cfg = dataclasses.replace(cfg, backbone=run_cfg.backbone, peft=run_cfg.peft,
                              stage2=run_cfg.stage2)
    entry = {"run": str(adapter), "method": meta.get("method", run_cfg.peft.method),
             "sha256": sha256_file(Path(adapter) / ADAPTER),
             "bf16": backbone.dtype == torch.bfloat16}
    if run_cfg.stage2.feature_gate:
        gate = read_feature_gate(adapter)
        if gate is None:
            # a run of before the best epoch's gate was saved (feature_gate.json): metrics.json
            # has the last epoch's, rounded, so the gated features cannot be rebuilt
            entry["feature_gate"] = "not applied"
            log(f"note: {adapter} was trained with stage2.feature_gate and has no "
                f"{FEATURE_GATE}: its features/ are ref + g (adapted - ref); these are the "
                "adapted encoders' own features (g = 1)")
        else:
            entry["feature_gate"] = gate
            entry["reference_dtype"] = _reference_dtype(run_cfg, cfg.extract.feature_dtype)
    return backbone, cfg, entry


def read_feature_gate(run: str | Path) -> dict[str, float] | None:
    """The gate values ``g_m`` of a ``stage2.feature_gate`` run's best epoch
    (``RUN/feature_gate.json``, exact float32 values), or None where the run has none."""
    import json

    path = Path(run) / FEATURE_GATE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ShardError(path, f"invalid JSON: {exc}") from None
    if not isinstance(values, dict) or not values or \
            not all(isinstance(v, (int, float)) for v in values.values()):
        raise ShardError(path, "expected an object {modality: gate value}")
    return {str(k): float(v) for k, v in values.items()}


def _reference_dtype(run_cfg: Config, default: str) -> str:
    """The storage dtype of the frozen features a gated run read as ``ref`` (its
    ``data.features``' meta.json): the reference is rounded to it, as the run's was."""
    import json

    meta = Path(run_cfg.data.features or "") / "meta.json"
    try:
        return str(json.loads(meta.read_text(encoding="utf-8")).get("dtype", default))
    except (OSError, ValueError):
        return default


@contextlib.contextmanager
def _stop_on_signal(out: Path):
    """SIGTERM/SIGUSR1 (SLURM's warning before a time limit, requeue or preemption) stop the
    extraction at once with :class:`Interrupted` (exit code 3): parts are written atomically per
    finished shard, so a rerun loses only the shards in flight."""
    import signal
    import threading

    main_pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != main_pid:    # a forked loader worker: the main process stops it
            return
        raise Interrupted(f"extraction stopped by {signal.Signals(signum).name}; finished shards "
                          f"are kept in {out / 'parts'}, rerun the same command to continue")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run(cfg: Config, shards: str | Path, out: Path, env: DistEnv, log, t0: float,
         adapter=None) -> dict | None:
    from ptmrec_dist import dist
    from ptmrec_dist.run import RunDir
    device = dist.device(env)
    manifest = load_manifest(shards)
    backbone, cfg, adapted = _encoders(cfg, adapter, device,
                                       log if env.is_main else lambda _m: None)
    precision = "bf16" if adapted and adapted["bf16"] else cfg.backbone.dtype
    if env.is_main:
        log(dist.runtime_line(device, precision, "none (inference)"))
    run = RunDir(out, cfg, is_main=env.is_main).start()
    weights = backbone.weights_hash()     # an adapter's weights included: parts stay its own
    name_or_path = backbone.name_or_path
    times: dict = {}
    n, rank_seconds = _extract_parts(backbone, weights, shards, out, manifest, cfg, env,
                                     device, log, times)
    if env.is_main and n and times.get("loader_wait_s", 0) > 0.3 * rank_seconds:
        log(f"extract: rank 0 waited {times['loader_wait_s']:.1f} s of {rank_seconds:.1f} s for "
            f"the data loader (reading, decoding, preprocessing): more extract.num_workers "
            f"(now {cfg.extract.num_workers}) may help where cores are free")
    gated = None
    if adapted and isinstance(adapted.get("feature_gate"), dict):
        # ref + g (adapted - ref): the reference is the frozen backbone's features of the same
        # items, in their own parts folder (resumable like the adapted ones)
        del backbone
        frozen = load_backbone(cfg.backbone, device)
        ref_weights = frozen.weights_hash()
        if env.is_main:
            log(f"feature gate {adapted['feature_gate']}: also encoding with the frozen "
                f"backbone (the reference) into {out / REFERENCE}")
        _extract_parts(frozen, ref_weights, shards, out / REFERENCE, manifest, cfg, env,
                       device, log)
        gated = (out / REFERENCE, ref_weights, adapted["feature_gate"],
                 adapted["reference_dtype"])
    dist.barrier()
    meta = None
    if env.is_main:
        merged = merge_parts(shards, out, manifest, weights, cfg.extract.feature_dtype, gated)
        meta = {"backbone": name_or_path, "text_tower": cfg.backbone.text_tower or None,
                "weights_hash": weights, "dtype": cfg.extract.feature_dtype,
                "backbone_dtype": precision, "adapter": adapted, **merged,
                "shards": str(shards), "manifest_sha256": manifest_json(shard_source(shards))[1],
                "world_size": env.world_size, "seconds": round(time.perf_counter() - t0, 2),
                "rank0_items": n, "rank0_items_per_s": round(n / rank_seconds, 1) if n else None,
                **{f"rank0_{k}": round(v, 2) for k, v in times.items()},
                "created_by": f"ptmrec_dist {__version__}"}
        atomic_write_json(out / "meta.json", meta)
        run.log(step="extract", **{k: meta[k] for k in ("n_present", "seconds",
                                                          "rank0_items_per_s")})
    dist.barrier()
    return meta


def in_step(loader, backbone, env: DistEnv, encode):
    """The loader's batches; under ZeRO-3 with several ranks, also keeps the ranks' forward
    passes in step: ZeRO-3 all-gathers each layer's weights inside every forward, so a rank
    whose share of the items ends early must keep calling the towers (on a dummy batch, output
    dropped) until every rank is done, or the others wait in a collective until the timeout.
    One all-reduce of a flag per batch decides."""
    import torch

    from ptmrec_dist.dist import allreduce_tensor

    partitioned = env.world_size > 1 and any(hasattr(p, "ds_id") for p in backbone.parameters())
    if not partitioned:
        yield from loader
        return
    batches, dummy = iter(loader), None
    while True:
        batch = next(batches, None)
        if not allreduce_tensor(torch.tensor([0.0 if batch is None else 1.0]), op="max").item():
            return
        if batch is None:
            if dummy is None:
                size = backbone.image_size
                dummy = {"pixel_values": torch.zeros(1, 3, size, size),
                         **backbone.tokenize(["."])}
            encode(dummy)
            continue
        yield batch


def extract_all(backbone, shards: str | Path, cfg: Config, env: DistEnv, device: torch.device,
                verify: bool = True, show_progress: bool = False,
                modalities: tuple[str, ...] = ("image", "text"),
                loader_options: dict | None = None) -> dict[str, np.ndarray]:
    """Features of every item in memory, on every rank: each rank encodes its share of the
    items (as ``ptmrec extract`` deals them), then the tables are summed over the ranks (the
    shares are disjoint). Stage 2 re-extracts with its adapted backbone every epoch this way.
    Returns ``{m: float32 [n_items, d] for m in modalities, "present": bool [n_items]}``; a
    tower whose modality is not asked for does not run. ``show_progress``: a bar on the main
    rank (where :func:`~ptmrec_dist.logs.progress` shows bars). ``loader_options``: more
    ``DataLoader`` arguments (stage 2: its workers ignore the stop signals the trainer handles,
    :func:`~ptmrec_dist.train.checkpoint.loader_worker_options`)."""
    from torch.utils.data import DataLoader

    from ptmrec_dist.dist import allreduce_tensor

    manifest = load_manifest(shards)
    workers = cfg.extract.num_workers
    reader = ExactlyOnceItems(shards, rank=env.rank, world_size=env.world_size,
                              num_workers=workers, decode="pil",
                              on_bad_sample=cfg.data.on_bad_sample, verify=verify)
    loader = DataLoader(reader, batch_size=cfg.extract.batch_size, num_workers=workers,
                        collate_fn=Preprocess(backbone),
                        pin_memory=device.type == "cuda", **(loader_options or {}))
    n = manifest["n_items"]
    tables: dict[str, torch.Tensor] = {}
    seen = torch.zeros(n)

    def encode(batch) -> dict:
        out = {}
        if "image" in modalities:
            out["image"] = backbone.encode_images(batch["pixel_values"].to(device))
        if "text" in modalities:
            out["text"] = backbone.encode_texts(batch["input_ids"].to(device),
                                                batch["attention_mask"].to(device))
        return out

    with torch.no_grad(), progress(total=n // env.world_size, unit="item", desc="re-extract",
                                   leave=False, main=env.is_main, enabled=show_progress) as bar:
        for batch in in_step(loader, backbone, env, encode):
            encoded = encode(batch)
            for key, value in encoded.items():
                value = value.float().cpu()
                if key not in tables:
                    tables[key] = torch.zeros(n, value.shape[1])
                tables[key][batch["index"]] = value
            seen[batch["index"]] = 1
            bar.update(len(batch["index"]))
    # a rank with no items learns the widths from the others
    dims = torch.tensor([float(tables[m].shape[1]) if m in tables else 0.0 for m in modalities])
    dims = allreduce_tensor(dims, op="max")
    for key, d in zip(modalities, dims.long().tolist()):
        tables.setdefault(key, torch.zeros(n, d))
        tables[key] = allreduce_tensor(tables[key])
    seen = allreduce_tensor(seen)
    if int((seen > 1).sum()):
        raise PtmrecError(f"{shards}: {int((seen > 1).sum())} items encoded by more than one rank")
    return {**{m: tables[m].numpy() for m in modalities}, "present": (seen == 1).numpy()}
