"""``zeroprefill demo``: the main job end to end on this machine's CPU.

1. generate the tiny Qwen3-MoE checkpoint (random weights, trained tokenizer) if missing;
2. start a vLLM server with ``--data-parallel-size 2 --enable-expert-parallel --moe-backend
   asyncep`` (each rank stores half of every layer's experts and streams the other half);
3. send real ``/v1/embeddings`` and ``/score`` requests and print the answers;
4. check them against a single-process reference: the same checkpoint in transformers
   (fp32), last-token hidden state after the final norm, L2-normalised — what vLLM's
   ``--convert embed`` computes for this model — and cosine similarity for ``/score``;
5. shut the server down (its whole process group).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DOCUMENTS = [
    "Paris is the capital of France.",
    "Mixture-of-experts models route every token to a few experts out of many.",
    "The quick brown fox jumps over the lazy dog.",
]
QUERY = "Query: what is the capital of France?"
TOLERANCE = 1e-4


def reference_embeddings(model_dir: Path, texts: list[str]) -> list[list[float]]:
    """Single-process transformers reference: normalised last-token final hidden states."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zeroprefill.tiny_model import no_transformers_progress_bars

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with no_transformers_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            hidden = model.model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1]
            out.append(torch.nn.functional.normalize(hidden, dim=0).tolist())
    return out


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def run_demo(model_dir: Path, ranks: int, log_path: Path) -> bool:
    import httpx

    from vllm_zeroprefill.server import ServerStartError, VllmServer, asyncep_args

    args = ["--runner", "pooling", "--convert", "embed", *asyncep_args(ranks)]
    server = VllmServer(model_dir, args, log_path, num_ranks=ranks)
    print(f"starting vLLM with --data-parallel-size {ranks} --enable-expert-parallel --moe-backend asyncep")
    print(f"  server log: {log_path}")
    server.start()
    try:
        last_report = [0.0]

        def progress(elapsed_s: float) -> None:
            if elapsed_s - last_report[0] >= 5.0:
                last_report[0] = elapsed_s
                print(f"  waiting for the server ... {elapsed_s:.0f} s", flush=True)

        started = time.monotonic()
        try:
            server.wait_healthy(timeout_s=600, progress=progress)
        except ServerStartError as exc:
            print(f"zeroprefill demo: {exc}")
            return False
        print(f"server ready at {server.url} after {time.monotonic() - started:.0f} s")

        model = str(model_dir)
        embeddings = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": model, "input": [QUERY, *DOCUMENTS]}, timeout=120
        ).raise_for_status().json()
        vectors = [d["embedding"] for d in embeddings["data"]]
        scores = httpx.post(
            f"{server.url}/score", json={"model": model, "text_1": QUERY, "text_2": DOCUMENTS}, timeout=120
        ).raise_for_status().json()
        served_scores = [d["score"] for d in scores["data"]]
    finally:
        server.stop()
        print("server stopped")
    for line in log_path.read_text(errors="replace").splitlines():
        if "AsyncEP: streaming" in line:  # one line per rank: what it stores, what it streams
            print("  " + line.split("] ", 1)[-1])

    print("\n/v1/embeddings (first 4 of", len(vectors[0]), "dims):")
    for text, vector in zip([QUERY, *DOCUMENTS], vectors):
        print(f"  {text[:60]:<60} [{', '.join(f'{x:+.4f}' for x in vector[:4])}, ...]")
    print(f"\n/score  query: {QUERY!r}")
    for text, score in zip(DOCUMENTS, served_scores):
        print(f"  {score:+.5f}  {text}")

    print("\nreference: transformers, one process, all experts resident (fp32)")
    reference = reference_embeddings(model_dir, [QUERY, *DOCUMENTS])
    embed_diff = max(max_abs_diff(v, r) for v, r in zip(vectors, reference))
    reference_scores = [cosine(reference[0], r) for r in reference[1:]]
    score_diff = max(abs(s - r) for s, r in zip(served_scores, reference_scores))
    ok = embed_diff <= TOLERANCE and score_diff <= TOLERANCE
    print(f"  max |embedding - reference| = {embed_diff:.2e}")
    print(f"  max |score - reference|     = {score_diff:.2e}")
    print(f"  {'MATCH' if ok else 'MISMATCH'} (tolerance {TOLERANCE:g})")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="MoE checkpoint directory (default: generate .work/tiny-qwen3-moe)")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel AsyncEP ranks (default 2)")


def run(args: argparse.Namespace) -> int:
    from zeroprefill.tiny_model import default_tiny_model

    if args.ranks < 1:
        print(f"zeroprefill demo: --ranks must be >= 1, got {args.ranks}")
        return 2
    if args.model:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            print(f"zeroprefill demo: {model_dir} has no config.json; pass a checkpoint directory")
            return 2
    else:
        model_dir = default_tiny_model()
    log_path = Path(".work") / "demo-server.log"
    return 0 if run_demo(model_dir.resolve(), args.ranks, log_path) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
