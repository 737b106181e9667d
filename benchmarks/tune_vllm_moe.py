"""Tune stock vLLM's Triton MoE kernel for a shape vLLM ships no configuration for.

Stock vLLM picks its ``fused_moe`` tile configuration from a JSON per (local experts ``E``,
intermediate size ``N``, GPU); without one it warns "Using default MoE config. Performance
might be sub-optimal!" and uses a generic tile. vLLM 0.26 ships none for Qwen3-235B-A22B's
expert-parallel shape on H200 (``E=64,N=1536``: 128 experts over 2 ranks), so an
out-of-the-box stock DP=2 + EP server runs untuned kernels there; a careful operator would
tune them (vLLM's ``benchmarks/kernels/benchmark_moe.py --tune``) and point
``VLLM_TUNED_CONFIG_FOLDER`` at the result. This script does that, so the stock baselines of
``vllm_serve.py`` run tuned (``--stock-moe-configs DIR``).

Candidates are every distinct configuration vLLM itself ships for this GPU (its own tuning
results on other shapes, ~120 on H200); each is timed with vLLM's ``fused_experts`` under
``override_config`` at every batch size, in the layout the server runs (global top-k ids,
``expert_map`` masking the other ranks' experts), and the fastest per batch size is written
under vLLM's own file name. The JSON beside it records the default tile's time and the
tuned one's per batch size.

    python benchmarks/tune_vllm_moe.py --experts 128 --ep-size 2 --hidden 4096 --intermediate 1536 \\
        --top-k 8 --out-dir benchmarks/results/vllm_moe_configs
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

Config = dict[str, int]

# Batch sizes as the kernel sees them: under all-gather EP, every DP rank's tokens of a step.
DEFAULT_TOKENS = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def shipped_candidates(config_dir: Path, device_file_name: str) -> list[Config]:
    """Distinct tile configurations in vLLM's unquantised configs for this GPU, most used first."""
    counts: Counter[tuple[tuple[str, int], ...]] = Counter()
    for path in config_dir.glob(f"E=*,N=*,device_name={device_file_name}.json"):
        for batch, config in json.loads(path.read_text()).items():
            if batch != "triton_version":
                counts[tuple(sorted(config.items()))] += 1
    return [dict(config) for config, _ in counts.most_common()]


def tune(
    time_config: Callable[[Config | None, int], float],
    candidates: Sequence[Config],
    tokens: Sequence[int],
    budget_s: float,
    default_config: Callable[[int], Config],
    log: Callable[[str], None] = print,
) -> dict:
    """Fastest tile per batch size, vLLM's default (``default_config(M)``, timed as
    ``time_config(None, M)``) included.

    ``time_config`` raises ``RuntimeError``/``ValueError`` for a configuration the kernel
    cannot run (too much shared memory, ...); such a candidate is skipped. Candidates are
    tried in order until ``budget_s`` runs out (the number tried is recorded).
    """
    started = time.monotonic()
    # The default tile is where every batch size starts: a table never makes a size slower.
    results: dict[int, dict] = {}
    for m in tokens:
        default_s = time_config(None, m)
        results[m] = {"default_s": default_s, "best_s": default_s, "best": default_config(m)}
    tried = 0
    for config in candidates:
        if time.monotonic() - started > budget_s:
            break
        tried += 1
        for m in tokens:
            try:
                seconds = time_config(config, m)
            except (RuntimeError, ValueError):
                break  # the kernel cannot run this tile: not at any batch size
            if seconds < results[m]["best_s"]:
                results[m].update(best_s=seconds, best=config)
        if tried % 10 == 0:
            log(f"  {tried}/{len(candidates)} candidates, {time.monotonic() - started:.0f} s")
    return {"candidates": len(candidates), "tried": tried, "by_tokens": results}


