"""``zeroprefill router``: run the gateway in front of vLLM / SGLang replicas.

    zeroprefill router --backend http://h1:8000 --backend http://h2:8000 --model DIR \\
        [--port 8080] [--gpus 4 --gpu h200 | --saturation-flops 2.2e15] [--bound-factor 1.25]

``--model`` is the model directory (``config.json`` for the cost model, ``tokenizer.json`` to
count and hash prompt tokens). The per-replica bound on outstanding work is the saturation
threshold x ``--bound-factor``; the threshold is ``--saturation-flops``, or the planner's
(:func:`zeroprefill.common.saturation.step_flops_budget` at headroom 1, times the GPUs) for a
replica of ``--gpus`` GPUs of ``--gpu`` at ``--dtype``, ``--transport`` (``auto``: what the
runtime gathers with) and ``--context-tokens``. With neither, or one GPU per replica (nothing
is gathered), the router does not hold requests back (prefix affinity and
least-outstanding-FLOPs placement only). ``--kv-events`` (once per backend) subscribes to the
replicas' vLLM KV-cache events so the prefix index follows what the engines really cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
from pathlib import Path

from zeroprefill.common.hardware import SHIPPED_GPUS
from zeroprefill.common.saturation import DEFAULT_CONTEXT_TOKENS, PLAN_DTYPES, PLAN_TRANSPORTS
from zeroprefill.common.transport_choice import AUTO_TRANSPORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", required=True, metavar="URL",
                        help="a replica's base URL, e.g. http://127.0.0.1:8000 (repeat per replica)")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory with config.json and tokenizer.json")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--backend-kind", choices=("auto", "vllm", "sglang"), default="auto",
                        help="engine of the replicas; auto reads owned_by from /v1/models")
    parser.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                        help="a model name clients may ask for (repeat); none given: what the backends serve")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt in tokens; unset: the model's max_position_embeddings")
    parser.add_argument("--saturation-flops", type=float, default=None,
                        help="per-replica saturation threshold in FLOPs of outstanding work; unset: the "
                             "planner's with --gpus, else no holding back")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs per replica (one AsyncEP group): derive the saturation threshold and the "
                             "replica compute rate from the planner; unset: no planner")
    parser.add_argument("--gpu", default="h200",
                        help=f"planner hardware profile (with --gpus): {', '.join(SHIPPED_GPUS)}")
    parser.add_argument("--dtype", default="bf16",
                        help=f"planner weight and compute format (with --gpus): {', '.join(PLAN_DTYPES)}")
    parser.add_argument("--transport", default=AUTO_TRANSPORT,
                        help=f"planner AllGather transport (with --gpus): {', '.join(PLAN_TRANSPORTS)}; auto is "
                             "what the runtime picks on GPUs (copy_engine inside a node)")
    parser.add_argument("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS,
                        help="typical prompt length for the planner's threshold (with --gpus)")
    parser.add_argument("--bound-factor", type=float, default=1.25,
                        help="outstanding-FLOPs bound = saturation threshold x this factor")
    parser.add_argument("--block-size", type=int, default=16,
                        help="the engine's prefix-cache block size in tokens")
    parser.add_argument("--kv-events", action="append", default=[], metavar="ENDPOINT[,ENDPOINT...]",
                        help="a replica's vLLM KV-event ZMQ endpoints, one per DP rank (e.g. "
                             "tcp://10.0.0.1:5557,tcp://10.0.0.1:5558); repeat per --backend, in order. "
                             "The engine needs --kv-events-config and the same --block-size; none given: "
                             "the prefix index guesses evictions (LRU)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the engines' --max-num-batched-tokens: a replica's next forward is not filled "
                             "past it; unset: no limit")
    parser.add_argument("--cache-capacity-tokens", type=int, default=1 << 20,
                        help="each replica's prefix-cache size in tokens (LRU beyond it)")
    parser.add_argument("--request-timeout-s", type=float, default=300.0,
                        help="seconds before a request is answered 504")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="re-dispatches of a request whose replica failed")
    parser.add_argument("--health-interval-s", type=float, default=1.0,
                        help="seconds between two health probes of a backend")
    parser.add_argument("--health-timeout-s", type=float, default=2.0,
                        help="seconds a health probe may take before its backend counts as unhealthy")
    parser.add_argument("--log-level", default="warning",
                        help="logging level: debug, info, warning, error")


def run(args: argparse.Namespace) -> int:
    from zeroprefill.common.model_spec import ModelSpecError, MoEModelSpec
    from zeroprefill.router.app import RouterApp, RouterConfig
    from zeroprefill.router.backends import BackendPool
    from zeroprefill.router.prompts import PromptTokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = Path(args.model)
    try:
        spec = MoEModelSpec.from_pretrained(model_dir)
        tokenizer = PromptTokenizer(model_dir)
    except (ModelSpecError, FileNotFoundError) as exc:
        print(f"zeroprefill router: {exc}", file=sys.stderr)
        return 2
    max_model_len = args.max_model_len or _max_position_embeddings(model_dir)
    for name, value in (("--bound-factor", args.bound_factor), ("--block-size", args.block_size),
                        ("--request-timeout-s", args.request_timeout_s)):
        if not value > 0:
            print(f"zeroprefill router: {name} must be > 0, got {value}", file=sys.stderr)
            return 2
    if args.max_num_batched_tokens is not None and not args.max_num_batched_tokens > 0:
        print(f"zeroprefill router: --max-num-batched-tokens must be > 0, got {args.max_num_batched_tokens}",
              file=sys.stderr)
        return 2
    if args.saturation_flops is not None and not args.saturation_flops > 0:
        print(f"zeroprefill router: --saturation-flops must be > 0, got {args.saturation_flops}",
              file=sys.stderr)
        return 2
    saturation_flops = args.saturation_flops
    flops_per_s = 0.0
    if args.gpus is not None:
        try:
            planned_saturation, flops_per_s = _planner_replica_model(spec, args)
        except ValueError as exc:
            print(f"zeroprefill router: {exc}", file=sys.stderr)
            return 2
        if saturation_flops is None and planned_saturation > 0:  # 0: one GPU, nothing to hide
            saturation_flops = planned_saturation
    bound_flops = saturation_flops * args.bound_factor if saturation_flops is not None else math.inf
    try:
        kv_event_endpoints = _kv_event_endpoints(args.kv_events, len(args.backend))
    except ValueError as exc:
        print(f"zeroprefill router: {exc}", file=sys.stderr)
        return 2
    config = RouterConfig(
        spec=spec,
        tokenizer=tokenizer,
        max_model_len=max_model_len,
        bound_flops=bound_flops,
        saturation_flops=saturation_flops or 0.0,
        flops_per_s=flops_per_s,
        block_size=args.block_size,
        cache_capacity_blocks=max(args.cache_capacity_tokens // args.block_size, 1),
        max_batch_tokens=args.max_num_batched_tokens,
        request_timeout_s=args.request_timeout_s,
        max_retries=args.max_retries,
        served_model_names=tuple(args.served_model_name),
        kv_event_endpoints=kv_event_endpoints,
    )
    try:
        pool = BackendPool(args.backend, args.backend_kind, args.health_interval_s, args.health_timeout_s)
    except ValueError as exc:
        print(f"zeroprefill router: {exc}", file=sys.stderr)
        return 2
    router = RouterApp(config, pool)
    _use_uvloop()
    try:
        asyncio.run(_serve(router, args.host, args.port, bound_flops))
    except OSError as exc:  # e.g. the port is taken
        print(f"zeroprefill router: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a KV-event endpoint ZMQ cannot connect to
        print(f"zeroprefill router: {exc}", file=sys.stderr)
        return 2
    return 0


def _kv_event_endpoints(values: list[str], num_backends: int) -> tuple[tuple[str, ...], ...]:
    """``--kv-events`` values -> per backend, its DP ranks' endpoints (validated)."""
    if not values:
        return ()
    if len(values) != num_backends:
        raise ValueError(f"--kv-events is given {len(values)} times for {num_backends} --backend; "
                         "give it once per backend, in the same order")
    endpoints = tuple(tuple(e.strip() for e in value.split(",") if e.strip()) for value in values)
    for value, ranks in zip(values, endpoints):
        bad = [e for e in ranks if not e.startswith(("tcp://", "ipc://"))]
        if not ranks or bad:
            raise ValueError(f"--kv-events {value!r}: expected tcp://HOST:PORT or ipc://PATH endpoints, "
                             "comma-separated per DP rank")
    try:
        import msgspec  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--kv-events needs pyzmq and msgspec ({exc}); pip install 'zeroprefill[router]'") from exc
    return endpoints


