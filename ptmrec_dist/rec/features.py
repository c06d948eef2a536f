"""Item features for the base recommenders: ``ptmrec extract`` output or MMRec's release files.

Looked up, in order: ``data.features`` if set (a folder holding ``image.npy``/``text.npy`` from
``ptmrec extract``, or MMRec's ``image_feat.npy``/``text_feat.npy``), else the folder of the
interactions file (where MMRec's releases keep them). Rows are items in index order; the row count
must equal the number of items. Items ``ptmrec extract`` could not read (``present.npy`` False)
get zero vectors and are counted. Arrays must hold real numbers (float or integer dtypes), all
finite: :func:`check_matrix` names the file and the dtype, or the first row holding NaN/inf.
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


REAL_KINDS = "fiub"      # float, signed and unsigned integer, boolean
KIND_NAMES = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers",
              "M": "dates", "m": "time spans", "V": "records"}


def _header_dtype(path: Path) -> np.dtype | None:
    """The dtype a ``.npy`` header declares (None if it cannot be read)."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            return np.dtype(read(f)[2])
    except (OSError, ValueError, TypeError):
        return None


def _dtype_error(path: Path, dtype: np.dtype) -> InputError:
    kind = KIND_NAMES.get(dtype.kind, dtype.name)
    return InputError(path, f"dtype {dtype} ({kind}): expected real numbers (a float or integer "
                            "array; save it with .astype(np.float32))")


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array of real numbers; anything else (unreadable, of strings, objects,
    complex numbers, dates, records) is an :class:`InputError` naming the file (and the dtype)."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        dtype = _header_dtype(path)
        if dtype is not None and dtype.kind not in REAL_KINDS:   # object arrays fail to load
            raise _dtype_error(path, dtype) from None
        raise InputError(path, f"not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(path, "not a .npy array (an .npz archive?)")
    if arr.dtype.kind not in REAL_KINDS:
        raise _dtype_error(path, arr.dtype)
    return arr


def check_finite(path: Path, arr: np.ndarray, what: str = "item index",
                 problem: str = "a NaN or infinite value") -> None:
    """NaN or inf anywhere in the rows of ``arr``: an InputError naming the file and the first
    bad row (``what`` says what a row is)."""
    if arr.dtype.kind != "f" or not arr.size:
        return
    finite = np.isfinite(arr)
    if not finite.all():
        rows = finite.reshape(len(arr), -1) if arr.ndim else finite.reshape(1, 1)
        bad = int(np.flatnonzero(~rows.all(axis=1))[0])
        raise InputError(path, f"row {bad} ({what} {bad}) holds {problem}")


def read_representations(path: Path, what: str) -> np.ndarray:
    """One exported representation matrix of a run (``user_repr.npy``, ``item_repr.npy``;
    ``what``: ``"user"`` or ``"item"``): 2-d, real and finite, else an :class:`InputError` naming
    the file (and the first bad row: a run that diverged has metrics that mean nothing)."""
    arr = read_npy(path)
    if arr.ndim != 2:
        raise InputError(path, f"expected a ({what}s, dim) matrix, got shape {tuple(arr.shape)}")
    check_finite(path, arr, what=f"{what} index", problem="a value that is not finite (NaN or inf)")
    return arr


def _load(path: Path, n_items: int) -> np.ndarray:
    arr = read_npy(path, mmap=True)
    if arr.ndim != 2 or arr.shape[0] != n_items:
        hint = ""
        if arr.ndim == 2 and arr.shape[0] > n_items:
            hint = ("; if the interactions are a subset of a larger catalog, set data.catalog "
                    "to the catalog folder (its catalog.json owns the item index)")
        raise InputError(path, f"expected shape ({n_items}, dim) (one row per item), "
                               f"got {tuple(arr.shape)}{hint}")
    check_finite(path, arr)
    out = np.array(arr, dtype=np.float32)          # a writable copy, never the read-only map
    check_finite(path, out, problem="a value beyond float32's range")
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
