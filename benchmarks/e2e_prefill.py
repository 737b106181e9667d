"""End-to-end prefill benchmark: AsyncEP vs the strongest baselines, per-GPU MFU (issue 9).

A prefill-only forward of K Qwen3-MoE decoder layers (RMSNorm, fused qkv, q/k norm, RoPE,
causal flash attention per request, o proj, router, MoE; see ``_model.py``) with the real
shapes of Qwen3-235B-A22B and Qwen3-30B-A3B, random weights, bf16 and FP8 experts (FP8:
e4m3 with 128x128 block scales through ``zeroprefill.kernels.fused_experts``), one process
per GPU over NCCL. Every layout runs the same kernels on the same inputs:

    dp                     all weights resident, no communication: the ceiling, and the
                           reference for exposed communication (a deployable layout only where
                           the model fits one GPU: 30B-A3B)
    asyncep-<tr>-d<d>      DP attention, experts sharded, weight gather of layer l+d while
                           layer l computes (transports nccl / copy_engine, d = 1, 2); a
                           suffix -s<k> pulls with k copy-engine streams at once
    a2a_ep                 DP attention, EP MoE as DeepEP's normal mode / vLLM: each token
                           dispatched once per rank holding one of its experts, weighted
                           combine on the expert side, one row per (token, rank) back
                           (NCCL all_to_all)
    a2a_tbo                a2a_ep as SGLang's two-batch overlap: micro-batches cut at half
                           the tokens (inside a request if need be), each on its own stream
                           and communicator, one's dispatch/combine under the other's compute
    tp                     heads and expert FFN columns split, two all-reduces per layer

Baselines (for "speedup vs the best baseline") are a2a_ep, a2a_tbo and tp; dp is reported
as the ceiling, not as a baseline.

Workload per GPU: ``tokens_per_gpu`` tokens of packed requests whose lengths are drawn from
``{C/2, 3C/4, C, 5C/4, 3C/2}`` (``C`` the context length; the last request cut to fit), so
a point needs ``tokens >= C``. Routing regimes: ``balanced`` (a logit bias makes global token
g pick experts ``(gK + j) mod E``: every expert and every EP rank gets exactly the same load;
with experts in contiguous runs per rank, vLLM's placement, a token's K experts then sit on
one rank, so deduplicated EP sends each token to one rank: EP's best case) and ``skewed``
(per-layer expert popularity: logit bias ``alpha_l * z_l``, ``z_l ~ N(0,1)^E``, ``alpha_l``
bisected for max/mean expert load 1.5; the achieved expert- and EP-rank-level max/mean are
measured on the run's own routing and reported per point).

Timing (``"timing": "back-to-back"`` in the JSON): after ``--warmup`` passes of the K layers,
one synchronisation and one untimed lead-in pass, ``--iters`` passes run back to back with
no synchronisation between them and CUDA events (CPU: wall clock) around the whole loop;
per layer = window / (iters K), the slowest rank's (EP pays its hottest rank). No pass starts
after an untimed gap in which AsyncEP's streamer could prefetch its first layers for free.
All Qwen3-MoE layers have the same shapes and every one is an MoE layer, so per-layer
figures scale to the full model (embedding and LM head excluded, < 1% of the FLOPs):
``tokens/s per GPU = tokens_per_gpu / (ms_per_layer * num_layers)``. MFU = true FLOPs of a
layer per GPU (``zeroprefill.common.cost_model.layer_flops``: projections, causal score
pairs of the actual requests, router, experts) / time / 989 TFLOP/s (dense bf16 peak of
H100 and H200 SXM; used for FP8 rows too). ``exposed = (t - t_dp) / t``. Bytes per layer:
what each layout sends over links per rank (mean over ranks), beside the minimum its
algorithm needs (``_harness.*_minimum_bytes``: EP one hidden row per (token, remote rank
holding one of its experts) each way; AsyncEP (N-1)/N of a layer's expert bytes; TP two
ring all-reduces), from one untimed accounting pass per point. The predicted saturation
threshold comes from ``zeroprefill.common.saturation.saturation_threshold_tokens``
with the shipped hardware profile of the GPU and GPU count, and every point carries the
planner's ``predict_step`` for its layout beside the measurement (``predicted_ms_per_layer``,
``planner_error`` = predicted / measured - 1; ``summary.planner_max_error`` over Qwen3-235B
bf16 from 16K tokens/GPU: issue 18's ±10% check). ``summary.projected_speedup_8gpu`` is the
planner's projection of the same points to 8 GPUs (``project_scaling.py``; a model).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        python benchmarks/e2e_prefill.py --gpus 2 --out benchmarks/results/e2e_prefill-h200x2.json
    python benchmarks/e2e_prefill.py --gpus 1 --quick --out e2e-1gpu.json      # code paths
    python benchmarks/e2e_prefill.py --device cpu --gpus 2 --quick --out e.json  # gloo, tiny
    python benchmarks/e2e_prefill.py --merge a.json b.json --out all.json            # join runs

A full sweep of both models is long; split it with ``--models`` (one run per model) and
join the JSONs with ``--merge``. ``--profile`` adds a torch.profiler kernel summary of one
pass per layout at the largest token count of each context (balanced routing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from _harness import TIMING_METHOD, routing_balance, run_ranks, time_passes
from _layouts import build_stack, parse_layout
from _model import (PackedBatch, StackConfig, balanced_router_bias, dense_weights, expert_weights_bf16, fp8_supported,
                    load_model, mixed_request_lengths, quantize_experts_fp8, skewed_router_bias)
from e2e_summary import LEGACY_TIMING, SKEW_TARGET, bytes_text, plot, print_table, summarize
from zeroprefill.common.cost_model import causal_query_key_pairs, layer_flops
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.model_spec import MoEModelSpec

FULL = {"tokens": (1024, 2048, 4096, 8192, 16384, 32768, 65536), "contexts": (512, 4096, 32768),
        "layers": 4, "warmup": 2, "iters": 6}
QUICK = {"tokens": (4096, 16384, 32768), "contexts": (512, 32768), "layers": 2, "warmup": 1, "iters": 3}
CPU_FULL = {"tokens": (64, 128, 256), "contexts": (16, 64), "layers": 2, "warmup": 1, "iters": 3}
CPU_QUICK = {"tokens": (64, 128), "contexts": (16, 64), "layers": 2, "warmup": 0, "iters": 1}
GPU_LAYOUTS = ("dp", "asyncep-nccl-d1", "asyncep-nccl-d2", "asyncep-copy_engine-d1", "asyncep-copy_engine-d2",
               "a2a_ep", "a2a_tbo", "tp")
CPU_LAYOUTS = ("dp", "asyncep-gloo-d1", "asyncep-gloo-d2", "a2a_ep", "a2a_tbo", "tp")



# -- workloads -----------------------------------------------------------------------------
def points(tokens: list[int], contexts: list[int]) -> list[tuple[int, int]]:
    """(context, tokens per GPU) pairs with at least one whole request per GPU."""
    return [(c, t) for c in contexts for t in tokens if t >= c]


def request_lengths(rank: int, tokens: int, context: int) -> list[int]:
    return mixed_request_lengths(tokens, context, seed=1_000_003 * rank + 7919 * tokens + context)


def flops_per_gpu_per_layer(spec: MoEModelSpec, world_size: int, tokens: int, context: int) -> float:
    """True FLOPs of one layer per GPU: the group's requests over ``world_size`` GPUs."""
    total = 0
    for rank in range(world_size):
        lengths = request_lengths(rank, tokens, context)
        pairs = sum(causal_query_key_pairs(n) for n in lengths)
        total += layer_flops(spec, spec.moe_layer_indices[0], tokens, pairs).total
    return total / world_size


