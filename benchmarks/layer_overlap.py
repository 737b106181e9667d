"""How much of AsyncEP's weight streaming is hidden behind MoE compute, per tokens per GPU.

A stack of MoE layers with real model shapes (default Qwen3-235B-A22B: E=128, top-8,
H=4096, I=1536), random bf16 weights, random router logits, run on every GPU of the host
(one process per GPU, NCCL). Per tokens-per-GPU point it times a whole pass of the stack:

- ``compute_only``: every expert resident on every GPU, no communication (the ceiling);
- ``asyncep/<transport>``: each GPU stores 1/N of the experts; the streamer gathers layer
  l+1 while layer l computes (transports: ``nccl``, ``copy_engine``);
- ``alltoall_ep``: each GPU stores 1/N of the experts; expert parallelism as DeepEP's normal
  mode (``_layouts.DeduplicatedEP``): each token dispatched once to every GPU holding one of
  its experts, weighted combine on the expert side, one row per (token, GPU) back, over NCCL
  ``all_to_all_single`` (counts exchanged first);

all with the same experts kernel. Each layout's time is the mean of ``--iters`` passes run
back to back after a synchronised lead-in pass (``_harness.time_passes``; ``"timing":
"back-to-back"`` in the summary), the slowest GPU's.
``exposed = (asyncep - compute_only) / asyncep``. The knee is the smallest measured token
count from which exposed communication stays under 5%.
FLOPs per layer = ``2 * T * top_k * 3 * H * I`` (the routed experts; routing not counted).

    python benchmarks/layer_overlap.py --gpus 2 --out benchmarks/results/layer_overlap-h200x2.json

Set ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` on machines without NVLink
multicast. With ``--gpus 1`` the AsyncEP gather degenerates to a local copy: useful for the
compute-only ceiling and the code path, not for overlap numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from _harness import TIMING_METHOD, run_ranks, time_passes
from _layouts import DeduplicatedEP
from zeroprefill.common.asyncep_moe import AsyncEPMoE, default_experts_kernel, select_experts
from zeroprefill.common.cost_model import moe_layer_flops
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.transport import make_transport

CONFIGS = Path(__file__).resolve().parent.parent / "common" / "model_configs"
EXPOSED_TARGET = 0.05


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    spec = MoEModelSpec.from_pretrained(CONFIGS / f"{args.model}.json")
    h, i, e, k = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, spec.top_k
    layout = ExpertShardLayout(e, world_size)
    kernel = default_experts_kernel(device, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)  # same weights on every rank

    full = [
        {"w13": torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16, generator=gen) * h**-0.5,
         "w2": torch.randn(e, h, i, device=device, dtype=torch.bfloat16, generator=gen) * i**-0.5}
        for _ in range(args.layers)
    ]
    shards = [layout.shard_all(w, rank) for w in full]
    points = {t: {"tokens_per_gpu": t} for t in args.tokens}
    inputs = {}
    for t in args.tokens:
        g = torch.Generator(device=device).manual_seed(1 + rank)
        inputs[t] = (
            torch.randn(t, h, device=device, dtype=torch.bfloat16, generator=g),
            [torch.randn(t, e, device=device, dtype=torch.bfloat16, generator=g) for _ in range(args.layers)],
        )

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    # 1. compute only: all experts resident.
    for t in args.tokens:
        x, logits = inputs[t]

        def compute_pass() -> None:
            for layer in range(args.layers):
                weights, ids = select_experts(logits[layer], k, renormalize=True)
                kernel(x, full[layer]["w13"], full[layer]["w2"], weights, ids)

        points[t]["compute_only_ms"] = time_passes(compute_pass, args.warmup, args.iters, device) / args.layers
        log(f"compute_only  T={t:6d}  {points[t]['compute_only_ms']:.3f} ms/layer")
    del full
    torch.cuda.empty_cache()

    # 2. AsyncEP, per transport.
    for transport_name in args.transports:
        transport = make_transport(transport_name, None, device)
        streamer = ExpertWeightStreamer(shards, layout, transport, prefetch_depth=args.prefetch_depth)
        layers = [AsyncEPMoE(streamer, j, k, True, experts_kernel=kernel) for j in range(args.layers)]
        for t in args.tokens:
            x, logits = inputs[t]

            def asyncep_pass() -> None:
                for j, layer in enumerate(layers):
                    layer(x, logits[j])

            points[t][f"asyncep_{transport_name}_ms"] = time_passes(asyncep_pass, args.warmup, args.iters, device) / args.layers
            log(f"asyncep/{transport_name:11s} T={t:6d}  {points[t][f'asyncep_{transport_name}_ms']:.3f} ms/layer")
        streamer.close()
        del streamer, layers, transport
        torch.cuda.empty_cache()

    # 3. AllToAll expert parallelism on the same shards.
    if world_size > 1:
        ep = DeduplicatedEP(layout, shards, k, kernel)
        for t in args.tokens:
            x, logits = inputs[t]

            def ep_pass() -> None:
                for layer in range(args.layers):
                    ep.forward(layer, x, logits[layer])

            # EP's time is that of the slowest rank: take the max over ranks.
            ms = torch.tensor([time_passes(ep_pass, args.warmup, args.iters, device) / args.layers], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            points[t]["alltoall_ep_ms"] = ms.item()
            log(f"alltoall_ep   T={t:6d}  {points[t]['alltoall_ep_ms']:.3f} ms/layer")

    # Per point: the slowest rank defines every layout's time.
    for t in args.tokens:
        for key in [k_ for k_ in points[t] if k_.endswith("_ms")]:
            ms = torch.tensor([points[t][key]], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            points[t][key] = ms.item()
    if rank == 0:
        meta = {"gpu": torch.cuda.get_device_name(device), "world_size": world_size, "torch": torch.__version__}
        Path(result_file).write_text(json.dumps({"meta": meta, "points": [points[t] for t in args.tokens]}))
    dist.barrier()
    dist.destroy_process_group()


def summarize(raw: dict, args: argparse.Namespace) -> dict:
    spec = MoEModelSpec.from_pretrained(CONFIGS / f"{args.model}.json")
    rows = []
    for p in raw["points"]:
        t = p["tokens_per_gpu"]
        flops = moe_layer_flops(spec, t)
        row = dict(p)
        row["flops_per_layer"] = flops
        for key in [k for k in p if k.endswith("_ms")]:
            row[key.replace("_ms", "_tflops")] = flops / (p[key] * 1e-3) / 1e12
        for transport in args.transports:
            asyncep = p[f"asyncep_{transport}_ms"]
            row[f"exposed_{transport}"] = max(asyncep - p["compute_only_ms"], 0.0) / asyncep
        best = min(args.transports, key=lambda tr: p[f"asyncep_{tr}_ms"])
        row["best_transport"] = best
        row["exposed_best"] = row[f"exposed_{best}"]
        if "alltoall_ep_ms" in p:
            row["speedup_vs_alltoall_ep"] = p["alltoall_ep_ms"] / p[f"asyncep_{best}_ms"]
        rows.append(row)
    knee = None
    for idx, row in enumerate(rows):
        if all(r["exposed_best"] < EXPOSED_TARGET for r in rows[idx:]):
            knee = row["tokens_per_gpu"]
            break
    above = [r["exposed_best"] for r in rows if knee is not None and r["tokens_per_gpu"] >= knee]
    summary = {
        "model": args.model,
        "gpus": raw["meta"]["world_size"],
        "gpu": raw["meta"]["gpu"],
        "layers": args.layers,
        "prefetch_depth": args.prefetch_depth,
        "timing": TIMING_METHOD,
        "kernel": "zeroprefill.kernels.fused_experts (shipped backend table)",
        "knee_tokens_per_gpu": knee,
        "max_exposed_comm_above_knee": max(above) if above else None,
        "exposed_target": EXPOSED_TARGET,
        "note": None if raw["meta"]["world_size"] > 1 else
        "1 GPU: the gather is a local copy; overlap figures need >= 2 GPUs",
    }
    return {"summary": summary, "meta": raw["meta"], "points": rows,
            "command": "python benchmarks/layer_overlap.py " + " ".join(sys.argv[1:])}


def print_table(result: dict, transports: list[str]) -> None:
    cols = ["tokens/GPU", "compute ms", *[f"{t} ms" for t in transports], "a2a-EP ms",
            "exposed", "TFLOP/s local", "TFLOP/s asyncep", "vs EP"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in result["points"]:
        best = r["best_transport"]
        cells = [r["tokens_per_gpu"], f"{r['compute_only_ms']:.3f}",
                 *[f"{r[f'asyncep_{t}_ms']:.3f}" for t in transports],
                 f"{r['alltoall_ep_ms']:.3f}" if "alltoall_ep_ms" in r else "-",
                 f"{100 * r['exposed_best']:.1f}% ({best})", f"{r['compute_only_tflops']:.0f}",
                 f"{r[f'asyncep_{best}_tflops']:.0f}",
                 f"{r['speedup_vs_alltoall_ep']:.2f}x" if "speedup_vs_alltoall_ep" in r else "-"]
        print(" | ".join(f"{str(c):>14}" for c in cells))
    s = result["summary"]
    print(f"knee (exposed < {100 * EXPOSED_TARGET:.0f}% from here on): {s['knee_tokens_per_gpu']} tokens/GPU; "
          f"max exposed above it: {s['max_exposed_comm_above_knee']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--model", default="qwen3-235b-a22b", choices=sorted(p.stem for p in CONFIGS.glob("*.json")))
    parser.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--transports", default="nccl,copy_engine")
    parser.add_argument("--prefetch-depth", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or args.gpus < 1:
        parser.error("needs CUDA GPUs (run it through the device tool)")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.transports = args.transports.split(",")
    raw = run_ranks(_rank_main, args.gpus, args)
    result = summarize(raw, args)
    print_table(result, args.transports)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
