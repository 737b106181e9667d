"""The benchmark harness: launching ranks, timing passes, and counting the bytes a layer moves.

- :func:`run_ranks`: one process per rank (``torch.multiprocessing.spawn``), a free loopback
  port for the rendezvous, rank 0's JSON back.
- :func:`time_passes`: the timing of every benchmark here, passes back to back with one
  synchronisation at the end (:data:`TIMING_METHOD` goes into every JSON).
- :class:`LayerTraffic` and the ``*_minimum_bytes`` functions: what a layout sends per layer
  and rank, beside the minimum its algorithm needs; :func:`routing_balance`: how balanced a
  run's routing was, per expert and per EP rank.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.ports import free_port


# -- launch and timing ---------------------------------------------------------------------
def run_ranks(rank_main: Callable[..., None], num_ranks: int, args: object) -> dict:
    """Spawn ``rank_main(rank, num_ranks, port, args, result_file)`` per rank; return rank 0's JSON.

    ``port`` is a free loopback port for the rendezvous; rank 0 writes its result to
    ``result_file``.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "raw.json")
        mp.spawn(_run_rank, args=(rank_main, num_ranks, port, args, result_file), nprocs=num_ranks, join=True)
        with open(result_file) as f:
            return json.load(f)


def _run_rank(rank: int, rank_main: Callable[..., None], *args: object) -> None:
    """One spawned rank: ``rank_main``, then leave without interpreter shutdown.

    By then the rank has written what it measured and torn its process groups down; what an
    interpreter shutdown still destroys (objects the communication libraries' threads hold)
    can only fail a finished run. A CI run once lost a CPU rank to SIGABRT with "terminate
    called without an active exception", the message of a C++ thread destroyed while
    joinable. An exception in ``rank_main`` propagates as before.
    """
    rank_main(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: How :func:`time_passes` times (written into every benchmark's JSON).
TIMING_METHOD = "back-to-back"


def time_passes(run_pass: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Mean milliseconds of one pass on this rank, ``iters`` passes timed back to back.

    After ``warmup`` passes, one barrier and device synchronisation align the ranks; one more
    pass runs untimed so that the timer starts in steady state (the streamer's gathers for
    the next pass already in flight, as they are between any two passes of a model); then
    ``iters`` passes run with no synchronisation between them, and the window from the end of
    the lead-in pass to the end of the last one is divided by ``iters``. Both ends of the
    window are points of the compute stream in steady state, so no pass gets gathers done for
    free in an untimed gap. CUDA: events on the current stream; CPU: wall clock.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        run_pass()
    if dist.is_initialized():
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        run_pass()
        start.record()
        for _ in range(iters):
            run_pass()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    run_pass()
    start_s = time.perf_counter()
    for _ in range(iters):
        run_pass()
    return (time.perf_counter() - start_s) * 1e3 / iters


# -- bytes moved per layer -----------------------------------------------------------------
@dataclass(frozen=True)
class LayerTraffic:
    """Bytes one rank sends over links in one layer: what the layout moved, and the minimum
    its algorithm needs (see the ``*_minimum_bytes`` functions)."""

    moved: float
    minimum: float

    def __add__(self, other: LayerTraffic) -> LayerTraffic:
        return LayerTraffic(self.moved + other.moved, self.minimum + other.minimum)


def remote_token_rank_pairs(expert_ids: torch.Tensor, expert_owner: torch.Tensor, rank: int, world_size: int) -> int:
    """(token, rank) pairs where a rank other than the tokens' own ``rank`` owns at least one
    of the token's experts (``expert_ids [T, K]``; ``expert_owner [E]``: each expert's rank)."""
    owners = expert_owner[expert_ids]
    holds = torch.zeros(expert_ids.shape[0], world_size, dtype=torch.bool, device=expert_ids.device)
    holds.scatter_(1, owners, True)
    holds[:, rank] = False
    return int(holds.sum())


def ep_minimum_bytes(remote_pairs: int, hidden: int, element_bytes: int) -> int:
    """Expert parallelism: one hidden row per (token, remote rank holding one of its experts)
    out in the dispatch and one back in the combine (``remote_pairs`` from
    :func:`remote_token_rank_pairs`)."""
    return 2 * remote_pairs * hidden * element_bytes


def asyncep_minimum_bytes(layer_expert_bytes: int, world_size: int) -> float:
    """AsyncEP: a rank receives (and, all ranks alike, sends) the ``(N - 1) / N`` of a layer's
    experts it does not store."""
    return layer_expert_bytes * (world_size - 1) / world_size


def tp_minimum_bytes(group_tokens: int, hidden: int, element_bytes: int, world_size: int) -> float:
    """Tensor parallelism: two all-reduces of ``[group_tokens, hidden]`` per layer; a ring
    all-reduce (bandwidth-optimal) sends ``2 (N - 1) / N`` of the tensor from each rank."""
    return 2 * 2 * (world_size - 1) / world_size * group_tokens * hidden * element_bytes


# -- routing balance ----------------------------------------------------------------------
def max_over_mean(loads: torch.Tensor) -> float:
    """``max / mean`` of a load vector (1.0 = perfectly balanced)."""
    mean = loads.float().mean()
    return float(loads.float().max() / mean) if mean > 0 else 1.0


def routing_balance(ids_per_layer: Sequence[torch.Tensor], layout: ExpertShardLayout) -> dict[str, float]:
    """Achieved balance of the group's routing (ids summed over ranks): expert- and EP-rank-level."""
    expert_ratios, rank_ratios = [], []
    for ids in ids_per_layer:
        load = torch.bincount(ids.reshape(-1), minlength=layout.num_experts).to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(load)
        rank_load = torch.stack([load[list(layout.experts_of_rank(r))].sum() for r in range(layout.world_size)])
        expert_ratios.append(max_over_mean(load))
        rank_ratios.append(max_over_mean(rank_load))
    return {
        "expert_max_over_mean": statistics.mean(expert_ratios),
        "expert_max_over_mean_worst_layer": max(expert_ratios),
        "ep_rank_max_over_mean": statistics.mean(rank_ratios),
        "ep_rank_max_over_mean_worst_layer": max(rank_ratios),
    }
