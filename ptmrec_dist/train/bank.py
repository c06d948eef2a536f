"""Stage 2's feature bank: every item's modal features as the student ranks with them.

The bank lives in the student (its item modal inputs: VBPR's feature table, FREEDOM's and BM3's
``<m>_embedding`` buffers). It is reset from a re-extraction with the current backbone at every
epoch end, and each training step writes the adapted features of its batch items.

A checkpoint saves the bank as it was at the epoch's start (the same on every rank; hard-linked
from the epoch's previous checkpoint, since it does not change within the epoch) plus, per rank,
the rows that rank wrote since: saving the whole bank at every checkpoint would make it the
largest file by far.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptmrec_dist.train.checkpoint import Checkpointer


class FeatureBank:
    def __init__(self, student):
        self.student = student
        self.at_epoch_start: dict[str, np.ndarray] = {}   # numpy, the same on every rank
        self._written: set[int] = set()                    # items this rank wrote since
        self._pending: list[torch.Tensor] = []             # their indices, not yet read back
        self.saved_in: Path | None = None                  # a checkpoint holding at_epoch_start

    def reset(self, features: dict[str, np.ndarray]) -> None:
        """The bank becomes ``features`` (a re-extraction of every item)."""
        modalities = self.student.modalities
        self.student.set_modal_inputs({m: torch.from_numpy(features[m]) for m in modalities})
        self.at_epoch_start = {m: features[m] for m in modalities}
        self._written, self._pending, self.saved_in = set(), [], None

    def write(self, items: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        """A training step's adapted features of its batch items."""
        self.student.update_modal_inputs(items, features)
        self._pending.append(items.detach())     # read back at a checkpoint, not every step
        #                                          (a GPU tensor's tolist() syncs the host)

    @property
    def written(self) -> set[int]:
        """The items this rank wrote since the last re-extraction."""
        if self._pending:
            self._written.update(torch.cat([t.cpu() for t in self._pending]).tolist())
            self._pending = []
        return self._written

    # ------------------------------------------------------------------ checkpoints
    def keys(self) -> list[str]:
        return sorted(self.at_epoch_start)

    def arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint stores once (main rank): the bank at the epoch's start."""
        return {f"bank_{k}": v for k, v in self.at_epoch_start.items()}

    def rank_rows(self) -> dict:
        """What a checkpoint stores per rank: the rows this rank wrote, as they are now."""
        items = torch.tensor(sorted(self.written), dtype=torch.long)
        tables = self.student.item_modal_inputs()
        values = {m: t.detach()[items.to(t.device)].cpu() for m, t in tables.items()}
        return {"items": items, "values": values}

    def restore(self, checkpointer: Checkpointer, path: Path, keys: list[str],
                rows: dict) -> None:
        """The bank of the checkpoint ``path``: its epoch-start arrays, then this rank's rows."""
        self.at_epoch_start = {k: checkpointer.array(path, f"bank_{k}") for k in keys}
        self.student.set_modal_inputs({m: torch.from_numpy(self.at_epoch_start[m])
                                       for m in self.student.modalities})
        if len(rows["items"]):
            self.student.update_modal_inputs(rows["items"], rows["values"])
        self._written, self._pending = set(rows["items"].tolist()), []
        self.saved_in = path
