"""Item features for the base recommenders: ``ptmrec extract`` output or MMRec's release files.

Looked up, in order: ``data.features`` if set (a folder holding ``image.npy``/``text.npy`` from
``ptmrec extract``, or MMRec's ``image_feat.npy``/``text_feat.npy``), else the folder of the
interactions file (where MMRec's releases keep them). Rows are items in index order; the row count
must equal the number of items. Items ``ptmrec extract`` could not read (``present.npy`` False)
get zero vectors and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptmrec_dist.errors import ConfigError, InputError

NAMES = {"image": ("image.npy", "image_feat.npy"), "text": ("text.npy", "text_feat.npy")}


def modality_names(modalities: str) -> tuple[str, ...]:
    """``backbone.modalities`` (``both``, ``image``, ``text``) as the modality names it keeps."""
    return ("image", "text") if modalities == "both" else (modalities,)


@dataclass
class ItemFeatures:
    image: np.ndarray | None = None
    text: np.ndarray | None = None
    source: str = ""
    n_missing: int = 0

    def get(self, name: str) -> np.ndarray | None:
        return getattr(self, name)

    @property
    def empty(self) -> bool:
        return self.image is None and self.text is None

    def describe(self) -> str:
        dims = ", ".join(f"{m} {getattr(self, m).shape[1]}-d" for m in ("image", "text")
                         if getattr(self, m) is not None)
        return f"{dims or 'none'} from {self.source or '-'}"


def _load(path: Path, n_items: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable .npy array: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != n_items:
        hint = ""
        if arr.ndim == 2 and arr.shape[0] > n_items:
            hint = ("; if the interactions are a subset of a larger catalog, set data.catalog "
                    "to the catalog folder (its catalog.json owns the item index)")
        raise InputError(path, f"expected shape ({n_items}, dim) (one row per item), "
                               f"got {tuple(arr.shape)}{hint}")
    out = np.array(arr, dtype=np.float32)          # a writable copy, never the read-only map
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise InputError(path, f"row {bad} (item index {bad}) holds a NaN or infinite value")
    return out


def load_item_features(folder: str | Path, n_items: int,
                       modalities: tuple[str, ...] = ("image", "text")) -> ItemFeatures:
    """The folder's features of ``modalities`` (the others are not read)."""
    folder = Path(folder)
    feats = ItemFeatures(source=str(folder))
    for modality in modalities:
        candidates = NAMES[modality]
        for name in candidates:
            if (folder / name).is_file():
                setattr(feats, modality, _load(folder / name, n_items))
                break
    present_file = folder / "present.npy"
    if present_file.is_file() and not feats.empty:
        present = np.load(present_file, allow_pickle=False).astype(bool)
        if present.shape != (n_items,):
            raise InputError(present_file, f"expected {n_items} flags, got {present.shape}")
        for modality in ("image", "text"):
            arr = feats.get(modality)
            if arr is not None:
                arr[~present] = 0.0
        feats.n_missing = int((~present).sum())
    return feats


def resolve_features(data_cfg, interactions_path: Path, n_items: int, required: bool,
                     modalities: str = "both") -> ItemFeatures:
    """Features for a run (see the module doc), of ``modalities`` (``backbone.modalities``);
    ``required`` models get a clear error if none."""
    folder = Path(data_cfg.features) if data_cfg.features else interactions_path.parent
    if data_cfg.features and not folder.is_dir():
        raise ConfigError(f"data.features: no such folder: {folder}")
    wanted = modality_names(modalities)
    feats = load_item_features(folder, n_items, wanted)
    if required and feats.empty:
        files = "/".join(f"{m}.npy" for m in wanted)
        raise ConfigError(
            f"this recommender needs item features ({' and '.join(wanted)}: "
            f"backbone.modalities={modalities}), and none were found in {folder} "
            f"(looked for {files} from `ptmrec extract` and MMRec's "
            f"{'/'.join(f'{m}_feat.npy' for m in wanted)}); set data.features=FOLDER")
    return feats
