"""CLIP backbones: loading (local path or hub id), the demo backbone, feature extraction."""
