"""End-to-end prefill benchmark: AsyncEP vs the strongest baselines, per-GPU MFU (issue 9).

A prefill-only forward of K Qwen3-MoE decoder layers (RMSNorm, fused qkv, q/k norm, RoPE,
causal flash attention per request, o proj, router, MoE; see ``_layouts.py``) with the real
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
algorithm needs (``_layouts.*_minimum_bytes``: EP one hidden row per (token, remote rank
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
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from _layouts import (TIMING_METHOD, PackedBatch, StackConfig, balanced_router_bias, build_stack, dense_weights,
                      expert_weights_bf16, fp8_supported, mixed_request_lengths, parse_layout, quantize_experts_fp8,
                      routing_balance, run_ranks, skewed_router_bias, time_passes)
from zeroprefill.common.cost_model import causal_query_key_pairs, layer_flops
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.model_spec import MoEModelSpec

CONFIGS = Path(__file__).resolve().parent.parent / "common" / "model_configs"
PEAK_TFLOPS = 989.0
BASELINES = ("a2a_ep", "a2a_tbo", "tp")
SKEW_TARGET = 1.5
#: The model the summary's headline keys are about (bf16).
HEADLINE_MODEL = "qwen3-235b-a22b"
SHORT_CONTEXT = 512
LONG_CONTEXT = 32768
#: Tokens per GPU from which issue 18's targets apply (exposed communication, fair speedup).
LARGE_BATCH_TOKENS = 16384
#: What result files written before back-to-back timing measured (no ``timing`` in meta).
LEGACY_TIMING = "per pass, barrier and synchronisation before each (prefetch across the gap untimed)"
#: A CPU-sized Qwen3-MoE (gloo runs and tests): FP8 blocks of 128 divide I / 2 ranks.
TINY_CONFIG = {
    "model_type": "qwen3_moe", "hidden_size": 128, "moe_intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "vocab_size": 512, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
}
FULL = {"tokens": (1024, 2048, 4096, 8192, 16384, 32768, 65536), "contexts": (512, 4096, 32768),
        "layers": 4, "warmup": 2, "iters": 6}
QUICK = {"tokens": (4096, 16384, 32768), "contexts": (512, 32768), "layers": 2, "warmup": 1, "iters": 3}
CPU_FULL = {"tokens": (64, 128, 256), "contexts": (16, 64), "layers": 2, "warmup": 1, "iters": 3}
CPU_QUICK = {"tokens": (64, 128), "contexts": (16, 64), "layers": 2, "warmup": 0, "iters": 1}
GPU_LAYOUTS = ("dp", "asyncep-nccl-d1", "asyncep-nccl-d2", "asyncep-copy_engine-d1", "asyncep-copy_engine-d2",
               "a2a_ep", "a2a_tbo", "tp")
CPU_LAYOUTS = ("dp", "asyncep-gloo-d1", "asyncep-gloo-d2", "a2a_ep", "a2a_tbo", "tp")


# -- models and workloads --------------------------------------------------------------------
def load_model(name: str) -> tuple[MoEModelSpec, dict]:
    if name == "tiny":
        config = dict(TINY_CONFIG)
    else:
        path = CONFIGS / f"{name}.json"
        if not path.is_file():
            known = ", ".join(["tiny", *sorted(p.stem for p in CONFIGS.glob("*.json"))])
            raise SystemExit(f"error: unknown model {name!r}; choose from {known}")
        config = json.loads(path.read_text())
    return MoEModelSpec.from_hf_config(config), config


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


def bytes_text(count: float) -> str:
    """``count`` bytes with a decimal unit and three significant digits (``"1.5 GB"``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


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


# -- summary -----------------------------------------------------------------------------------
def _gpu_kind(gpu_name: str) -> str | None:
    for kind in ("h200", "h100"):
        if kind in gpu_name.lower():
            return kind
    return None


def _shipped_profile(meta: dict):
    """The shipped hardware profile of the GPU kind and count the sweep ran on, or None."""
    from zeroprefill.common.hardware import HardwareProfileError, shipped_profile

    kind = _gpu_kind(meta["gpu"])
    try:
        return shipped_profile(kind, meta["world_size"]) if kind else None
    except HardwareProfileError:
        return None


def thresholds(raw: dict) -> dict[str, dict]:
    """Predicted saturation threshold (tokens/GPU) per model, dtype, context and transport."""
    from zeroprefill.common.saturation import Deployment, saturation_threshold_tokens

    meta = raw["meta"]
    out: dict[str, dict] = {}
    profile = _shipped_profile(meta)
    transports = sorted({r["transport"] for r in raw["records"] if r["family"] == "asyncep"} & {"nccl", "copy_engine"})
    for r in raw["records"]:
        key = f"{r['model']}/{r['dtype']}/{r['context']}"
        if key in out:
            continue
        if profile is None or not transports:
            out[key] = {"tokens_per_gpu": None, "reason": f"no shipped hardware profile for {meta['gpu']!r} "
                                                          f"x{meta['world_size']} or no NCCL/copy-engine AsyncEP run"}
            continue
        spec, _ = load_model(r["model"])
        per_transport = {tr: saturation_threshold_tokens(Deployment(spec, profile, meta["world_size"], r["dtype"], tr), r["context"])
                         for tr in transports}
        out[key] = {"tokens_per_gpu": max(per_transport.values()), "per_transport": per_transport,
                    "source": f"zeroprefill.common.saturation.saturation_threshold_tokens, shipped profile "
                              f"{profile.name}; the larger over transports"}
    return out


#: The planner layout each harness family is predicted as (``dp``: AsyncEP on one GPU, no gather).
PLANNER_LAYOUT = {"dp": "asyncep", "asyncep": "asyncep", "a2a_ep": "alltoall_ep", "a2a_tbo": "alltoall_ep_tbo",
                  "tp": "tp"}


def predictions(raw: dict) -> dict[str, float] | str:
    """The planner's ms per layer for every record (keyed by :func:`_record_key`), or why not.

    ``predict_step`` on the shipped profile of the GPU and GPU count the sweep ran on, for the
    same model, format, context and tokens per GPU, divided by the model's layer count (the
    harness's layers have the model's shapes). AsyncEP with the record's transport. EP layouts:
    under balanced routing a token's experts sit on one rank, so a token goes to
    ``(N - 1) / N`` other ranks on average; under skewed routing to as many as uniform routing
    sends it, at the EP-rank imbalance the sweep achieved (its ``dp`` record's routing
    balance), else the skew model's expectation.
    """
    from zeroprefill.common.layouts import predict_step
    from zeroprefill.common.saturation import Deployment
    from zeroprefill.common.routing_skew import expected_rank_imbalance

    meta = raw["meta"]
    profile = _shipped_profile(meta)
    if profile is None:
        return f"no shipped hardware profile for {meta['gpu']!r} x{meta['world_size']}"
    achieved = {(r["model"], r["dtype"], r["context"], r["tokens_per_gpu"]): r["routing_balance"]["ep_rank_max_over_mean"]
                for r in raw["records"] if r["family"] == "dp" and r["routing"] == "skewed" and "routing_balance" in r}
    out = {}
    for r in raw["records"]:
        if r["family"] == "asyncep" and r["transport"] not in ("nccl", "copy_engine"):
            continue
        spec, _ = load_model(r["model"])
        gpus = 1 if r["family"] == "dp" else meta["world_size"]
        transport = r["transport"] if r["family"] == "asyncep" else "nccl"
        deployment = Deployment(spec, profile, gpus, r["dtype"], transport, prefetch_depth=r["prefetch_depth"] or 1)
        imbalance, remote = 1.0, None
        if r["routing"] == "balanced":
            remote = (gpus - 1) / gpus
        elif r["family"] in ("a2a_ep", "a2a_tbo"):
            imbalance = achieved.get((r["model"], r["dtype"], r["context"], r["tokens_per_gpu"])) or \
                expected_rank_imbalance(spec.num_experts, spec.top_k, gpus, SKEW_TARGET)
        step = predict_step(deployment, PLANNER_LAYOUT[r["family"]], r["tokens_per_gpu"], r["context"],
                            rank_imbalance=max(imbalance, 1.0), remote_ranks=remote)
        out[_record_key(r)] = step.step_time_s * 1e3 / spec.num_layers
    return out


def _record_key(r: dict) -> str:
    return f"{r['model']}/{r['dtype']}/{r['layout']}/{r['routing']}/{r['context']}/{r['tokens_per_gpu']}"


def summarize(raw: dict, command: str) -> dict:
    meta = raw["meta"]
    world_size = meta["world_size"]
    threshold = thresholds(raw)
    predicted = predictions(raw)
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in raw["records"]:
        by_point.setdefault((r["model"], r["dtype"], r["context"], r["tokens_per_gpu"], r["routing"]), {})[r["layout"]] = r
    rows = []
    for (model, dtype, context, tokens, routing), layouts in sorted(by_point.items()):
        spec, _ = load_model(model)
        dp = next((r for r in layouts.values() if r["family"] == "dp"), None)
        baselines = [r for r in layouts.values() if r["family"] in BASELINES]
        best_baseline = min(baselines, key=lambda r: r["ms_per_layer"]) if world_size > 1 and baselines else None
        limit = threshold.get(f"{model}/{dtype}/{context}", {}).get("tokens_per_gpu")
        for name, r in layouts.items():
            row = dict(r)
            seconds = r["ms_per_layer"] * 1e-3
            row["tokens_per_s_per_gpu"] = tokens / (seconds * spec.num_layers)
            row["tflops_per_gpu"] = r["flops_per_gpu_per_layer"] / seconds / 1e12
            row["mfu"] = row["tflops_per_gpu"] / PEAK_TFLOPS
            row["exposed_comm"] = None if dp is None or r["family"] == "dp" else \
                max(r["ms_per_layer"] - dp["ms_per_layer"], 0.0) / r["ms_per_layer"]
            row["best_baseline"] = best_baseline["layout"] if best_baseline else None
            row["speedup_vs_best_baseline"] = best_baseline["ms_per_layer"] / r["ms_per_layer"] if best_baseline else None
            row["threshold_tokens_per_gpu"] = limit
            row["above_threshold"] = None if limit is None else tokens >= limit
            if dp is not None and "routing_balance" in dp:
                row["routing_balance"] = dp["routing_balance"]
            row["predicted_ms_per_layer"] = predicted.get(_record_key(r)) if isinstance(predicted, dict) else None
            row["planner_error"] = None if row["predicted_ms_per_layer"] is None else \
                row["predicted_ms_per_layer"] / r["ms_per_layer"] - 1.0
            rows.append(row)
    summary = headline(rows, meta, raw.get("skipped", []))
    summary.update(planner_errors(rows, predicted))
    summary.update(projection_8gpu(rows, meta))
    return {"summary": summary, "meta": meta, "thresholds": threshold,
            "points": rows, "skipped": raw.get("skipped", []), "records": raw["records"], "command": command}


def projection_8gpu(rows: list[dict], meta: dict) -> dict:
    """``projected_speedup_8gpu``: AsyncEP over the best fitting baseline on 8 GPUs of the
    sweep's kind, predicted (``project_scaling.py``: planner + skew model, balanced and skewed
    routing) at the Qwen3-235B bf16 contexts and token counts from 16K tokens/GPU the sweep ran:
    ``{"min": ..., "max": ...}``, a model, not a measurement."""
    from project_scaling import project

    model = HEADLINE_MODEL
    kind = _gpu_kind(meta["gpu"])
    chosen = [r for r in rows if r["model"] == model and r["dtype"] == "bf16" and r["tokens_per_gpu"] >= LARGE_BATCH_TOKENS]
    if kind is None or not chosen:
        return {"projected_speedup_8gpu": None,
                "projected_speedup_8gpu_reason": f"no shipped profile for {meta['gpu']!r}" if kind is None else
                f"no {model} bf16 point from {LARGE_BATCH_TOKENS} tokens/GPU was run"}
    points = project(model, kind, [8], ["bf16"], sorted({r["context"] for r in chosen}),
                     sorted({r["tokens_per_gpu"] for r in chosen}), [1.0, SKEW_TARGET])
    speedups = [p["speedup"] for p in points if p["speedup"] is not None]
    if not speedups:
        return {"projected_speedup_8gpu": None,
                "projected_speedup_8gpu_reason": "AsyncEP or every baseline does not fit 8 GPUs at these batches"}
    return {"projected_speedup_8gpu": {"min": min(speedups), "max": max(speedups)},
            "projected_speedup_8gpu_source": "model: benchmarks/project_scaling.py at this sweep's points"}


def planner_errors(rows: list[dict], predicted: dict[str, float] | str) -> dict:
    """``planner_max_error``: the largest ``|predicted / measured - 1|`` of the planner's step
    time over the Qwen3-235B bf16 points from 16K tokens/GPU, every layout (issue 18's ±10%
    target), with the signed range per layout (the planner is a GEMM-rate bound: negative
    means it predicts faster than measured)."""
    model = HEADLINE_MODEL
    chosen = [r for r in rows if r["model"] == model and r["dtype"] == "bf16"
              and r["tokens_per_gpu"] >= LARGE_BATCH_TOKENS and r["planner_error"] is not None]
    if not chosen:
        reason = predicted if isinstance(predicted, str) else \
            f"no {model} bf16 point from {LARGE_BATCH_TOKENS} tokens/GPU with a prediction was run"
        return {"planner_max_error": None, "planner_error_by_layout": None,
                "planner_error_reason": reason}
    by_layout: dict[str, list[float]] = {}
    for r in chosen:
        by_layout.setdefault(r["layout"], []).append(r["planner_error"])
    return {"planner_max_error": max(abs(r["planner_error"]) for r in chosen),
            "planner_error_by_layout": {k: [min(v), max(v)] for k, v in sorted(by_layout.items())},
            "planner_profile": "shipped (zeroprefill.common.hardware.shipped_profile)"}


def _best_asyncep(rows: list[dict], keep: Callable[[dict], bool]) -> list[dict]:
    """Per (routing, context, tokens) point among the rows ``keep`` accepts: the fastest AsyncEP row."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["family"] != "asyncep" or not keep(r):
            continue
        key = (r["routing"], r["context"], r["tokens_per_gpu"])
        if key not in best or r["ms_per_layer"] < best[key]["ms_per_layer"]:
            best[key] = r
    return [best[k] for k in sorted(best)]


def headline(rows: list[dict], meta: dict, skipped: list[dict]) -> dict:
    """The summary keys of issues 9 and 18 on Qwen3-235B-A22B bf16; null + reason if not run.

    Each value is the worst case over the qualifying points (min of MFU and speedups, max of
    exposed communication), so a target holds at every point iff the value meets it. The
    ``*_above_threshold`` and ``speedup_*_ctx*`` keys take the points at or above the predicted
    saturation threshold; the ``*_16k_plus`` keys (issue 18) those from 16K tokens/GPU, with
    the deduplicated-EP, two-batch-overlap and TP baselines.
    """
    model = HEADLINE_MODEL
    summary: dict = {"peak_tflops_used": PEAK_TFLOPS, "gpus": meta["world_size"], "gpu": meta["gpu"],
                     "layers_per_pass": meta["layers"], "timing": meta.get("timing", LEGACY_TIMING),
                     "skew_target_expert_max_over_mean": SKEW_TARGET, "reasons": {}}

    def above_threshold(context: int | None) -> tuple[str, Callable[[dict], bool]]:
        where = "at or above the saturation threshold" + (f" at context {context}" if context else "")
        return where, lambda r: r["above_threshold"] and (context is None or r["context"] == context)

    large_batch = (f"from {LARGE_BATCH_TOKENS} tokens/GPU", lambda r: r["tokens_per_gpu"] >= LARGE_BATCH_TOKENS)
    selections = {  # key: (routings, field, worst case, (which points, their test))
        "mfu_235b_bf16_above_threshold": (("balanced",), "mfu", min, above_threshold(None)),
        "exposed_comm_above_threshold": (("balanced",), "exposed_comm", max, above_threshold(None)),
        "speedup_short_ctx_balanced": (("balanced",), "speedup_vs_best_baseline", min, above_threshold(SHORT_CONTEXT)),
        "speedup_short_ctx_skewed": (("skewed",), "speedup_vs_best_baseline", min, above_threshold(SHORT_CONTEXT)),
        "speedup_32k_ctx": (("balanced",), "speedup_vs_best_baseline", min, above_threshold(LONG_CONTEXT)),
        "exposed_comm_16k_plus": (("balanced",), "exposed_comm", max, large_batch),
        "speedup_vs_fair_best_16k_plus": (("balanced", "skewed"), "speedup_vs_best_baseline", min, large_batch),
    }
    for key, (routings, field, reduce, (where, qualifies)) in selections.items():
        summary[key] = None
        if meta["world_size"] < 2:
            summary["reasons"][key] = ("ran on 1 GPU: nothing crosses a link (the gather is a local copy, "
                                       "no baseline communicates); needs >= 2 GPUs (nvidia-h200-x2)")
            continue
        chosen = _best_asyncep(rows, lambda r: r["model"] == model and r["dtype"] == "bf16"
                               and r["routing"] in routings and qualifies(r))
        values = [r[field] for r in chosen if r[field] is not None]
        if not values:
            summary["reasons"][key] = f"no {model} bf16 {'/'.join(routings)} AsyncEP point {where} was run"
            continue
        summary[key] = reduce(values)
        summary[f"{key}_points"] = [{"routing": r["routing"], "context": r["context"],
                                     "tokens_per_gpu": r["tokens_per_gpu"], "layout": r["layout"], field: r[field]}
                                    for r in chosen]
    summary["baseline_bytes_per_layer"] = _bytes_at_large_batch(rows, model)
    if summary["baseline_bytes_per_layer"] is None:
        summary["reasons"]["baseline_bytes_per_layer"] = (f"no {model} bf16 point at {LARGE_BATCH_TOKENS} "
                                                          "tokens/GPU with bytes per layer was run")
    skew = [r["routing_balance"] for r in rows if r["routing"] == "skewed" and r["family"] == "dp"
            and "routing_balance" in r]
    if skew:
        summary["skew_achieved_expert_max_over_mean"] = [min(s["expert_max_over_mean"] for s in skew),
                                                         max(s["expert_max_over_mean"] for s in skew)]
        summary["skew_achieved_ep_rank_max_over_mean"] = [min(s["ep_rank_max_over_mean"] for s in skew),
                                                          max(s["ep_rank_max_over_mean"] for s in skew)]
    best_mfu: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = best_mfu.setdefault(f"{r['model']}/{r['dtype']}", {})
        entry[r["layout"]] = max(entry.get(r["layout"], 0.0), round(r["mfu"], 4))
    summary["best_mfu_per_layout"] = best_mfu
    summary["not_run"] = [s for s in skipped if s.get("layout") == "*"]
    return summary


def _bytes_at_large_batch(rows: list[dict], model: str) -> dict | None:
    """Bytes per layer per rank of every communicating layout at 16K tokens/GPU (``model``
    bf16, the shortest context run), moved and minimum, per ``layout/routing``."""
    at = [r for r in rows if r["model"] == model and r["dtype"] == "bf16" and r["family"] != "dp"
          and r["tokens_per_gpu"] == LARGE_BATCH_TOKENS and "bytes_per_layer" in r]
    if not at:
        return None
    context = min(r["context"] for r in at)
    return {"tokens_per_gpu": LARGE_BATCH_TOKENS, "context": context,
            "layouts": {f"{r['layout']}/{r['routing']}": r["bytes_per_layer"] for r in at if r["context"] == context}}


HEADLINE_KEYS = ("mfu_235b_bf16_above_threshold", "exposed_comm_above_threshold", "speedup_short_ctx_balanced",
                 "speedup_short_ctx_skewed", "speedup_32k_ctx", "exposed_comm_16k_plus",
                 "speedup_vs_fair_best_16k_plus")


def print_table(result: dict) -> None:
    header = ["model", "dtype", "routing", "ctx", "tok/GPU", "layout", "ms/layer", "tok/s/GPU", "MFU", "exposed",
              "vs best base", "moved/layer", "minimum"]
    widths = [16, 5, 8, 6, 7, 24, 9, 10, 6, 8, 12, 11, 10]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    previous = None
    for r in result["points"]:
        point = (r["model"], r["dtype"], r["routing"], r["context"], r["tokens_per_gpu"])
        traffic = r.get("bytes_per_layer")
        cells = [*(point if point != previous else [""] * 5), r["layout"], f"{r['ms_per_layer']:.3f}",
                 f"{r['tokens_per_s_per_gpu']:.0f}", f"{100 * r['mfu']:.1f}%",
                 "-" if r["exposed_comm"] is None else f"{100 * r['exposed_comm']:.1f}%",
                 "-" if r["speedup_vs_best_baseline"] is None else f"{r['speedup_vs_best_baseline']:.2f}x",
                 "-" if traffic is None else bytes_text(traffic["moved"]),
                 "-" if traffic is None else bytes_text(traffic["minimum"])]
        print(" ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))
        previous = point
        for k in r.get("profile", []):
            print(f"{'':>40} {100 * k['share']:5.1f}% {k['ms']:8.3f} ms  {k['name']}")
    s = result["summary"]
    print(f"peak used: {s['peak_tflops_used']} TFLOP/s (dense bf16) on {s['gpus']} x {s['gpu']}; "
          f"timing: {s['timing']}")
    for key in (*HEADLINE_KEYS, "baseline_bytes_per_layer"):
        print(f"{key}: {s[key]}" + (f"  ({s['reasons'][key]})" if key in s["reasons"] else ""))
    print(f"projected_speedup_8gpu (model): {s['projected_speedup_8gpu']}"
          + (f"  ({s['projected_speedup_8gpu_reason']})" if s.get("projected_speedup_8gpu_reason") else ""))
    print(f"planner_max_error: {s['planner_max_error']}"
          + (f"  ({s['planner_error_reason']})" if s.get("planner_error_reason") else
             f"  by layout {s['planner_error_by_layout']}"))
    for key in ("skew_achieved_expert_max_over_mean", "skew_achieved_ep_rank_max_over_mean"):
        if key in s:
            print(f"{key}: {s[key][0]:.2f} .. {s[key][1]:.2f}")
    for item in result["skipped"]:
        print(f"not run: {item}")


#: Panels side by side at most; more (routing, context) pairs wrap to one routing per row.
PLOT_PANELS_PER_ROW = 4


def plot(result: dict, path: Path) -> None:
    """Throughput vs tokens per GPU, one panel per (model, dtype, routing, context), in a grid.

    A row holds one (model, dtype)'s (routing, context) panels when there are at most
    :data:`PLOT_PANELS_PER_ROW` of them, else one (model, dtype, routing)'s contexts. One
    legend for the figure (a layout has one colour in every panel); the predicted saturation
    threshold is a dotted vertical line labelled with its value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result["points"]
    panels = sorted({(r["model"], r["dtype"], r["routing"], r["context"]) for r in rows})
    if not panels:
        return
    columns = len({(routing, context) for _, _, routing, context in panels})
    if columns > PLOT_PANELS_PER_ROW:
        columns = min(len({context for *_, context in panels}), PLOT_PANELS_PER_ROW)
    grid_rows = (len(panels) + columns - 1) // columns
    layouts = sorted({r["layout"] for r in rows})
    palette = plt.get_cmap("tab10")
    styles = {layout: {"color": palette(k % palette.N), "linestyle": "--" if layout == "dp" else "-",
                       "marker": "o", "ms": 3} for k, layout in enumerate(layouts)}
    threshold_style = {"color": "grey", "linestyle": ":"}
    fig, axes = plt.subplots(grid_rows, columns, squeeze=False, layout="constrained",
                             figsize=(4.2 * columns, 3.0 * grid_rows + 1.2))
    any_threshold = False
    for index, (ax, (model, dtype, routing, context)) in enumerate(zip(axes.flat, panels)):
        panel = [r for r in rows if (r["model"], r["dtype"], r["routing"], r["context"]) ==
                 (model, dtype, routing, context)]
        for layout in sorted({r["layout"] for r in panel}):
            line = sorted((r["tokens_per_gpu"], r["tokens_per_s_per_gpu"]) for r in panel if r["layout"] == layout)
            ax.plot([x for x, _ in line], [y for _, y in line], **styles[layout])
        limit = result["thresholds"].get(f"{model}/{dtype}/{context}", {}).get("tokens_per_gpu")
        if limit:
            any_threshold = True
            ax.axvline(limit, **threshold_style)
            ax.annotate(f"threshold\n{limit:,} tok/GPU", xy=(limit, 0.02), xycoords=("data", "axes fraction"),
                        xytext=(3, 0), textcoords="offset points", fontsize=6, color="dimgrey")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {dtype}, {routing}, ctx {context}", fontsize=8)
        if index + columns >= len(panels):  # the lowest panel of its column
            ax.set_xlabel("tokens per GPU", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], **styles[layout]) for layout in layouts]
    labels = list(layouts)
    if any_threshold:
        handles.append(Line2D([], [], **threshold_style))
        labels.append("predicted saturation threshold")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=7, frameon=False)
    fig.supylabel("tokens/s per GPU (full model)", fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"e2e prefill, {meta['world_size']} x {meta['gpu']}, {meta['layers']} layers per pass", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
