"""Every random stream of the project, derived from the config's one ``seed``, listed in one place.

A draw's generator is keyed by ``(seed, ...)`` plus a *stream id* that keeps independent uses
apart, so that adding a use never shifts another's numbers and every stream is a pure function
of its key (the same on every rank, at every resume). The ids below are part of the results:
changing one changes the data, the splits or the trained models of every run.

==========================  =============================================  ==========================
where                       key                                            draws
==========================  =============================================  ==========================
data/splits.py              ``data.split_seed``                            MMRec random split keys
                            ``[data.subsample_seed, SUBSAMPLE]``           the per-user subsample
                            ``[data.cold_seed, COLD_ITEMS]``               the cold-start items
data/synthetic.py           ``[seed, SYN_ITEMS]``                          items' attributes
                            ``[seed, SYN_ITEM_IMAGE, item]``               an item's image
                            ``[seed, SYN_ITEM_TEXT, item]``                an item's texts
                            ``[seed, SYN_CAPTION_MENTION, item]``          what else its caption
                                                                           names
                            ``[seed, SYN_USERS]``                          users' tastes
                            ``[seed, SYN_INTERACTIONS, chunk]``            a chunk of users'
                                                                           interactions
                            ``[seed, SYN_GROUPED, chunk]``                 the same, grouped
                                                                           sampler (> 100k items)
clip/demo_backbone.py       ``[seed, BACKBONE_HOLDOUT]``                   held-out captions
diagnose.py                 ``[seed, DIAG_PAIRS]``                         co-interacted pairs
                            ``[seed, DIAG_PAIRS, 1]``                      random item pairs
                            ``[seed, DIAG_PROBE]``                         the probes' item split
data/readers.py             ``[seed, epoch]``                              stage 2's shard order
                            ``[seed, epoch, slot]``                        a reader's shard cycle
                            ``[seed, epoch, slot, READER_SAMPLES]``        its sample shuffle
train/sampler.py            ``[seed, epoch]``                              stage 1's permutation
                            ``[seed, epoch, step]``                        stage 1's negatives
                            ``step_seed(seed, epoch, step, STEP_MODEL)``   a stage-1 batch's
                                                                           model randomness
                            ``[seed, epoch, step, rank, STAGE2_USERS]``    stage 2's users per item
train/stage1.py             ``step_seed(seed, epoch, 0, EPOCH_MODEL)``     per-epoch model randomness
                                                                           (FREEDOM's pruning)
train/stage2.py             ``epoch_seed(seed, epoch)``                    the same in stage 2
                            (``[seed, epoch, STAGE2_EPOCH]``)
==========================  =============================================  ==========================

Model weights start from ``torch.manual_seed(seed)`` (the same initial weights, prompts and
adapters on every rank).
"""

from __future__ import annotations

import numpy as np

# data/splits.py
SUBSAMPLE = 11
COLD_ITEMS = 12
# data/synthetic.py
SYN_ITEMS = 0
SYN_ITEM_IMAGE = 1
SYN_ITEM_TEXT = 2
SYN_USERS = 3
SYN_INTERACTIONS = 5
SYN_GROUPED = 6
SYN_CAPTION_MENTION = 7
# clip/demo_backbone.py
BACKBONE_HOLDOUT = 7
# diagnose.py
DIAG_PAIRS = 21
DIAG_PROBE = 22
# data/readers.py
READER_SAMPLES = 1
# train/
STEP_MODEL = 0
EPOCH_MODEL = 1
STAGE2_USERS = 2
STAGE2_EPOCH = 3


def step_seed(seed: int, epoch: int, step: int, stream: int = STEP_MODEL) -> int:
    """One non-negative int64 for a torch generator (numpy generators take the key itself)."""
    return int(np.random.SeedSequence([seed, epoch, step, stream]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


def epoch_seed(seed: int, epoch: int) -> int:
    """Stage 2's per-epoch model randomness (a uint32 from ``[seed, epoch, STAGE2_EPOCH]``)."""
    return int(np.random.SeedSequence([seed, epoch, STAGE2_EPOCH]).generate_state(1)[0])
