"""The root of the dataclass tree and its validation: every section's ``checks()`` in one
fixed order, the first failing check reported as a :class:`ConfigError` naming the key.

The sections themselves live in :mod:`ptmrec_dist.config.inputs` and
:mod:`ptmrec_dist.config.training`; files, overrides and types in
:mod:`ptmrec_dist.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ptmrec_dist.config.inputs import (
    BackboneConfig, DataConfig, DemoBackboneConfig, ExtractConfig, SyntheticConfig,
)
from ptmrec_dist.config.training import (
    DistConfig, EvalConfig, LogConfig, PeftConfig, RecommenderConfig, Stage1Config,
    Stage2Config, TuneConfig,
)
from ptmrec_dist.errors import ConfigError

# The sections that have checks, in the order their checks run.
_CHECKED_SECTIONS = ("data", "synthetic", "demo_backbone", "extract", "stage1", "recommender",
                     "eval", "stage2", "peft", "tune", "backbone")
# These optimizer-step and checkpoint checks run after stage 2's others, in this order (as when
# validation was one table): with several bad keys, the one reported first stays the same.
_STEP_CHECKS = ("stage1.grad_accum", "stage1.checkpoint_every", "stage2.grad_accum",
                "stage1.grad_clip", "stage2.grad_clip", "stage2.warmup_steps",
                "stage2.checkpoint_every", "stage2.keep_checkpoints")


@dataclass
class Config:
    seed: int = 2026
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    demo_backbone: DemoBackboneConfig = field(default_factory=DemoBackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    dist: DistConfig = field(default_factory=DistConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "Config":
        # every check is evaluated before any is reported (a check that raises, e.g. a modulo
        # by zero, raises whatever else is wrong)
        checks = [(f"{name}.{key}", ok, what) for name in _CHECKED_SECTIONS
                  for key, ok, what in getattr(self, name).checks()]
        checks.sort(key=_check_rank)    # stable: within a rank, a section's own order
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {what} (got {get_key(self, key)!r})")
        return self


def _check_rank(check: tuple[str, bool, str]) -> tuple[int, int]:
    key = check[0]
    if key in _STEP_CHECKS:
        return _CHECKED_SECTIONS.index("stage2"), 1 + _STEP_CHECKS.index(key)
    return _CHECKED_SECTIONS.index(key.split(".")[0]), 0


def get_key(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
