"""Test configuration, read from the environment as PML's own tests do.

TEST_DEVICE   torch device for every test tensor (default "cpu")
TEST_DTYPES   comma-separated dtypes to loop over (default "float16,float32,float64")
"""

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
TEST_DTYPES = [
    getattr(torch, name)
    for name in os.environ.get("TEST_DTYPES", "float16,float32,float64").split(",")
]
WITH_COLLECT_STATS = os.environ.get("WITH_COLLECT_STATS", "false").lower() == "true"
