"""Training: samplers, the DeepSpeed engine, stage 1 (and stage 2)."""
