"""Base recommenders behind one small interface (:class:`~ptmrec_dist.rec.base.Recommender`),
and a registry by name. A new model is one file plus one line in ``_MODULES``."""

from __future__ import annotations

import importlib

from ptmrec_dist.errors import ConfigError

# registry name -> module defining the class ``MODEL``
_MODULES = {
    "pop": "ptmrec_dist.rec.pop",
    "bpr": "ptmrec_dist.rec.bpr",
    "vbpr": "ptmrec_dist.rec.vbpr",
    "freedom": "ptmrec_dist.rec.freedom",
    "bm3": "ptmrec_dist.rec.bm3",
}


def names() -> list[str]:
    return list(_MODULES)


def model_class(name: str):
    if name not in _MODULES:
        raise ConfigError(f"config key 'recommender.name': unknown model {name!r}; "
                          f"available: {', '.join(names())}")
    return importlib.import_module(_MODULES[name]).MODEL

