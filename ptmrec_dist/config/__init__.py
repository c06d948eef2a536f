"""One typed dataclass tree for every setting; a YAML file plus ``key=value`` overrides.

Unknown keys and wrong types raise :class:`ConfigError` naming the key (the CLI exits 2).
Every run writes the resolved tree to ``OUT/config.yaml``.

The tree and its validation: :mod:`.schema` (root), :mod:`.inputs`, :mod:`.training`
(sections, each with its own checks); files, overrides, type checks and YAML output:
:mod:`.loading`. Import from here: ``from ptmrec_dist.config import Config, load_config``.
"""

from ptmrec_dist.config.inputs import (
    BackboneConfig, DataConfig, DemoBackboneConfig, ExtractConfig, SyntheticConfig,
)
from ptmrec_dist.config.loading import (
    all_keys, load_config, merge_dicts, merge_into, parse_override, read_yaml, save_config,
    set_key, to_dict, to_yaml,
)
from ptmrec_dist.config.schema import Config, get_key
from ptmrec_dist.config.training import (
    BM3Config, BPRConfig, DistConfig, EvalConfig, FreedomConfig, LogConfig, PeftConfig,
    RecommenderConfig, Stage1Config, Stage2Config, TuneConfig, VBPRConfig,
)

__all__ = [
    "BM3Config", "BPRConfig", "BackboneConfig", "Config", "DataConfig", "DemoBackboneConfig",
    "DistConfig", "EvalConfig", "ExtractConfig", "FreedomConfig", "LogConfig", "PeftConfig",
    "RecommenderConfig", "Stage1Config", "Stage2Config", "SyntheticConfig", "TuneConfig",
    "VBPRConfig", "all_keys", "get_key", "load_config", "merge_dicts", "merge_into",
    "parse_override", "read_yaml", "save_config", "set_key", "to_dict", "to_yaml",
]
