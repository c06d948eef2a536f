"""``ptmrec plan``: per-rank memory of the stage-2 job a config describes, before running it.

The model behind the numbers (symbols, ZeRO, activations, recommender, total) and what the
tests measure are in docs/plan.md. One module per concern: :mod:`.meta` (the backbone on the
meta device), :mod:`.activations` (what trains per layer, what autograd saves), :mod:`.zero`
(the DeepSpeed config, ZeRO partitioning, optimizer bytes, DeepSpeed's buffers),
:mod:`.recommender` (data and recommender sizes), :mod:`.planner` (the plan, the micro-batch
suggestion, :func:`estimate`), :mod:`.render` (the table).
"""

from ptmrec_dist.plan.activations import (LINEARS, LayerSpec, TowerSpec, activation_bytes,
                                          tower_specs)
from ptmrec_dist.plan.meta import build_meta_backbone
from ptmrec_dist.plan.planner import GIB, HEADROOM, Planner, estimate
from ptmrec_dist.plan.recommender import data_sizes, recommender_sizes
from ptmrec_dist.plan.render import LABELS, ROWS, format_plan
from ptmrec_dist.plan.zero import (DTYPE_BYTES, ZERO_DEFAULTS, Group, optimizer_bytes_per_param,
                                   partition, precision_of, resolve_stage2_ds, zero_buffer_bytes,
                                   zero_settings)

__all__ = ["DTYPE_BYTES", "GIB", "HEADROOM", "LABELS", "LINEARS", "ROWS", "ZERO_DEFAULTS",
           "Group", "LayerSpec", "Planner", "TowerSpec", "activation_bytes",
           "build_meta_backbone", "data_sizes", "estimate", "format_plan",
           "optimizer_bytes_per_param", "partition", "precision_of", "recommender_sizes",
           "resolve_stage2_ds", "tower_specs", "zero_buffer_bytes", "zero_settings"]
