"""A small demo run (data, shards, backbone, features, stage 1 vbpr, stage 2 PTMRec) shared by the
stage-2, SLURM and tuning tests through the session fixture ``demo`` (conftest.py)."""

from pathlib import Path

SMALL = ["synthetic.n_items=120", "synthetic.n_users=60", "data.shard_size=40",
         "demo_backbone.width=32", "demo_backbone.heads=2", "demo_backbone.layers=2",
         "demo_backbone.epochs=1", "extract.num_workers=0", "stage1.epochs=3",
         "stage2.epochs=2", "stage2.batch_size=16", "stage2.num_workers=0",
         "stage2.prompt_len=2", "stage2.prompt_depth=2"]


def build_small_demo(out: Path) -> dict:
    """``ptmrec demo --size tiny`` with :data:`SMALL` into ``out``; returns the summary."""
    import torch

    from ptmrec_dist.config import load_config
    from ptmrec_dist.demo import demo_config, run_demo

    torch.set_num_threads(1)
    cfg = load_config(None, SMALL, base=demo_config("tiny"))
    return run_demo(cfg, out, "tiny", log=lambda *_: None)


def stage2_cfg(out: Path, *overrides: str):
    """A stage-2 config on the small demo in ``out`` (its stage-1 run as the teacher, its
    shards) with ``key=value`` overrides."""
    from ptmrec_dist.config import load_config

    cfg = load_config(out / "stage1" / "config.yaml", SMALL)
    cfg.data.shards = str(out / "shards")
    cfg.stage2.teacher = str(out / "stage1")
    return load_config(None, list(overrides), base=cfg)
