"""What vLLM's HTTP frontend spends validating one ``/v1/embeddings`` request, by prompt length.

A prefill-only server gets long prompts as token ids (``{"input": [ids...]}``). Before any
tokenising, scheduling or GPU work, the API server's event loop validates the JSON body
against vLLM's ``EmbeddingRequest``: a union of five request models (completion-style input,
chat ``messages``, batched chat, chat or batched chat passed as ``input``) without a
discriminator, so pydantic tries each member. The members that read ``input`` as chat
messages fail only after trying every token id as a message, at microseconds per token. One
API server process validates one request at a time: this cost bounds the requests per second
it can admit, whatever the GPUs behind it can do.

For each prompt length this script times (median of ``--repeats``, one CPU thread, the
installed vLLM):

- ``union_ms``: the body validated as FastAPI validates it (``TypeAdapter(EmbeddingRequest)
  .validate_json``);
- ``members_ms``: each member of the union alone (``model_validate_json``; a member that
  rejects the body is timed to its rejection);
- ``discriminated_ms``: the same union with a callable discriminator that picks the member from
  the body's shape (:func:`request_kind`), so only that member runs; ``same_member`` says it
  picked the model the union picked;
- ``requests_per_s_per_core``: 1,000 / ``union_ms``, what one API server's event loop could
  admit if validation were all it did.

``--served`` then serves a generated one-layer tiny MoE model on CPU (vLLM's CPU server, one
worker: cheap enough per token that the frontend shows) twice, with vLLM's union and with the plugin's discriminated one
(:mod:`vllm_zeroprefill.request_validation`; ``ZEROPREFILL_VLLM_DISCRIMINATED_REQUESTS=0``
for the first), and drives each with the same closed loop of ``--served-tokens``-token
embeddings (``vllm_serve.py``'s load generator, a window after a lead-in): requests/s, p50,
and the API server process's CPU per request (``cpu``: every server process and the load
generator, cores busy in the window). On a CPU the model itself is cheap enough that the
frontend shows; on a GPU server the same frontend sits in front of a far faster engine.

Prints tables and writes JSON (``--out``). CPU only; any vLLM from 0.26::

    python benchmarks/frontend_validation.py --served --out benchmarks/results/frontend_validation-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _serving import write_json  # noqa: E402
from vllm_zeroprefill.request_validation import discriminated, union_members, vllm_embedding_request  # noqa: E402

def token_ids_body(length: int, rng: random.Random) -> bytes:
    return json.dumps({"model": "m", "input": [rng.randrange(3, 500) for _ in range(length)],
                       "encoding_format": "base64"}).encode()


def median_ms(call, repeats: int) -> float:
    """Median wall time of ``call()`` in ms (an exception ends one call, as a rejection does)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            call()
        except ValueError:  # pydantic's ValidationError: the member rejected the body
            pass
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(lengths: list[int], repeats: int) -> dict:
    from pydantic import TypeAdapter

    alias = vllm_embedding_request()
    members, _ = union_members(alias)
    union = TypeAdapter(alias)
    tagged_alias = discriminated(alias)
    tagged = TypeAdapter(tagged_alias) if tagged_alias is not None else None
    rng = random.Random(0)
    points = []
    for length in lengths:
        body = token_ids_body(length, rng)
        union.validate_json(body)  # warm
        point: dict[str, Any] = {"tokens": length, "union_ms": round(median_ms(lambda: union.validate_json(body), repeats), 3)}
        point["us_per_token"] = round(point["union_ms"] * 1e3 / length, 2)
        point["requests_per_s_per_core"] = round(1e3 / point["union_ms"], 1)
        point["members_ms"] = {cls.__name__: round(median_ms(lambda cls=cls: cls.model_validate_json(body), repeats), 3)
                               for cls in members}
        if tagged is not None:
            point["discriminated_ms"] = round(median_ms(lambda: tagged.validate_json(body), repeats), 3)
            point["same_member"] = type(tagged.validate_json(body)) is type(union.validate_json(body))
        points.append(point)
    return {"members": [cls.__name__ for cls in members], "points": points}


