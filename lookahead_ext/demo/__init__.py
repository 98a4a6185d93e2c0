"""The README's main job: sharpness-aware optimizers vs SGD on scikit-learn's digits with
noisy training labels (``python -m lookahead_ext.demo``; see docs/demo.md)."""
from .cli import main

__all__ = ["main"]
