"""Sections for what the stages read: interactions and shards, the synthetic generator, the
backbone, the demo backbone and feature extraction.

Each section with limits has ``checks()``: ``(key within the section, passed, what the value
must be)``, evaluated all at once; :meth:`Config.validate` reports the first failing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Interactions, catalog and shards (used by stats, shard, demo and every stage)."""

    path: str = ""                      # interactions: .inter / .csv file, or a folder holding one
    split: Literal["auto", "x_label", "random", "loo"] = "auto"  # auto: x_label if present, else random
    split_seed: int = 2026
    on_bad_sample: Literal["error", "skip"] = "error"
    catalog: str = ""                   # folder with items.jsonl + images; with the
    #                                     catalog.json of `ptmrec catalog` it owns the item index
    #                                     (n_items), whatever items the interactions hold
    subsample: float = 1.0              # fraction of each user's interactions kept (seeded;
    #                                     at least 5 or all), before the split
    subsample_seed: int = 0
    cold_items: float = 0.0             # fraction of the items with interactions held out
    #                                     entirely (cold start): their interactions are neither
    #                                     trained on nor in valid/test, but the "cold" split,
    #                                     ranked among the cold items by the content branch
    cold_seed: int = 0                  # which items are cold (seeded)
    shards: str = ""                    # folder with items-*.tar + manifest.json
    features: str = ""                  # item features: `ptmrec extract` output or a folder with
    #                                     MMRec's image_feat.npy/text_feat.npy ("" = next to the
    #                                     interactions file)
    shard_size: int = 1000              # items per shard
    image_size: int = 0                 # shorter image side at shard time; 0 keeps the original
    jpeg_quality: int = 95

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("shard_size", self.shard_size >= 1, "must be >= 1"),
            ("subsample", 0 < self.subsample <= 1, "must be in (0, 1]"),
            ("cold_items", 0 <= self.cold_items < 0.5, "must be in [0, 0.5)"),
            ("image_size", self.image_size >= 0, "must be >= 0 (0 keeps the original)"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "must be in 1..100"),
        ]


@dataclass
class SyntheticConfig:
    """The built-in benchmark generator (``ptmrec make-data synthetic``)."""

    n_items: int = 2000
    n_users: int = 2000
    seed: int = 0
    image_size: int = 64
    min_interactions: int = 5
    mean_interactions: float = 12.0     # mean interactions per user (>= min_interactions)
    temperature: float = 1.0            # softmax choice-model temperature
    popularity_weight: float = 0.5      # weight of log-popularity in the user utility
    caption_mention_prob: float = 0.0   # a pretraining caption also names each hidden attribute
                                        # (pattern, shape, material) with this probability
    sampler: str = "auto"               # interactions: exact (every user x every item), grouped
                                        # (users x attribute types), auto: exact to 100k items

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("n_items", self.n_items >= 10, "must be >= 10"),
            ("n_users", self.n_users >= 1, "must be >= 1"),
            ("image_size", self.image_size >= 16, "must be >= 16"),
            ("min_interactions", self.min_interactions >= 3, "must be >= 3"),
            ("mean_interactions", self.mean_interactions >= self.min_interactions,
             "must be >= synthetic.min_interactions"),
            ("min_interactions", self.min_interactions <= self.n_items // 2,
             "must be <= synthetic.n_items / 2"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("caption_mention_prob", 0 <= self.caption_mention_prob <= 1, "must be in [0, 1]"),
            ("sampler", self.sampler in ("auto", "exact", "grouped"),
             "must be auto, exact or grouped"),
        ]


@dataclass
class BackboneConfig:
    """Vision-language backbone: the frozen CLIP of extraction, the one stage 2 adapts."""

    name_or_path: str = ""              # local folder or hub id resolved through the HF cache
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    text_tower: str = ""                # optional BERT-style text encoder (path or hub id)
    modalities: Literal["both", "image", "text"] = "both"   # what the recommender reads

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("attn_implementation",
             self.attn_implementation != "flash_attention_2" or self.dtype != "fp32",
             "flash_attention_2 runs in bf16 or fp16 only: set backbone.dtype (or use sdpa)"),
        ]


@dataclass
class DemoBackboneConfig:
    """The small CLIP that ``ptmrec make-backbone`` pretrains on the generic captions."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    image_size: int = 64
    patch_size: int = 16
    projection_dim: int = 128
    max_text_len: int = 77              # item texts run to ~45 tokens; 32 cut the material word
    epochs: int = 16
    batch_size: int = 64
    lr: float = 5e-4
    holdout: float = 0.1                # fraction of items held out for retrieval accuracy
    corpus_items: int = 0               # demo/bench inputs: 0 pretrains on the catalog's own
                                        # captions; N on a separate synthetic corpus of N items

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("width", self.width % self.heads == 0, "must be a multiple of demo_backbone.heads"),
            ("image_size", self.image_size % self.patch_size == 0,
             "must be a multiple of demo_backbone.patch_size"),
            ("holdout", 0 < self.holdout < 1, "must be in (0, 1)"),
            ("corpus_items", self.corpus_items == 0 or self.corpus_items >= 20,
             "must be 0 (the catalog) or >= 20"),
        ]


@dataclass
class ExtractConfig:
    """``ptmrec extract``: frozen-backbone features of every item."""

    batch_size: int = 64
    num_workers: int = 2
    feature_dtype: Literal["fp16", "fp32"] = "fp16"

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
        ]