def print_table(result: dict) -> None:
    members = result["members"]
    short = [name.replace("Embedding", "").replace("Request", "") or name for name in members]
    print(f"{'tokens':>7} {'union ms':>9} {'us/token':>9} {'req/s/core':>10} {'discrim. ms':>11}  "
          + "  ".join(f"{name:>14}" for name in short))
    for point in result["points"]:
        tagged = point.get("discriminated_ms")
        print(f"{point['tokens']:>7} {point['union_ms']:>9.3f} {point['us_per_token']:>9.2f} "
              f"{point['requests_per_s_per_core']:>10.1f} {'-' if tagged is None else f'{tagged:.3f}':>11}  "
              + "  ".join(f"{point['members_ms'][name]:>14.3f}" for name in members))


def serve_and_drive(discriminate: bool, tokens: int, clients: int, duration_s: float, work: Path) -> dict:
    """One CPU server of the tiny model, the union discriminated or not, under a closed loop."""
    import asyncio

    from _vllm_load import _drive
    from vllm_zeroprefill.request_validation import SETTING_ENV
    from vllm_zeroprefill.server import VllmServer, cpu_env
    from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe

    model = work / "tiny"
    if not (model / "config.json").exists():
        generate_tiny_moe(model, TinyMoEConfig(num_layers=1, hidden_size=64, expert_intermediate_size=32,
                                               num_attention_heads=2, num_kv_heads=1,
                                               max_position_embeddings=tokens + 64))
    env = cpu_env(1) | {SETTING_ENV: "1" if discriminate else "0"}
    args = ["--runner", "pooling", "--convert", "embed", "--max-model-len", str(tokens + 64),
            "--max-num-batched-tokens", str(4 * tokens)]
    log = work / f"server-{'discriminated' if discriminate else 'union'}.log"
    with VllmServer(model, args, log, device="cpu", env=env) as server:
        server.wait_healthy(timeout_s=600)
        point = asyncio.run(_drive(server.url, str(model), tokens, concurrency=clients, rate=None,
                                   duration_s=duration_s, drain_s=10.0, seed=1, gpus=1, lead_s=2.0,
                                   cpu_roots=[server.process.pid]))
        api_server = next((entry for entry in point["cpu"].get("processes", []) if entry["pid"] == server.process.pid),
                          None)
    answered = point["requests"]
    return {"discriminated": discriminate, "requests_per_s": point["requests_per_s"], "p50_s": point["p50_s"],
            "failed": point["failed"],
            "api_server_cpu_ms_per_request": (round(api_server["busy_cores"] * point["window_s"] * 1e3 / answered, 2)
                                              if api_server and answered else None),
            "cpu": point["cpu"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048, 8192], help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=15, help="timed validations per point (median)")
    parser.add_argument("--served", action="store_true",
                        help="also serve the tiny model on CPU with vLLM's union and with the discriminated one")
    parser.add_argument("--served-tokens", type=int, default=2048, help="tokens per served request")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients of each served run")
    parser.add_argument("--duration-s", type=float, default=8.0, help="timed seconds of each served run")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if any(length < 1 for length in args.tokens) or min(args.repeats, args.served_tokens, args.clients) < 1:
        parser.error("--tokens, --repeats, --served-tokens and --clients: at least 1")
    if args.duration_s <= 0:
        parser.error(f"--duration-s {args.duration_s:g}: seconds, more than 0")
    import pydantic
    import vllm

    result = {"command": " ".join(["python", "benchmarks/frontend_validation.py", *(argv if argv is not None else sys.argv[1:])]),
              "vllm_version": vllm.__version__, "pydantic_version": pydantic.VERSION,
              "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    result |= measure(args.tokens, args.repeats)
    print_table(result)
    if args.served:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result["served"] = []
            for discriminate in (False, True):
                print(f"serving the tiny model on CPU, {'discriminated' if discriminate else 'vLLM'} union, "
                      f"{args.clients} clients x {args.served_tokens} tokens for {args.duration_s:g} s ...", flush=True)
                result["served"].append(serve_and_drive(discriminate, args.served_tokens, args.clients,
                                                        args.duration_s, Path(tmp)))
        print(f"{'union':>14} {'req/s':>7} {'p50 s':>6} {'API server ms/request':>22}")
        for run in result["served"]:
            cost = run["api_server_cpu_ms_per_request"]
            print(f"{'discriminated' if run['discriminated'] else 'vLLM':>14} {run['requests_per_s']:>7.1f} "
                  f"{run['p50_s']:>6.3f} {'-' if cost is None else f'{cost:.2f}':>22}")
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
