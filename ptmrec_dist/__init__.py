"""ptmrec_dist: distributed PTMRec (parameter-efficient CLIP tuning for multimodal recommendation)."""

__version__ = "0.1.0"
