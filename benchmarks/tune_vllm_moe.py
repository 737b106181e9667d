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

``--dtype fp8_w8a8`` tunes the block-FP8 kernel instead (bf16 is the default): e4m3 expert
weights with float32 scales per ``--block-shape`` block (128 x 128 by default), activations
quantised per 1 x 128 group inside the call, as vLLM's ``Fp8MoEMethod`` runs a block-FP8
checkpoint on its TRITON backend (the one vLLM 0.26 picks on Hopper at one rank). Candidates are
then the distinct tiles of vLLM's block-FP8 files for this GPU
(``E=*,N=*,device_name=<gpu>,dtype=fp8_w8a8,block_shape=[128,128].json``), and the table is
written under the name vLLM looks up for that case, e.g.
``E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json``.

    python benchmarks/tune_vllm_moe.py --experts 128 --ep-size 2 --hidden 4096 --intermediate 1536 \\
        --top-k 8 --out-dir benchmarks/results/vllm_moe_configs
    python benchmarks/tune_vllm_moe.py --experts 128 --ep-size 1 --hidden 2048 --intermediate 768 \\
        --top-k 8 --dtype fp8_w8a8 --out-dir vllm_moe_configs
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

Config = dict[str, int]

# Batch sizes as the kernel sees them: under all-gather EP, every DP rank's tokens of a step.
DEFAULT_TOKENS = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


#: ``--dtype`` values: vLLM's own names for the kernel's weight format (its config file names'
#: ``dtype=`` field; bf16 has none there).
DTYPES = ("bf16", "fp8_w8a8")
DEFAULT_BLOCK_SHAPE = (128, 128)  # block-FP8 checkpoints' weight_block_size (Qwen3, DeepSeek)


def vllm_dtype(dtype: str) -> str | None:
    """The ``dtype`` vLLM's config lookup gets for ``--dtype`` (None for bf16)."""
    return None if dtype == "bf16" else dtype


def vllm_config_file_name(get_config_file_name: Callable, local_experts: int, intermediate: int, dtype: str,
                          block_shape: Sequence[int] | None) -> str:
    """vLLM's name for the table of this shape (its ``get_config_file_name``, whose lookup
    ``VLLM_TUNED_CONFIG_FOLDER`` serves), called as its Triton path calls it: ``N`` is one
    expert's intermediate size, ``block_shape`` the weights' ``[block_n, block_k]``."""
    if block_shape is None:
        return get_config_file_name(local_experts, intermediate, vllm_dtype(dtype))
    if "block_shape" not in inspect.signature(get_config_file_name).parameters:
        raise RuntimeError("this vLLM's get_config_file_name takes no block_shape: it names no block-FP8 tables")
    return get_config_file_name(local_experts, intermediate, vllm_dtype(dtype), list(block_shape))


def device_of(file_name: str) -> str:
    """The ``device_name`` field of a vLLM config file name."""
    found = re.search(r"device_name=([^,]+?)(?:,|\.json$)", file_name)
    if not found:
        raise ValueError(f"{file_name!r} names no device_name")
    return found.group(1)


def shipped_candidates(config_dir: Path, file_name: str, block_shape: Sequence[int] | None = None) -> list[Config]:
    """Distinct tile configurations vLLM ships for ``file_name``'s device, dtype and block shape
    (its files for every other ``E``, ``N``), most used first.

    With ``block_shape``, ``BLOCK_SIZE_K`` is clamped to the smallest block side as vLLM's
    Triton launcher clamps it for block-quantised weights (a tile never spans two scale
    groups), so tiles that differ only above that run as one and are timed once.
    """
    same_kind = re.compile(r"E=\d+,N=\d+," + re.escape(file_name.split(",", 2)[2]))
    counts: Counter[tuple[tuple[str, int], ...]] = Counter()
    for path in sorted(config_dir.iterdir()):
        if not same_kind.fullmatch(path.name):
            continue
        for batch, config in json.loads(path.read_text()).items():
            if batch == "triton_version":
                continue
            if block_shape is not None and "BLOCK_SIZE_K" in config:
                config = config | {"BLOCK_SIZE_K": min(config["BLOCK_SIZE_K"], *block_shape)}
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