def _fused_experts_timer(experts: int, ep_size: int, hidden: int, intermediate: int, top_k: int,
                         device: str) -> tuple[Callable[[Config | None, int], float], Callable[[int], Config]]:
    """Time vLLM's ``fused_experts`` on one EP rank's shard (bf16), as the server runs it.

    The server's ``TritonExperts`` keeps the other ranks' (token, expert) rows in the kernel's
    launch (expert -1, blocks that write zeros); the ``fused_experts`` function drops them. The
    timer makes ``fused_experts`` keep them too, so tiles are ranked on the server's work.
    """
    import torch
    from vllm.model_executor.layers.fused_moe import fused_experts, override_config
    from vllm.model_executor.layers.fused_moe import fused_moe as vllm_fused_moe
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config

    from zeroprefill.calibrate import time_cuda_s

    prepare = vllm_fused_moe._prepare_expert_assignment

    def keep_other_ranks_rows(*args, **kwargs):
        return prepare(*args, **(kwargs | {"ignore_invalid_experts": False}))

    vllm_fused_moe._prepare_expert_assignment = keep_other_ranks_rows

    local = experts // ep_size
    generator = torch.Generator(device=device).manual_seed(0)
    w1 = torch.randn(local, 2 * intermediate, hidden, device=device, dtype=torch.bfloat16, generator=generator) / 64
    w2 = torch.randn(local, hidden, intermediate, device=device, dtype=torch.bfloat16, generator=generator) / 64
    expert_map = torch.full((experts,), -1, dtype=torch.int32, device=device)
    expert_map[:local] = torch.arange(local, dtype=torch.int32, device=device)  # rank 0's experts
    inputs: dict[int, tuple] = {}

    def batch(m: int) -> tuple:
        if m not in inputs:
            x = torch.randn(m, hidden, device=device, dtype=torch.bfloat16, generator=generator)
            logits = torch.randn(m, experts, device=device, generator=generator)
            weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
            inputs[m] = (x, (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32))
        return inputs[m]

    def default(m: int) -> Config:
        return get_default_config(m, local, intermediate, hidden, top_k, None, None)

    def run(config: Config | None, m: int) -> float:
        x, weights, ids = batch(m)
        tile = config or default(m)
        with override_config(tile):
            call = lambda: fused_experts(x, w1, w2, weights, ids, global_num_experts=experts,  # noqa: E731
                                         expert_map=expert_map)
            try:
                call()
            except Exception as exc:  # triton's OutOfResources and kin: this tile does not run here
                raise RuntimeError(f"{tile}: {exc}") from exc
            return time_cuda_s(call, min_total_s=0.02)

    return run, default


def write_configs(out_dir: Path, file_name: str, result: dict, meta: dict) -> Path:
    """vLLM's config JSON (batch size -> tile) and a record of what tuning measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tuned = {str(m): r["best"] for m, r in sorted(result["by_tokens"].items()) if r["best"] is not None}
    path = out_dir / file_name
    path.write_text(json.dumps(tuned, indent=4) + "\n")
    record = meta | {"candidates": result["candidates"], "tried": result["tried"], "by_tokens": {
        str(m): {"default_s": r["default_s"], "tuned_s": r["best_s"], "speedup": r["default_s"] / r["best_s"]}
        for m, r in sorted(result["by_tokens"].items()) if r["best"] is not None}}
    path.with_name(path.stem + ".tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--experts", type=int, default=128, help="the model's routed experts")
    parser.add_argument("--ep-size", type=int, default=2, help="expert-parallel ranks (local experts = experts / this)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=1536, help="one expert's intermediate size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                        help="batch sizes as the kernel sees them (all DP ranks' tokens under all-gather EP)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop trying candidates after this long")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.experts % args.ep_size:
        parser.error(f"--experts {args.experts} is not divisible by --ep-size {args.ep_size}")

    import torch
    import vllm
    from vllm.model_executor.layers.fused_moe import fused_moe as vllm_fused_moe

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times vLLM's Triton kernel)")
    file_name = vllm_fused_moe.get_config_file_name(args.experts // args.ep_size, args.intermediate, None)
    device_file_name = file_name.split("device_name=")[1].removesuffix(".json")
    candidates = shipped_candidates(Path(vllm_fused_moe.__file__).parent / "configs", device_file_name)
    print(f"{file_name}: {len(candidates)} candidate tiles from vLLM's {device_file_name} configs", flush=True)
    timer, default = _fused_experts_timer(args.experts, args.ep_size, args.hidden, args.intermediate, args.top_k,
                                          "cuda")
    result = tune(timer, candidates, args.tokens, args.budget_s, default, log=lambda s: print(s, flush=True))
    meta = {"vllm_version": vllm.__version__, "gpu": torch.cuda.get_device_name(), "experts": args.experts,
            "ep_size": args.ep_size, "hidden": args.hidden, "intermediate": args.intermediate, "top_k": args.top_k}
    path = write_configs(args.out_dir, file_name, result, meta)
    print(f"{'tokens':>8}{'default ms':>12}{'tuned ms':>10}{'speedup':>9}")
    for m, r in sorted(result["by_tokens"].items()):
        if r["best"] is not None:
            print(f"{m:>8}{r['default_s'] * 1e3:>12.3f}{r['best_s'] * 1e3:>10.3f}{r['default_s'] / r['best_s']:>8.2f}x")
    print(f"wrote {path} (tried {result['tried']} of {result['candidates']} candidates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
