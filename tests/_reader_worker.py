"""One rank of a real multi-process exactly-once read (launched by tests/test_readers.py).

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \
        tests/_reader_worker.py SHARDS [SHARDS ...] OUTFILE

Each rank gets its rank from the launcher's environment (``ptmrec_dist.dist.init``), reads every
shard folder with :class:`ExactlyOnceItems` through a ``DataLoader`` with 2 workers, and
all-gathers what it read; rank 0 writes ``{shards: [{rank, split, indices, item_ids}, ...]}`` as
JSON to OUTFILE. Not collected by pytest (the name does not start with ``test_``).
"""

from __future__ import annotations

import json
import sys

import torch.distributed as tdist
from torch.utils.data import DataLoader

from ptmrec_dist import dist
from ptmrec_dist.data.readers import ExactlyOnceItems, collate_items

NUM_WORKERS = 2


def read(shards: str, rank: int, world_size: int) -> dict:
    ds = ExactlyOnceItems(shards, rank=rank, world_size=world_size, num_workers=NUM_WORKERS,
                          decode="bytes")
    loader = DataLoader(ds, batch_size=4, num_workers=NUM_WORKERS, collate_fn=collate_items)
    indices, item_ids = [], []
    for batch in loader:
        assert all(img[:2] == b"\xff\xd8" for img in batch["image"]), "not JPEG bytes"
        indices += batch["index"].tolist()
        item_ids += batch["item_id"]
    return {"rank": rank, "split": ds.split, "indices": indices, "item_ids": item_ids}


def main(argv: list[str]) -> int:
    *shard_dirs, outfile = argv
    env = dist.init(backend="gloo", timeout_s=120)
    assert env.launcher == "torchrun", env
    result = {}
    for shards in shard_dirs:
        mine = read(shards, env.rank, env.world_size)
        gathered = [None] * env.world_size
        tdist.all_gather_object(gathered, mine)
        result[shards] = gathered
    if env.is_main:
        with open(outfile, "w", encoding="utf-8") as f:
            json.dump({"world_size": env.world_size, "results": result}, f)
    dist.barrier()
    dist.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