def fp8_call_kwargs(fused_experts: Callable, w1_scale, w2_scale, block_shape: Sequence[int],
                    make_quant_config: Callable | None) -> dict:
    """``fused_experts``' keyword arguments for block-FP8 weights, in the form this vLLM takes:
    a ``quant_config`` (``fp8_w8a8_moe_quant_config(w1_scale, w2_scale, block_shape=...)``, as
    ``Fp8MoEMethod`` builds for its TRITON backend: dynamic activation scales, per 1 x block_k
    group), or, in vLLMs before the quant config, the same as separate flags."""
    parameters = inspect.signature(fused_experts).parameters
    if "quant_config" in parameters:
        if make_quant_config is None:
            raise RuntimeError("this vLLM's fused_experts takes a quant_config, but it has no "
                               "fp8_w8a8_moe_quant_config")
        return {"quant_config": make_quant_config(w1_scale=w1_scale, w2_scale=w2_scale, block_shape=list(block_shape))}
    if "use_fp8_w8a8" in parameters:
        return {"use_fp8_w8a8": True, "w1_scale": w1_scale, "w2_scale": w2_scale, "block_shape": list(block_shape)}
    raise RuntimeError("this vLLM's fused_experts takes neither quant_config nor use_fp8_w8a8: no block-FP8 call known")