async def _serve(router, host: str, port: int, bound_flops: float) -> None:
    """Serve until SIGINT / SIGTERM, then close every connection and the backend pools."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await router.start(host, port)
    try:
        print(f"zeroprefill router on http://{host}:{port} -> "
              f"{', '.join(b.url for b in router.pool.backends)} (bound {bound_flops:.3g} FLOPs per replica)",
              flush=True)
        await stop.wait()
    finally:
        await router.close()


def _planner_replica_model(spec, args: argparse.Namespace) -> tuple[float, float]:
    """Per replica: the saturation threshold (``gpus`` x the planner's step budget per GPU at
    headroom 1) and the effective compute rate in FLOP/s (``gpus`` x R_eff under the gather)."""
    from zeroprefill.common.saturation import Deployment, replica_flops_per_s, replica_saturation_flops

    if args.gpus <= 0 or args.context_tokens <= 0:
        raise ValueError(f"--gpus and --context-tokens must be > 0, got {args.gpus}, {args.context_tokens}")
    deployment = Deployment.on_shipped_gpu(spec, args.gpu, args.gpus, args.dtype, args.transport)
    return replica_saturation_flops(deployment, args.context_tokens), replica_flops_per_s(deployment)


def _max_position_embeddings(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    text_config = config.get("text_config", config)
    return int(text_config.get("max_position_embeddings", 1 << 30))


def _use_uvloop() -> None:
    """uvloop's event loop when installed (it is, with vLLM): a faster loop for a proxy."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
