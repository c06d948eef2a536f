"""The recommender's part of the plan: users / items / interactions from the data or the
command line, and the stage-2 student's sizes, which each model class states itself
(``Recommender.planned_sizes``); docs/plan.md, "Recommender"."""

from __future__ import annotations

from ptmrec_dist.config import Config
from ptmrec_dist.errors import ConfigError


def data_sizes(cfg: Config, users: int | None = None, items: int | None = None) -> dict | None:
    """``n_users``, ``n_items`` (and ``n_interactions``) from ``data.path`` (parsed, not split)
    or the given numbers; None when neither is there."""
    if cfg.data.path:
        from ptmrec_dist.data.interactions import find_interactions_file, parse_interactions
        path = find_interactions_file(cfg.data.path)
        parsed = parse_interactions(path)
        return {"n_users": parsed.n_users, "n_items": parsed.n_items,
                "n_interactions": parsed.raw_rows, "source": str(path)}
    if users is not None and items is not None:
        if users < 1 or items < 1:
            raise ConfigError(f"--users and --items must be >= 1 (got {users}, {items})")
        return {"n_users": users, "n_items": items, "n_interactions": None,
                "source": "--users/--items"}
    if (users is None) != (items is None):
        raise ConfigError("pass both --users and --items (or set data.path)")
    return None


def recommender_sizes(cfg: Config, n_users: int, n_items: int, feature_dim: int,
                      n_interactions: int | None = None, modalities=("image", "text")) -> dict:
    """Sizes of the stage-2 student on image and text features of ``feature_dim`` (the
    backbone's projection size, as stage 2 requires): ``trainable`` elements (the parameters the
    engine gets), ``buffers_bytes`` (fp32) and what its activations depend on."""
    from ptmrec_dist import rec

    name = cfg.recommender.name
    model = rec.model_class(name)
    if not model.needs_features:
        raise ConfigError(f"recommender.name={name} uses no item features: stage 2 adapts the "
                          "backbone that produces them (use vbpr, freedom or bm3)")
    sizes = model.planned_sizes(n_users, n_items, feature_dim, cfg.recommender,
                                n_interactions, len(modalities))
    if sizes is None:   # a model registered later that does not state its sizes
        raise ConfigError(f"ptmrec plan does not know the sizes of recommender.name={name}")
    graph_layers, buffers, notes = sizes["graph_layers"], sizes["buffers_bytes"], []
    if graph_layers and n_interactions is None:
        notes.append("the recommender's graphs are not counted (the number of interactions "
                     "needs data.path)")
    if cfg.stage2.teacher:
        buffers += (n_users + n_items) * sizes["repr_dim"] * 4   # teacher_users / teacher_items
    embedding_dim = cfg.recommender.embedding_dim
    fixed_act = 2 * (graph_layers + 2) * (n_users + n_items) * embedding_dim \
        if graph_layers else 0
    return {"name": name, "trainable": sizes["trainable"], "buffers_bytes": buffers,
            "act_fixed": fixed_act, "act_rows_per_item": cfg.stage2.users_per_item,
            "notes": notes}


def recommender_activation_elems(rec_sizes: dict, micro: int) -> int:
    """Activation elements of the recommender for a micro batch of ``micro`` items: the graph
    propagation (fixed) and the in-batch score matrices ``[R, B]``."""
    rows = micro * rec_sizes["act_rows_per_item"]
    return rec_sizes["act_fixed"] + 8 * rows * micro
