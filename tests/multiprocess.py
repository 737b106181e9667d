"""Run a function on N ranks in fresh processes (gloo on CPU, or NCCL with one GPU per rank),
failing loudly on any rank's error."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, backend: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60), device_id=device_id,
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo") -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; re-raise any failure.

    ``backend="nccl"`` gives rank r the GPU r (the caller checks there are enough GPUs).
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_entry, args=(world_size, init_file, backend, fn, args), nprocs=world_size, join=True)
