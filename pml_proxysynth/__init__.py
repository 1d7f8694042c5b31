"""Proxy Synthesis and Sharing Matters as a pytorch-metric-learning plugin."""

__version__ = "0.1.0"

from . import datasets, losses, miners, utils
