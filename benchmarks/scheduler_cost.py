"""What one engine step's scheduling costs on the host: vLLM's scheduler against the plugin's.

A served step that ends waits for the scheduler to pick the next one before the GPU gets work,
so the time ``schedule()`` takes is time the GPU idles (vLLM 0.26's pooling runner does not
overlap it). The plugin's prefill-only scheduler (``vllm_zeroprefill/scheduler.py``) prices
every waiting request in true FLOPs, with its prefix-cache hit, before vLLM's own scan; this
times both on the same queue: ``--waiting`` requests of ``--tokens`` random token ids kept
waiting, a real ``Scheduler`` over a model config from ``common/model_configs`` (no weights:
the scheduler reads only the config), every scheduled request finished after its step, as a
pooling request is. The prefill-only scheduler's FLOPs budget is set out of reach (through
``--additional-config``, the first place it reads one), as ``vllm_serve.py``'s ``asyncep``
layout sets it (``--flops-budget`` sets another), so both fill ``--batched-tokens``.

    python benchmarks/scheduler_cost.py --out benchmarks/results/scheduler_cost-cpu.json

Prints a table and writes JSON. CPU only; any vLLM from 0.26.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _serving import write_json  # noqa: E402
from _vllm_layouts import UNREACHABLE_FLOPS_BUDGET  # noqa: E402


def make_scheduler(cls, model_dir: Path, layers: int, batched_tokens: int, context: int, flops_budget: float):
    """A ``cls`` scheduler of one engine with KV room for 40 full steps and prefix caching on
    (``flops_budget``: the prefill-only scheduler's step budget)."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_zeroprefill.scheduler import ADDITIONAL_CONFIG_KEY

    engine_args = EngineArgs(model=str(model_dir), runner="pooling", dtype="float32", skip_tokenizer_init=True,
                             max_num_batched_tokens=batched_tokens, max_model_len=context + 64,
                             max_num_seqs=1024, enable_prefix_caching=True,
                             hf_overrides={"num_hidden_layers": layers},
                             additional_config={ADDITIONAL_CONFIG_KEY: {"step_flops_budget": flops_budget}})
    config = engine_args.create_engine_config()
    block = config.cache_config.block_size
    config.cache_config.num_gpu_blocks = batched_tokens // block * 40
    spec = FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=16, dtype=torch.float32)
    kv_cache = KVCacheConfig(num_blocks=config.cache_config.num_gpu_blocks, kv_cache_tensors=[],
                             kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    return cls(vllm_config=config, kv_cache_config=kv_cache,
               structured_output_manager=StructuredOutputManager(config), block_size=block), block


def time_schedulers(schedulers: dict[str, tuple], waiting: int, tokens: int, steps: int, seed: int) -> list[dict]:
    """Median ``schedule()`` time of each scheduler (``name: (scheduler, block)``) over ``steps``
    steps (the first two left out), one step of each in turn, so that the machine's drift
    weighs on both alike; each queue is topped up to ``waiting`` requests (the same ones for
    every scheduler) before its step, and every scheduled request finishes after it."""
    from vllm.pooling_params import PoolingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request, RequestStatus

    init_none_hash(sha256)
    state = {name: {"rng": random.Random(seed), "made": 0, "times_ms": [], "scheduled": [],
                    "hasher": get_request_block_hasher(block, sha256)} for name, (_, block) in schedulers.items()}
    for _ in range(steps):
        for name, (scheduler, _) in schedulers.items():
            own = state[name]
            while len(scheduler.waiting) < waiting:
                ids = [own["rng"].randrange(3, 500) for _ in range(tokens)]
                scheduler.add_request(Request(request_id=str(own["made"]), prompt_token_ids=ids, sampling_params=None,
                                              pooling_params=PoolingParams(task="embed"), arrival_time=time.time(),
                                              block_hasher=own["hasher"]))
                own["made"] += 1
            started = time.perf_counter()
            output = scheduler.schedule()
            own["times_ms"].append((time.perf_counter() - started) * 1e3)
            own["scheduled"].append(len(output.num_scheduled_tokens))
            scheduler.finish_requests(list(output.num_scheduled_tokens), RequestStatus.FINISHED_STOPPED)
    return [{"scheduler": name, "schedule_ms_median": round(statistics.median(own["times_ms"][2:]), 3),
             "schedule_ms_max": round(max(own["times_ms"][2:]), 3),
             "requests_scheduled_per_step": statistics.median(own["scheduled"][2:])} for name, own in state.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="qwen3-30b-a3b", help="a config in common/model_configs")
    parser.add_argument("--layers", type=int, default=48, help="num_hidden_layers")
    parser.add_argument("--batched-tokens", type=int, default=32768, help="--max-num-batched-tokens")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per request")
    parser.add_argument("--waiting", type=int, default=80, help="requests kept waiting before every step")
    parser.add_argument("--steps", type=int, default=100, help="steps timed (the first two left out)")
    parser.add_argument("--flops-budget", type=float, default=UNREACHABLE_FLOPS_BUDGET,
                        help="the prefill-only scheduler's step budget in FLOPs (default: out of reach)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    config = REPO / "common" / "model_configs" / f"{args.model}.json"
    if not config.exists():
        names = sorted(path.stem for path in config.parent.glob("*.json"))
        parser.error(f"no model config {args.model!r}; one of: {', '.join(names)}")
    if args.flops_budget <= 0:
        parser.error(f"--flops-budget must be positive, got {args.flops_budget}")
    import vllm
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_zeroprefill.scheduler import PrefillOnlyScheduler

    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work)
        shutil.copy(config, model_dir / "config.json")
        schedulers = {name: make_scheduler(cls, model_dir, args.layers, args.batched_tokens, args.tokens,
                                           args.flops_budget)
                      for name, cls in (("vllm", Scheduler), ("prefill-only", PrefillOnlyScheduler))}
        rows = time_schedulers(schedulers, args.waiting, args.tokens, args.steps, 0)
    print(f"{'scheduler':<14}{'schedule() ms, median':>22}{'max':>8}{'requests per step':>19}")
    for row in rows:
        print(f"{row['scheduler']:<14}{row['schedule_ms_median']:>22.2f}{row['schedule_ms_max']:>8.2f}"
              f"{row['requests_scheduled_per_step']:>19}")
    if args.out:
        write_json(args.out, {"command": " ".join(["python", "benchmarks/scheduler_cost.py",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "vllm_version": vllm.__version__, "model": args.model, "layers": args.layers,
                              "batched_tokens": args.batched_tokens, "tokens": args.tokens,
                              "waiting": args.waiting, "steps": args.steps, "flops_budget": args.flops_budget,
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