def make_batch(cfg: StackConfig, ranks: list[int], tokens: int, context: int, routing: str,
               skew_bias: torch.Tensor, device: torch.device) -> PackedBatch:
    """The packed batch of ``ranks`` (one rank for DP-attention layouts, all for TP)."""
    hidden, lengths, biases = [], [], []
    for rank in ranks:
        gen = torch.Generator(device=device).manual_seed(17 * rank + tokens + 31 * context)
        hidden.append(torch.randn(tokens, cfg.hidden, device=device, dtype=torch.bfloat16, generator=gen))
        lengths += request_lengths(rank, tokens, context)
        if routing == "balanced":
            biases.append(balanced_router_bias(rank * tokens, tokens, cfg, device))
    if routing == "balanced":
        batch = PackedBatch(torch.cat(hidden), tuple(lengths), torch.cat(biases), bias_per_layer=False)
    else:
        batch = PackedBatch(torch.cat(hidden), tuple(lengths), skew_bias.to(device), bias_per_layer=True)
    batch.set_rope(cfg.head_dim, cfg.rope_theta)
    return batch


def activation_bytes_estimate(cfg: StackConfig, tokens_in_layer: int, family: str, world_size: int) -> int:
    """Rough upper bound of one layer's transient activations (to skip points that cannot fit)."""
    split = world_size if family == "tp" else 1
    per_token = 2 * (10 * cfg.hidden + 4 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // split
                     + cfg.top_k * (5 * cfg.hidden + 3 * cfg.intermediate // split))
    return int(1.5 * tokens_in_layer * per_token)


# -- one rank --------------------------------------------------------------------------------
def traffic_per_layer(stack, batch: PackedBatch, world_size: int, device: torch.device) -> dict[str, float]:
    """One untimed accounting pass: bytes sent per layer per rank (mean over layers and
    ranks), moved and the algorithm's minimum."""
    stack.traffic = []
    stack.forward(batch)
    layers = len(stack.traffic)
    mean = torch.tensor([sum(t.moved for t in stack.traffic) / layers, sum(t.minimum for t in stack.traffic) / layers],
                        device=device, dtype=torch.float64)
    stack.traffic = None
    dist.all_reduce(mean)
    moved, minimum = (mean / world_size).tolist()
    return {"moved": moved, "minimum": minimum}


def _profile_pass(run_pass, device: torch.device, top: int = 12) -> list[dict]:
    """Kernel time summary of one pass (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_pass()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()

    def self_us(e) -> float:
        if device.type == "cuda":
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    rows = sorted(events, key=self_us, reverse=True)[:top]
    return [{"name": e.key[:90], "ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count} for e in rows]


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    records, skipped = [], []
    for model in args.models:
        spec, hf_config = load_model(model)
        cfg = StackConfig.from_config(spec, hf_config)
        dense = dense_weights(cfg, args.layers, seed=1, device=device)
        experts_bf16 = [expert_weights_bf16(cfg, layer, seed=2, device=device) for layer in range(args.layers)]
        skew_bias, alphas = skewed_router_bias(cfg, args.layers, SKEW_TARGET, seed=3)
        log(f"== {model}: {args.layers} layers, skew alpha per layer {[round(a, 3) for a in alphas]}")
        for dtype in args.dtypes:
            if dtype == "fp8":
                ok, reason = fp8_supported(device)
                if not ok:
                    skipped.append({"model": model, "dtype": dtype, "layout": "*", "reason": reason})
                    log(f"   {model} fp8 not run: {reason}")
                    continue
            experts_fp8 = [quantize_experts_fp8(e) for e in experts_bf16] if dtype == "fp8" else None
            for name in args.layouts:
                parsed = parse_layout(name)
                family, transport, depth = parsed.family, parsed.transport, parsed.prefetch_depth
                if family == "tp" and (cfg.num_heads % world_size or cfg.intermediate % world_size):
                    skipped.append({"model": model, "dtype": dtype, "layout": name,
                                    "reason": f"heads {cfg.num_heads} or FFN {cfg.intermediate} not divisible by {world_size}"})
                    continue
                stack = build_stack(name, cfg, dense, experts_bf16, experts_fp8, rank, world_size, device)
                for context, tokens in points(args.tokens, args.contexts):
                    group_tokens = tokens * world_size if family == "tp" else tokens
                    if device.type == "cuda":
                        free = torch.tensor([torch.cuda.mem_get_info(device)[0]], device=device, dtype=torch.float64)
                        dist.all_reduce(free, op=dist.ReduceOp.MIN)
                        need = activation_bytes_estimate(cfg, group_tokens, family, world_size)
                        if need > free.item():
                            skipped.append({"model": model, "dtype": dtype, "layout": name, "context": context,
                                            "tokens_per_gpu": tokens,
                                            "reason": f"estimated activations {need / 2**30:.1f} GiB > free "
                                                      f"{free.item() / 2**30:.1f} GiB"})
                            continue
                    for routing in args.routing:
                        ranks = list(range(world_size)) if family == "tp" else [rank]
                        batch = make_batch(cfg, ranks, tokens, context, routing, skew_bias, device)

                        def run_pass() -> None:
                            stack.forward(batch)

                        ms = time_passes(run_pass, args.warmup, args.iters, device) / args.layers
                        slowest = torch.tensor([ms], device=device, dtype=torch.float64)
                        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                        record = {"model": model, "dtype": dtype, "layout": name, "family": family,
                                  "transport": transport, "prefetch_depth": depth,
                                  "copy_streams": parsed.copy_streams, "context": context,
                                  "tokens_per_gpu": tokens, "routing": routing, "ms_per_layer": slowest.item(),
                                  "requests_per_gpu": len(request_lengths(rank, tokens, context)),
                                  "flops_per_gpu_per_layer": flops_per_gpu_per_layer(spec, world_size, tokens, context)}
                        if family == "dp":
                            stack.recorded_ids = []
                            stack.forward(batch)
                            record["routing_balance"] = routing_balance(stack.recorded_ids,
                                                                        ExpertShardLayout(cfg.num_experts, world_size))
                            stack.recorded_ids = None
                        record["bytes_per_layer"] = traffic_per_layer(stack, batch, world_size, device)
                        if family == "a2a_tbo":
                            first, second = batch.split_in_half()
                            record["microbatch_tokens"] = [first.hidden.shape[0], second.hidden.shape[0]]
                            record["microbatch_split_request_tokens"] = second.continued_tokens
                        if args.profile and routing == "balanced" and tokens == max(args.tokens):
                            record["profile"] = _profile_pass(run_pass, device)
                        records.append(record)
                        log(f"   {model:16s} {dtype:4s} {name:24s} C={context:6d} T={tokens:6d} {routing:8s} "
                            f"{record['ms_per_layer']:9.3f} ms/layer  "
                            f"{bytes_text(record['bytes_per_layer']['moved'])} moved/layer "
                            f"(minimum {bytes_text(record['bytes_per_layer']['minimum'])})")
                        del batch
                stack.close()
                del stack
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del experts_fp8
        del dense, experts_bf16
    if rank == 0:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        meta = {"gpu": gpu, "world_size": world_size, "device": args.device, "torch": torch.__version__,
                "layers": args.layers, "warmup": args.warmup, "iters": args.iters, "timing": TIMING_METHOD}
        Path(result_file).write_text(json.dumps({"meta": meta, "records": records, "skipped": skipped}))
    dist.barrier()
    dist.destroy_process_group()


# -- entry point -------------------------------------------------------------------------------
def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="ranks (GPUs, or gloo processes with --device cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", type=_csv(str), default=None,
                        help="comma-separated: qwen3-235b-a22b, qwen3-30b-a3b, tiny (default: both Qwen3; cpu: tiny)")
    parser.add_argument("--dtypes", type=_csv(str), default=["bf16", "fp8"])
    parser.add_argument("--layouts", type=_csv(str), default=None,
                        help="dp, a2a_ep, a2a_tbo, tp, asyncep-<transport>-d<prefetch depth>[-s<copy streams>] "
                             "(e.g. asyncep-copy_engine-d1-s2); default: every layout the device runs")
    parser.add_argument("--routing", type=_csv(str), default=["balanced", "skewed"])
    parser.add_argument("--tokens", type=_csv(int), default=None, help="tokens per GPU, comma-separated")
    parser.add_argument("--contexts", type=_csv(int), default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a short sweep (code paths, smoke runs)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler kernel summary at the largest tokens")
    parser.add_argument("--merge", type=Path, nargs="+", help="join these result JSONs (same GPUs) instead of running")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    command = "python benchmarks/e2e_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        shapes = {(p["meta"]["gpu"], p["meta"]["world_size"], p["meta"]["layers"],
                   p["meta"].get("timing", LEGACY_TIMING)) for p in parts}
        if len(shapes) != 1:
            parser.error(f"--merge needs runs on the same GPUs with the same layers and timing, got {sorted(shapes)}")
        raw = {"meta": parts[0]["meta"], "records": [r for p in parts for r in p["records"]],
               "skipped": [s for p in parts for s in p["skipped"]]}
        finish(summarize(raw, " && ".join(p["command"] for p in parts)), args.out)
        return

    defaults = (CPU_QUICK if args.quick else CPU_FULL) if args.device == "cpu" else (QUICK if args.quick else FULL)
    args.tokens = args.tokens or list(defaults["tokens"])
    args.contexts = args.contexts or list(defaults["contexts"])
    for name in ("layers", "warmup", "iters"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.models = args.models or (["tiny"] if args.device == "cpu" else ["qwen3-235b-a22b", "qwen3-30b-a3b"])
    args.layouts = args.layouts or list(CPU_LAYOUTS if args.device == "cpu" else GPU_LAYOUTS)
    if args.gpus is None:
        args.gpus = 2 if args.device == "cpu" else torch.cuda.device_count()
    for model in args.models:
        load_model(model)
    for name in args.layouts:
        try:
            parse_layout(name)
        except ValueError as exc:
            parser.error(str(exc))
    if "dp" not in args.layouts:
        parser.error("--layouts must include dp: it is the reference for exposed communication")
    args.layouts = ["dp"] + [n for n in args.layouts if n != "dp"]  # dp first: routing stats
    bad = [d for d in args.dtypes if d not in ("bf16", "fp8")] + [r for r in args.routing if r not in ("balanced", "skewed")]
    if bad:
        parser.error(f"unknown dtype/routing {bad}; dtypes: bf16, fp8; routing: balanced, skewed")
    if args.device == "cuda" and (not torch.cuda.is_available() or not 1 <= args.gpus <= torch.cuda.device_count()):
        parser.error(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                     "(use --device cpu for a gloo run)")
    if args.gpus < 1:
        parser.error(f"--gpus must be >= 1, got {args.gpus}")
    if not points(args.tokens, args.contexts):
        parser.error(f"no point has tokens >= context: tokens {args.tokens}, contexts {args.contexts}")

    raw = run_ranks(_rank_main, args.gpus, args)
    finish(summarize(raw, command), args.out)


def finish(result: dict, out: Path | None) -> None:
    print_table(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        png = out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
