"""``zeroprefill calibrate``: measure this machine's hardware profile (about a minute).

Measures, on the GPUs it runs on, what the saturation threshold is made of and writes a
:class:`~zeroprefill.common.hardware.HardwareProfile` JSON that ``zeroprefill plan
--profile`` and the router read:

1. GPU memory (``torch.cuda.mem_get_info`` total) and HBM bandwidth (device copy, read + write).
2. GEMM rate at MoE shapes (Qwen3-235B-A22B experts with 16K tokens per GPU: 1024 tokens per
   expert, ``[1024, 4096] x [4096, 3072]`` and ``[1024, 1536] x [1536, 4096]``), bf16 via
   ``torch.bmm`` over 32 experts and FP8 via ``torch._scaled_mm`` per expert.
3. With 2+ GPUs (one process per GPU, NCCL): AllGather bus bandwidth at 16 MiB .. 1 GiB per
   rank, AllToAll bus bandwidth at 256 MiB per rank, and the bf16 GEMM slowdown while
   AllGathers run on a side stream (the overlap tax).
4. With 2+ GPUs and torch symmetric memory: the same for the copy-engine transport AsyncEP
   uses by default (``CopyEngineGather``: peer pulls by the copy engines), at 256 MiB and
   1 GiB per rank, and its overlap tax; then 1 GiB pulled over 1, 2 and 4 streams at once
   (``ZEROPREFILL_ASYNCEP_COPY_STREAMS``), recorded in the profile's notes (with one stream the
   local shard's copy follows the pulls, with more it overlaps them: a few percent of the gap).

What it cannot measure (one GPU: no collectives; the network between nodes) keeps the
shipped profile's value for this GPU with a source saying so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from zeroprefill.common.hardware import (
    SHIPPED_GPU_COUNTS,
    HardwareProfile,
    shipped_gpu_for,
    shipped_profile,
)
from zeroprefill.ports import free_port

MiB = 1 << 20
GiB = 1 << 30
#: Qwen3-235B-A22B expert shapes at 16K tokens per GPU, top-8 of 128 experts.
MOE_HIDDEN, MOE_FFN, TOKENS_PER_EXPERT, EXPERTS_PER_BATCH = 4096, 1536, 1024, 32
ALLGATHER_MESSAGE_BYTES = (16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
COPY_ENGINE_MESSAGE_BYTES = (256 * MiB, 1 * GiB)
COPY_STREAM_COUNTS = (1, 2, 4)
ALLTOALL_MESSAGE_BYTES = 256 * MiB
SLOWDOWN_MESSAGE_BYTES = 256 * MiB
MIN_MEASURE_S = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="profile JSON to write; unset: <gpu>x<N>-calibrated.json here")
    parser.add_argument("--gpus", type=int, help="GPUs to measure over; unset: all visible")


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "zeroprefill calibrate: error: no CUDA GPU visible (torch "
            f"{torch.__version__}); run it on the GPU machine, or plan with a shipped profile "
            "(zeroprefill plan --gpu h200)",
            file=sys.stderr,
        )
        return 2
    visible = torch.cuda.device_count()
    num_gpus = args.gpus or visible
    if not 1 <= num_gpus <= visible:
        print(
            f"zeroprefill calibrate: error: --gpus {num_gpus} but {visible} GPU(s) visible",
            file=sys.stderr,
        )
        return 2
    gpu_name = torch.cuda.get_device_name(0)
    kind = shipped_gpu_for(gpu_name)
    steps = 4 + (3 if num_gpus > 1 else 0)
    progress = Progress(steps)
    measured: dict[str, Any] = {"single": measure_single_gpu(progress)}
    if num_gpus > 1:
        measured["collectives"] = measure_collectives(num_gpus, progress)
    profile = build_profile(gpu_name, kind, num_gpus, visible, measured)
    out = args.out or f"{profile.name}.json"
    profile.save(out)
    progress.done(f"wrote {out}; use it with: zeroprefill plan --profile {out} --model ...")
    return 0


class Progress:
    """A one-line progress bar on stderr: ``[####....] 3/7 what: result``."""

    def __init__(self, steps: int) -> None:
        self.steps, self.current, self.start = steps, 0, time.perf_counter()

    def step(self, what: str, result: str) -> None:
        self.current += 1
        filled = round(20 * self.current / self.steps)
        elapsed = time.perf_counter() - self.start
        print(
            f"[{'#' * filled}{'.' * (20 - filled)}] {self.current}/{self.steps} "
            f"{what}: {result} ({elapsed:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def done(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


# -- measurements --------------------------------------------------------------------------
def time_cuda_s(fn: Callable[[], None], min_total_s: float = MIN_MEASURE_S) -> float:
    """Mean seconds per call of ``fn`` on the current stream (warm-up, then CUDA events)."""
    import torch

    fn()
    torch.cuda.synchronize()
    iterations = 1
    while True:
        total = events_s(fn, iterations)
        if total >= min_total_s or iterations >= 1 << 12:
            return total / iterations
        iterations *= 2


def events_s(fn: Callable[[], None], iterations: int) -> float:
    """Seconds that ``iterations`` calls of ``fn`` take on the current stream, between two CUDA events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def moe_gemm_bf16(device: Any) -> tuple[Callable[[], None], int]:
    """One batch of expert GEMMs at MoE shapes (bf16 ``bmm``) and its FLOPs."""
    import torch

    e, m, h, i = EXPERTS_PER_BATCH, TOKENS_PER_EXPERT, MOE_HIDDEN, MOE_FFN
    x = torch.randn(e, m, h, device=device, dtype=torch.bfloat16)
    w13 = torch.randn(e, h, 2 * i, device=device, dtype=torch.bfloat16)
    act = torch.randn(e, m, i, device=device, dtype=torch.bfloat16)
    w2 = torch.randn(e, i, h, device=device, dtype=torch.bfloat16)

    def fn() -> None:
        torch.bmm(x, w13)
        torch.bmm(act, w2)

    return fn, 2 * e * m * (h * 2 * i + i * h)


def moe_gemm_fp8(device: Any) -> tuple[Callable[[], None], int]:
    """The same expert GEMMs in FP8 (``torch._scaled_mm`` per expert, bf16 output)."""
    import torch

    e, m, h, i = EXPERTS_PER_BATCH, TOKENS_PER_EXPERT, MOE_HIDDEN, MOE_FFN
    fp8 = torch.float8_e4m3fn
    x = torch.randn(m, h, device=device).to(fp8)
    act = torch.randn(m, i, device=device).to(fp8)
    # _scaled_mm wants the second operand column-major: a transposed row-major [N, K].
    w13 = [torch.randn(2 * i, h, device=device).to(fp8).t() for _ in range(e)]
    w2 = [torch.randn(h, i, device=device).to(fp8).t() for _ in range(e)]
    one = torch.ones((), device=device, dtype=torch.float32)

    def fn() -> None:
        for a, b in zip(w13, w2):
            torch._scaled_mm(x, a, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            torch._scaled_mm(act, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    return fn, 2 * e * m * (h * 2 * i + i * h)


def measure_single_gpu(progress: Progress) -> dict[str, Any]:
    import torch

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    results: dict[str, Any] = {}
    _, total_bytes = torch.cuda.mem_get_info(device)
    results["gpu_memory_bytes"] = int(total_bytes)
    progress.step("GPU memory", f"{total_bytes / GiB:.1f} GiB")

    src = torch.empty(GiB, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = time_cuda_s(lambda: dst.copy_(src))
    results["hbm_gbps"] = 2 * GiB / copy_s / 1e9
    progress.step("HBM device copy (1 GiB)", f"{results['hbm_gbps']:.0f} GB/s")
    del src, dst

    fn, flops = moe_gemm_bf16(device)
    results["gemm_bf16_tflops"] = flops / time_cuda_s(fn) / 1e12
    progress.step("bf16 GEMM at MoE shapes", f"{results['gemm_bf16_tflops']:.0f} TFLOP/s")
    try:
        fn, flops = moe_gemm_fp8(device)
        results["gemm_fp8_tflops"] = flops / time_cuda_s(fn) / 1e12
        progress.step("FP8 GEMM at MoE shapes", f"{results['gemm_fp8_tflops']:.0f} TFLOP/s")
    except (RuntimeError, AttributeError, TypeError) as exc:  # no FP8 tensor cores / old torch
        results["gemm_fp8_error"] = str(exc).splitlines()[0][:200]
        progress.step("FP8 GEMM at MoE shapes", f"not measured ({results['gemm_fp8_error']})")
    torch.cuda.empty_cache()
    return results


def measure_collectives(num_gpus: int, progress: Progress) -> dict[str, Any]:
    """AllGather sweep, AllToAll and the overlap tax over ``num_gpus`` NCCL ranks."""
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    workers = [
        context.Process(target=_collective_worker, args=(rank, num_gpus, port, queue))
        for rank in range(num_gpus)
    ]
    for worker in workers:
        worker.start()
    results: dict[str, Any] = {}
    try:
        while True:
            kind, payload = queue.get()
            if kind == "progress":
                progress.step(*payload)
            elif kind == "error":
                raise RuntimeError(f"collective measurement failed: {payload}")
            else:
                results = payload
                break
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    return results


def _collective_worker(rank: int, world_size: int, port: int, queue: Any) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            device_id=device,
        )
        results = _measure_collectives(rank, world_size, device, queue)
        if rank == 0:
            queue.put(("result", results))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # report to the parent instead of hanging it
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def _measure_collectives(rank: int, n: int, device: Any, queue: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    def report(what: str, result: str) -> None:
        if rank == 0:
            queue.put(("progress", (what, result)))

    def timed(fn: Callable[[], None]) -> float:
        # Same iteration count on every rank: collectives must match one for one.
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        iterations = 5
        elapsed = torch.tensor([events_s(fn, iterations) / iterations], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed.item())

    results: dict[str, Any] = {"allgather": []}
    for size in ALLGATHER_MESSAGE_BYTES:
        shard = torch.empty(size, dtype=torch.uint8, device=device)
        out = torch.empty(n * size, dtype=torch.uint8, device=device)
        seconds = timed(lambda: dist.all_gather_into_tensor(out, shard))
        results["allgather"].append((size, size * (n - 1) / seconds / 1e9))
        del shard, out
    sweep = ", ".join(f"{s // MiB} MiB {bw:.0f}" for s, bw in results["allgather"])
    report("NCCL AllGather bus bw (GB/s)", sweep)

    send = torch.empty(ALLTOALL_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    seconds = timed(lambda: dist.all_to_all_single(recv, send))
    results["alltoall_bus_gbps"] = ALLTOALL_MESSAGE_BYTES * (n - 1) / n / seconds / 1e9
    report("NCCL AllToAll bus bw (256 MiB)", f"{results['alltoall_bus_gbps']:.0f} GB/s")
    del send, recv

    gemm, _ = moe_gemm_bf16(device)
    gemm_runs = 20
    alone_s = timed(lambda: [gemm() for _ in range(gemm_runs)])
    shard = torch.empty(SLOWDOWN_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    out = torch.empty(n * SLOWDOWN_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    results["gemm_slowdown"] = _gemm_slowdown(
        lambda: dist.all_gather_into_tensor(out, shard), gemm, gemm_runs, alone_s, timed, device)
    del shard, out
    report("GEMM slowdown under NCCL AllGather", f"{results['gemm_slowdown']:.1%}")

    from zeroprefill.common.transport import _has_symmetric_memory

    if not _has_symmetric_memory():
        report("copy-engine gather", "not measured: this torch has no symmetric memory")
        return results
    try:
        results["copy_engine"] = _measure_copy_engine(n, device, gemm, gemm_runs, alone_s, timed, report)
    except (RuntimeError, OSError) as exc:  # the NCCL figures above still count
        report("copy-engine gather", f"not measured: {type(exc).__name__}: {exc}")
    return results


def _copy_engine_gather(n: int, size: int, device: Any, copy_streams: int = 1) -> Callable[[], None]:
    """One layer's gather through AsyncEP's copy-engine transport, ``size`` bytes per rank."""
    import torch

    from zeroprefill.common.transport import CopyEngineGather

    transport = CopyEngineGather(copy_streams=copy_streams)
    transport.register([{"experts": torch.zeros(size, dtype=torch.uint8, device=device)}])
    out = torch.empty(n * size, dtype=torch.uint8, device=device)
    return lambda: transport.gather(0, "experts", out)


def _measure_copy_engine(n: int, device: Any, gemm: Callable[[], None], gemm_runs: int, alone_s: float,
                         timed: Callable[[Callable[[], None]], float],
                         report: Callable[[str, str], None]) -> dict[str, Any]:
    """Bus bandwidth (local shard copy included, as a layer's gather does it) and overlap tax."""
    results: dict[str, Any] = {"allgather": []}
    for size in COPY_ENGINE_MESSAGE_BYTES:
        gather = _copy_engine_gather(n, size, device)
        results["allgather"].append((size, size * (n - 1) / timed(gather) / 1e9))
    sweep = ", ".join(f"{s // MiB} MiB {bw:.0f}" for s, bw in results["allgather"])
    report("copy-engine gather bus bw (GB/s)", sweep)
    results["by_copy_streams"] = []
    for streams in COPY_STREAM_COUNTS:
        gather = _copy_engine_gather(n, GiB, device, streams)
        results["by_copy_streams"].append((streams, GiB * (n - 1) / timed(gather) / 1e9))
    sweep = ", ".join(f"{streams}: {bw:.0f}" for streams, bw in results["by_copy_streams"])
    report("copy-engine 1 GiB gather by streams (GB/s)", sweep)
    gather = _copy_engine_gather(n, SLOWDOWN_MESSAGE_BYTES, device)
    results["gemm_slowdown"] = _gemm_slowdown(gather, gemm, gemm_runs, alone_s, timed, device)
    report("GEMM slowdown under copy-engine gathers", f"{results['gemm_slowdown']:.1%}")
    return results


def _gemm_slowdown(gather: Callable[[], object], gemm: Callable[[], None], gemm_runs: int, alone_s: float,
                   timed: Callable[[Callable[[], None]], float], device: Any) -> float:
    """How much slower ``gemm_runs`` GEMMs run while gathers stream on a side stream."""
    import torch
    import torch.distributed as dist

    gather_s = timed(gather)
    # Enough gathers on the side stream to cover the whole GEMM run, same count on every rank.
    gathers = int(alone_s * 1.5 / gather_s) + 2
    side = torch.cuda.Stream(device)
    torch.cuda.synchronize()
    dist.barrier()
    with torch.cuda.stream(side):
        for _ in range(gathers):
            gather()
    concurrent = torch.tensor([events_s(gemm, gemm_runs)], device=device)
    side.synchronize()
    dist.all_reduce(concurrent, op=dist.ReduceOp.MAX)
    return max(0.0, float(concurrent.item()) / alone_s - 1.0)


# -- the profile ---------------------------------------------------------------------------
def build_profile(
    gpu_name: str, kind: str | None, num_gpus: int, visible_gpus: int, measured: dict[str, Any]
) -> HardwareProfile:
    """Measured values over the shipped profile for this GPU (sources say which is which)."""
    today = datetime.date.today().isoformat()
    tag = f"measured: zeroprefill calibrate, {num_gpus} x {gpu_name}, {today}"
    base_gpus = num_gpus if num_gpus in SHIPPED_GPU_COUNTS and num_gpus > 1 else 4
    base = shipped_profile(kind, base_gpus).to_dict() if kind else None
    single = measured["single"]
    data: dict[str, Any] = base or _empty_profile(single)
    data.update(
        name=f"{kind or _slug(gpu_name)}x{num_gpus}-calibrated",
        gpu_name=gpu_name,
        num_gpus=num_gpus,
        # A machine may expose fewer GPUs than its node has: keep the shipped node size.
        gpus_per_node=max(data.get("gpus_per_node", 0), visible_gpus),
    )
    if base:
        data["notes"] = list(data.get("notes", [])) + [
            f"fields not measured by calibrate keep the shipped {kind}x{base_gpus} values"
        ]
    data["gpu_memory_bytes"] = {"value": single["gpu_memory_bytes"], "source": f"{tag} (mem_get_info)"}
    data["hbm_gbps"] = {"value": round(single["hbm_gbps"], 1), "source": f"{tag} (1 GiB device copy)"}
    shapes = f"{EXPERTS_PER_BATCH} experts x [{TOKENS_PER_EXPERT}, {MOE_HIDDEN}] x [{MOE_HIDDEN}, {2 * MOE_FFN}] + [{MOE_FFN}, {MOE_HIDDEN}]"
    data["gemm_tflops"]["bf16"] = {
        "value": round(single["gemm_bf16_tflops"], 1), "source": f"{tag} (torch.bmm, {shapes})"
    }
    if "gemm_fp8_tflops" in single:
        data["gemm_tflops"]["fp8"] = {
            "value": round(single["gemm_fp8_tflops"], 1),
            "source": f"{tag} (torch._scaled_mm per expert, {shapes})",
        }
    elif "fp8" in data["gemm_tflops"]:
        data["gemm_tflops"]["fp8"]["source"] = (
            f"not measured ({single['gemm_fp8_error']}); shipped value: "
            + data["gemm_tflops"]["fp8"]["source"]
        )
    collectives = measured.get("collectives")
    if collectives:
        nccl = data["allgather"].setdefault("nccl", {})
        nccl["bus_gbps_by_message_bytes"] = [
            {"message_bytes": size, "bus_gbps": round(bw, 1), "source": f"{tag} (all_gather_into_tensor)"}
            for size, bw in collectives["allgather"]
        ]
        nccl["gemm_slowdown"] = {
            "value": round(collectives["gemm_slowdown"], 4),
            "source": f"{tag} (bf16 MoE GEMMs vs the same under {SLOWDOWN_MESSAGE_BYTES // MiB} MiB AllGathers on a side stream)",
        }
        data["alltoall_bus_gbps"] = {
            "value": round(collectives["alltoall_bus_gbps"], 1),
            "source": f"{tag} (all_to_all_single, {ALLTOALL_MESSAGE_BYTES // MiB} MiB per rank)",
        }
    copy_engine = (collectives or {}).get("copy_engine")
    if copy_engine:
        data["allgather"]["copy_engine"] = {
            "bus_gbps_by_message_bytes": [
                {"message_bytes": size, "bus_gbps": round(bw, 1),
                 "source": f"{tag} (CopyEngineGather: peer pulls plus the local shard's copy)"}
                for size, bw in copy_engine["allgather"]
            ],
            "gemm_slowdown": {
                "value": round(copy_engine["gemm_slowdown"], 4),
                "source": f"{tag} (bf16 MoE GEMMs vs the same under {SLOWDOWN_MESSAGE_BYTES // MiB} MiB "
                          "copy-engine gathers on a side stream)",
            },
        }
        if copy_engine.get("by_copy_streams"):
            sweep = ", ".join(f"{streams} stream(s) {bw:.0f} GB/s" for streams, bw in copy_engine["by_copy_streams"])
            data["notes"] = [*data.get("notes", []), f"{tag}: copy-engine 1 GiB gather by "
                             f"ZEROPREFILL_ASYNCEP_COPY_STREAMS: {sweep} (the bandwidths above are 1 stream's)"]
    _mark_unmeasured(data, num_gpus, tag)
    return HardwareProfile.from_dict(data, "calibrated profile")


def _mark_unmeasured(data: dict[str, Any], num_gpus: int, tag: str) -> None:
    """Prefix every inherited source with why calibrate did not measure it."""
    why_collective = f"not measured here (calibrate ran on {num_gpus} GPU); shipped value: "

    def mark(entry: dict[str, Any], why: str) -> None:
        if entry and not entry["source"].startswith(("measured: zeroprefill calibrate", "not measured")):
            entry["source"] = why + entry["source"]

    for name, transport in data["allgather"].items():
        why = why_collective if num_gpus == 1 else "not measured by calibrate; shipped value: "
        for point in transport["bus_gbps_by_message_bytes"]:
            mark(point, why)
        mark(transport["gemm_slowdown"], why)
    if data.get("alltoall_bus_gbps"):
        mark(data["alltoall_bus_gbps"], why_collective)


def _empty_profile(single: dict[str, Any]) -> dict[str, Any]:
    """Skeleton for a GPU with no shipped profile: peaks unknown, set to the measured rate."""
    unknown = "unknown GPU: datasheet peak not known, set to the measured GEMM rate (edit it)"
    peak = {"bf16": {"value": round(single["gemm_bf16_tflops"], 1), "source": unknown}}
    if "gemm_fp8_tflops" in single:
        peak["fp8"] = {"value": round(single["gemm_fp8_tflops"], 1), "source": unknown}
    return {
        "peak_tflops": peak,
        "gemm_tflops": {},
        "allgather": {},
        "alltoall_bus_gbps": None,
        "internode_gbps_per_node": {"value": 400.0, "source": "estimated: nominal 8 x 400 Gb/s per node"},
        "notes": [],
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

