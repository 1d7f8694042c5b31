"""Helpers for the tests that run WORLD_SIZE CPU processes (gloo on 127.0.0.1)."""

import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(rank: int, port: int) -> None:
    """One torch thread, then joins the gloo group of WORLD_SIZE ranks on ``port``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),  # a rank that waits in vain fails
    )


def save_result(out_dir: str, rank: int, obj) -> None:
    """Saves what rank ``rank`` hands back to :func:`spawn`."""
    torch.save(obj, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(worker, *args) -> list:
    """Runs worker(rank, port, out_dir, *args) on WORLD_SIZE ranks; returns, in rank
    order, what each rank saved with :func:`save_result`."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            worker, args=(free_port(), out_dir, *args), nprocs=WORLD_SIZE, join=True
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)
        ]