def _fused_experts_timer(experts: int, ep_size: int, hidden: int, intermediate: int, top_k: int, device: str,
                         dtype: str = "bf16", block_shape: Sequence[int] | None = None,
                         ) -> tuple[Callable[[Config | None, int], float], Callable[[int], Config]]:
    """Time vLLM's ``fused_experts`` on one EP rank's shard, as the server runs it.

    bf16 weights, or (``dtype="fp8_w8a8"``) e4m3 weights with float32 scales per
    ``block_shape`` block, the bf16 activations quantised per 1 x block_k group inside the call.

    The server's ``TritonExperts`` keeps the other ranks' (token, expert) rows in the kernel's
    launch (expert -1, blocks that write zeros); the ``fused_experts`` function drops them. The
    timer makes ``fused_experts`` keep them too where this vLLM's ``_prepare_expert_assignment``
    takes ``ignore_invalid_experts``, so tiles are ranked on the server's work.
    """
    import torch
    from vllm.model_executor.layers.fused_moe import fused_experts, override_config
    from vllm.model_executor.layers.fused_moe import fused_moe as vllm_fused_moe
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config

    from zeroprefill.calibrate import time_cuda_s

    prepare = getattr(vllm_fused_moe, "_prepare_expert_assignment", None)
    if prepare is not None and "ignore_invalid_experts" in inspect.signature(prepare).parameters:
        def keep_other_ranks_rows(*args, **kwargs):
            return prepare(*args, **(kwargs | {"ignore_invalid_experts": False}))

        vllm_fused_moe._prepare_expert_assignment = keep_other_ranks_rows
    elif ep_size > 1:
        print("this vLLM's fused_experts drops the other ranks' rows (no ignore_invalid_experts to turn off): "
              "tiles are timed without them", flush=True)

    local = experts // ep_size
    generator = torch.Generator(device=device).manual_seed(0)
    w1 = torch.randn(local, 2 * intermediate, hidden, device=device, dtype=torch.bfloat16, generator=generator)
    w2 = torch.randn(local, hidden, intermediate, device=device, dtype=torch.bfloat16, generator=generator)
    quant: dict = {}
    if dtype == "fp8_w8a8":
        assert block_shape is not None
        try:
            from vllm.platforms import current_platform
            fp8 = current_platform.fp8_dtype()
        except (ImportError, AttributeError):
            fp8 = torch.float8_e4m3fn
        try:
            from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
        except ImportError:
            fp8_w8a8_moe_quant_config = None
        block_n, block_k = block_shape

        def scales(rows: int, columns: int) -> torch.Tensor:  # one float32 per block, around 1/64
            shape = (local, -(-rows // block_n), -(-columns // block_k))
            return (torch.rand(shape, device=device, generator=generator) + 0.5) / 64

        # e4m3 values of unit scale (|w| <= ~5, well inside e4m3's 448); the scales carry the 1/64.
        w1, w2 = w1.to(fp8), w2.to(fp8)
        quant = fp8_call_kwargs(fused_experts, scales(2 * intermediate, hidden), scales(hidden, intermediate),
                                block_shape, fp8_w8a8_moe_quant_config)
    else:
        w1, w2 = w1 / 64, w2 / 64
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
        return get_default_config(m, local, intermediate, hidden, top_k, vllm_dtype(dtype),
                                  list(block_shape) if block_shape else None)

    def run(config: Config | None, m: int) -> float:
        x, weights, ids = batch(m)
        tile = config or default(m)
        with override_config(tile):
            call = lambda: fused_experts(x, w1, w2, weights, ids, global_num_experts=experts,  # noqa: E731
                                         expert_map=expert_map, **quant)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything imports torch or vLLM (``block_shape``: a
    tuple for ``fp8_w8a8``, None for bf16)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--experts", type=int, default=128, help="the model's routed experts")
    parser.add_argument("--ep-size", type=int, default=2, help="expert-parallel ranks (local experts = experts / this)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=1536, help="one expert's intermediate size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16",
                        help="expert weights: bf16, or block FP8 (e4m3 weights, float32 scales per --block-shape "
                             "block, activations quantised per 1 x block_k group), as vLLM runs a block-FP8 "
                             "checkpoint on its Triton MoE backend")
    parser.add_argument("--block-shape", type=int, nargs=2, metavar=("BLOCK_N", "BLOCK_K"), default=None,
                        help=f"fp8_w8a8 only: the weights' quantisation block (default {DEFAULT_BLOCK_SHAPE[0]} "
                             f"{DEFAULT_BLOCK_SHAPE[1]})")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                        help="batch sizes as the kernel sees them (all DP ranks' tokens under all-gather EP)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop trying candidates after this long")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.experts % args.ep_size:
        parser.error(f"--experts {args.experts} is not divisible by --ep-size {args.ep_size}")
    if args.dtype == "bf16":
        if args.block_shape is not None:
            parser.error("--block-shape is for --dtype fp8_w8a8 (block-quantised weights); bf16 has no blocks")
        return args
    args.block_shape = tuple(args.block_shape or DEFAULT_BLOCK_SHAPE)
    block_n, block_k = args.block_shape
    if block_n <= 0 or block_k <= 0:
        parser.error(f"--block-shape {block_n} {block_k}: both sides must be positive")
    if args.intermediate % block_n:  # vLLM's Fp8MoEMethod refuses such a checkpoint
        parser.error(f"--intermediate {args.intermediate} is not divisible by the block's {block_n} (BLOCK_N): "
                     "vLLM does not load such a block-FP8 checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch
    import vllm
    from vllm.model_executor.layers.fused_moe import fused_moe as vllm_fused_moe

    if not torch.cuda.is_available():
        raise SystemExit("tune_vllm_moe.py needs a CUDA GPU (it times vLLM's Triton kernel)")
    file_name = vllm_config_file_name(vllm_fused_moe.get_config_file_name, args.experts // args.ep_size,
                                      args.intermediate, args.dtype, args.block_shape)
    candidates = shipped_candidates(Path(vllm_fused_moe.__file__).parent / "configs", file_name, args.block_shape)
    kind = f"{args.dtype} {args.block_shape[0]}x{args.block_shape[1]}-block " if args.block_shape else ""
    print(f"{file_name}: {len(candidates)} candidate tiles from vLLM's {kind}{device_of(file_name)} configs",
          flush=True)
    timer, default = _fused_experts_timer(args.experts, args.ep_size, args.hidden, args.intermediate, args.top_k,
                                          "cuda", args.dtype, args.block_shape)
    result = tune(timer, candidates, args.tokens, args.budget_s, default, log=lambda s: print(s, flush=True))
    meta = {"vllm_version": vllm.__version__, "gpu": torch.cuda.get_device_name(), "experts": args.experts,
            "ep_size": args.ep_size, "hidden": args.hidden, "intermediate": args.intermediate, "top_k": args.top_k,
            "dtype": args.dtype, "block_shape": list(args.block_shape) if args.block_shape else None}
    path = write_configs(args.out_dir, file_name, result, meta)
    print(f"{'tokens':>8}{'default ms':>12}{'tuned ms':>10}{'speedup':>9}")
    for m, r in sorted(result["by_tokens"].items()):
        if r["best"] is not None:
            print(f"{m:>8}{r['default_s'] * 1e3:>12.3f}{r['best_s'] * 1e3:>10.3f}{r['default_s'] / r['best_s']:>8.2f}x")
    print(f"wrote {path} (tried {result['tried']} of {result['candidates']} candidates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
