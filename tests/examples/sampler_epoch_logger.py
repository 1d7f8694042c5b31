"""Runs the example (argv as its own; a script, for torchrun) with each
DistributedSampler iteration logged:
one JSON line {"rank", "epoch", "first"} per epoch and rank, appended to the file named
by $SAMPLER_LOG. Lets a torchrun test see which shuffle each epoch gets."""

import json
import os
import runpy
import sys
from pathlib import Path

import torch.utils.data

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cub_proxyanchor.py"

_iterate = torch.utils.data.DistributedSampler.__iter__


def _logged(self):
    indices = list(_iterate(self))
    with open(os.environ["SAMPLER_LOG"], "a") as f:
        line = {"rank": self.rank, "epoch": self.epoch, "first": indices[:4]}
        f.write(json.dumps(line) + "\n")
    return iter(indices)


if __name__ == "__main__":
    torch.utils.data.DistributedSampler.__iter__ = _logged
    sys.argv = [str(EXAMPLE), *sys.argv[1:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")
