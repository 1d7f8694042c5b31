"""Helpers for the tests that run WORLD_SIZE CPU processes (gloo on 127.0.0.1)."""

import datetime
import gc
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
# each spawn() of these tests takes 5-25 s on a 2-core CPU
SPAWN_TIMEOUT_S = 300


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


def _run_rank(rank: int, worker, *args) -> None:
    """Runs one rank's worker, then leaves the gloo group while the interpreter is whole.

    Left to the interpreter's shutdown, a DDP wrapper kept alive by a reference cycle
    (and, through it, the group's threads) was now and then destroyed badly: the rank
    aborted after its work was done ("terminate called without an active exception",
    SIGABRT; 2 of 20 runs of tests/examples/test_distributed_setup.py). The example's
    run() does the same for the same reason."""
    try:
        worker(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()


def spawn(worker, *args) -> list:
    """Runs worker(rank, port, out_dir, *args) on WORLD_SIZE ranks; returns, in rank
    order, what each rank saved with :func:`save_result`. Each rank leaves its process
    group when the worker returns.

    A rank that raises ends the others and the error is re-raised here (``mp.spawn``).
    Ranks that are still alive after ``SPAWN_TIMEOUT_S`` are killed and the test fails:
    a rank that raised inside DDP's backward can leave both ranks waiting on each other
    for good, past the process group's timeout (seen with torch 2.3), which would
    otherwise hang the test run."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(
            _run_rank,
            args=(worker, free_port(), out_dir, *args),
            nprocs=WORLD_SIZE,
            join=False,
        )
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(
                    f"{worker.__name__}: ranks still running after {SPAWN_TIMEOUT_S} s"
                )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)
        ]
