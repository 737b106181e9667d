"""``zeroprefill simulate``: its arguments, and the run that prints the table and writes the files."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from zeroprefill.common.hardware import SHIPPED_GPU_COUNTS, SHIPPED_GPUS, HardwareProfileError
from zeroprefill.common.model_spec import ModelSpecError, MoEModelSpec
from zeroprefill.common.saturation import PLAN_DTYPES, PLAN_TRANSPORTS, PlanError
from zeroprefill.simulate.comparison import POLICIES, run_comparison
from zeroprefill.simulate.hardware import ReplicaHardware
from zeroprefill.simulate.report import HEADER, plot, table_row
from zeroprefill.simulate.summary import mean_results, summarize, summarize_seeds
from zeroprefill.simulate.workloads import WORKLOADS, WorkloadParams

REFERENCE_MODEL = Path(str(resources.files("zeroprefill.common") / "model_configs" / "qwen3-235b-a22b.json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulate flags; their defaults are the replica model's and the workloads'."""
    defaults_hw, defaults_wl = ReplicaHardware(), WorkloadParams()
    parser.add_argument("--model", default=str(REFERENCE_MODEL),
                        help="config.json (or its directory) of the simulated model (default: Qwen3-235B-A22B)")
    parser.add_argument("--replicas", type=int, default=4,
                        help="replicas (AsyncEP groups) the policies route over")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="NAME",
                        help="workloads to run, any of: %(choices)s (all but no_sharing share prefixes; "
                             "default: all)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), metavar="NAME",
                        help="routing policies to compare on the same requests, any of: %(choices)s (default: all)")
    parser.add_argument("--requests", type=int, default=defaults_wl.num_requests,
                        help="requests per workload and run")
    parser.add_argument("--load", type=float, default=defaults_wl.load,
                        help="latency run's offered load, fraction of no-cache capacity")
    parser.add_argument("--overload", type=float, default=defaults_wl.overload,
                        help="throughput run's offered load (Poisson), multiple of the ceiling capacity "
                             "(every request hitting what one unbounded shared cache would)")
    parser.add_argument("--arrival-cv", type=float, default=defaults_wl.arrival_cv,
                        help="latency run: coefficient of variation of inter-arrival gaps (1 = Poisson)")
    parser.add_argument("--zipf-a", type=float, default=defaults_wl.zipf_a,
                        help="Zipf exponent of how often each shared prefix (query, instruction, document) recurs")
    parser.add_argument("--gpus-per-replica", type=int, default=defaults_hw.gpus,
                        help="GPUs in one replica's AsyncEP group (a shipped profile's count: "
                             f"{', '.join(map(str, SHIPPED_GPU_COUNTS))})")
    parser.add_argument("--gpu", choices=SHIPPED_GPUS, default=defaults_hw.gpu,
                        help="GPU kind: the shipped hardware profile the replicas are priced with")
    parser.add_argument("--transport", choices=PLAN_TRANSPORTS, default=defaults_hw.transport,
                        help="how a replica gathers its experts (auto: what the runtime picks on GPUs)")
    parser.add_argument("--weight-dtype", choices=PLAN_DTYPES, default=defaults_hw.weight_dtype,
                        help="expert weight format: the bytes each MoE layer gathers and the GEMM rate")
    parser.add_argument("--cache-capacity-tokens", type=int, default=defaults_hw.cache_capacity_tokens,
                        help="prefix-cache (KV) capacity per replica, in tokens")
    parser.add_argument("--max-batch-tokens", type=int, default=defaults_hw.max_batch_tokens,
                        help="uncached tokens one forward may compute (the engine's token budget)")
    parser.add_argument("--block-size", type=int, default=16,
                        help="prefix-cache block size in tokens, engine and router alike")
    parser.add_argument("--bound-factor", type=float, default=1.25,
                        help="zeroprefill policy: bound = saturation threshold x this factor")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the prompts and arrivals (the first one with --seeds)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run seeds --seed .. --seed + N - 1 and summarise mean and worst seed")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the results here as JSON (default: not written)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="write a PNG plot here (default: not drawn)")


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, run every seed, print the table and summary, write JSON/PNG."""
    for name in ("replicas", "requests", "gpus_per_replica", "block_size", "cache_capacity_tokens",
                 "max_batch_tokens", "seeds"):
        if getattr(args, name) <= 0:
            print(f"zeroprefill simulate: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    for name in ("load", "overload", "arrival_cv", "zipf_a", "bound_factor"):
        if not getattr(args, name) > 0:
            print(f"zeroprefill simulate: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    hardware = ReplicaHardware(gpus=args.gpus_per_replica, gpu=args.gpu, transport=args.transport,
                               weight_dtype=args.weight_dtype, cache_capacity_tokens=args.cache_capacity_tokens,
                               max_batch_tokens=args.max_batch_tokens)
    try:
        spec = MoEModelSpec.from_pretrained(args.model)
        deployment = hardware.deployment(spec)
    except (ModelSpecError, FileNotFoundError, HardwareProfileError, PlanError) as exc:
        print(f"zeroprefill simulate: {exc}", file=sys.stderr)
        return 2
    params = WorkloadParams(num_requests=args.requests, zipf_a=args.zipf_a, arrival_cv=args.arrival_cv,
                            load=args.load, overload=args.overload)
    print(f"{args.replicas} replicas x {hardware.gpus} GPUs ({deployment.profile.name}, {deployment.transport}); forward floor "
          f"{hardware.forward_floor_s(spec) * 1e3:.0f} ms, saturation "
          f"{hardware.saturation_flops(spec):.3g} FLOPs, bound x{args.bound_factor}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed = []
    for seed in seeds:
        if len(seeds) > 1:
            print(f"seed {seed}")
        print(HEADER)
        per_seed.append(run_comparison(spec, hardware, args.workloads, args.policies, params, args.replicas,
                                       args.block_size, args.bound_factor, seed, progress=print))
        print("prefix-hit ceiling (unbounded cache, any policy): " + ", ".join(
            f"{workload} {100 * entry['prefix_hit_ceiling']:.1f} %" for workload, entry in per_seed[-1].items()))
    summaries = [summarize(results) for results in per_seed]
    summary = summaries[0] if len(seeds) == 1 else summarize_seeds(summaries)
    results = per_seed[0] if len(seeds) == 1 else mean_results(per_seed)
    if len(seeds) > 1:
        print(f"mean over seeds {seeds[0]}..{seeds[-1]}")
        print(HEADER)
        for workload, entry in results.items():
            for policy_name, runs in entry["policies"].items():
                print(table_row(workload, policy_name, runs))
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"{key}: {value:.3f}")
    print("throughput / ceiling capacity: " + "; ".join(
        f"{workload} " + ", ".join(f"{name} {100 * share:.1f} %" for name, share in
                                   entry["throughput_vs_ceiling_capacity"].items())
        for workload, entry in summary["per_workload"].items()))
    if args.json is not None:
        payload = {"summary": summary, "config": {"model": Path(args.model).name, "replicas": args.replicas,
                   "hardware": {**asdict(hardware), "profile": deployment.profile.name}, "workload": asdict(params), "block_size": args.block_size,
                   "bound_factor": args.bound_factor, "seeds": seeds,
                   "saturation_flops": hardware.saturation_flops(spec),
                   "forward_floor_s": hardware.forward_floor_s(spec)}, "results": results}
        if len(seeds) > 1:
            payload["per_seed"] = [{"seed": seed, "summary": one, "results": res}
                                   for seed, one, res in zip(seeds, summaries, per_seed)]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot is not None:
        plot(results, args.plot)
    return 0
