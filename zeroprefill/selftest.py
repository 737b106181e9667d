"""``zeroprefill selftest``: AsyncEP on N gloo ranks reproduces transformers' own MoE blocks.

The strongest end-to-end check that needs no serving engine: generate (or take) a MoE
checkpoint, run the transformers model on each rank's own prompts to capture every MoE
block's real input and output, then recompute each block with the AsyncEP layer — each rank
storing only its 1/N of the experts and streaming the rest over gloo — and compare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

PROMPTS = [
    "Rerank these documents by how well they answer the question.",
    "Classify the sentiment of this review as positive, negative or neutral.",
    "Is the following statement true or false? Answer yes or no.",
    "Query: what is the capital of France? Document: Paris is the capital of France.",
    "Embeddings map text to vectors so that similar texts are close together.",
]

# Architectures whose MoE block output is exactly the routed experts (no shared expert).
_COMPARABLE = ("qwen3_moe", "mixtral")


def _moe_block_io(model_dir: Path, prompts: list[str]):
    """Inputs ``[T, H]`` and outputs of every MoE block of the transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(layer: int):
        def record(_module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            captured.setdefault(layer, []).append((args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1])))
        return record

    for i, decoder_layer in enumerate(model.model.layers):
        block = getattr(decoder_layer, "mlp", None) or getattr(decoder_layer, "block_sparse_moe")
        block.register_forward_hook(hook(i))
    with torch.no_grad():
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    return {layer: (torch.cat([x for x, _ in io]), torch.cat([y for _, y in io])) for layer, io in captured.items()}


def _rank_main(rank: int, world_size: int, init_file: str, model_dir: str, results) -> None:
    import torch
    import torch.distributed as dist

    from zeroprefill.common.asyncep_model import AsyncEPConfig, build_asyncep_model
    from zeroprefill.common.checkpoint import ExpertCheckpoint
    from zeroprefill.common.expert_sharding import ExpertShardLayout
    from zeroprefill.common.model_spec import MoEModelSpec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        spec = MoEModelSpec.from_pretrained(model_dir)
        checkpoint = ExpertCheckpoint(model_dir)
        layout = ExpertShardLayout(spec.num_experts, world_size)
        layers = [checkpoint.moe_layer(spec, i) for i in spec.moe_layer_indices]
        shards = [layout.shard_all({"w13": t["w13"], "w2": t["w2"]}, rank) for t in layers]
        asyncep = build_asyncep_model(shards, layout, AsyncEPConfig(transport="gloo"), top_k=spec.top_k,
                                      renormalize=spec.renormalize_topk, scoring_func=spec.scoring_func)
        moe = asyncep.layers
        my_prompts = PROMPTS[rank::world_size]  # uneven token counts across ranks
        io = _moe_block_io(Path(model_dir), my_prompts)
        worst = 0.0
        tokens = 0
        for k, layer_index in enumerate(spec.moe_layer_indices):
            x, want = io[layer_index]
            logits = x @ layers[k]["router"].t()
            got = moe[k](x, logits)
            worst = max(worst, (got - want).abs().max().item() if x.shape[0] else 0.0)
            tokens = x.shape[0]
        asyncep.close()
        results.put((rank, len(my_prompts), tokens, worst, layout.experts_of_rank(rank)))
    finally:
        dist.destroy_process_group()


def run_selftest(model_dir: Path, world_size: int, tolerance: float = 1e-4) -> bool:
    import torch.multiprocessing as mp

    from zeroprefill.common.model_spec import MoEModelSpec

    spec = MoEModelSpec.from_pretrained(model_dir)
    if spec.architecture not in _COMPARABLE:
        raise SystemExit(f"selftest compares against transformers' MoE block: use one of {_COMPARABLE}, not {spec.architecture}")
    print(f"AsyncEP selftest: {spec.architecture}, {spec.num_experts} experts top-{spec.top_k}, "
          f"{spec.num_moe_layers} MoE layers, {world_size} gloo ranks")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(_rank_main, args=(world_size, init_file, str(model_dir), results), nprocs=world_size, start_method="spawn")
    ok = True
    for rank, prompts, tokens, worst, experts in sorted(results.get() for _ in range(world_size)):
        status = "MATCH" if worst <= tolerance else "MISMATCH"
        ok &= worst <= tolerance
        print(f"  rank {rank}: stores experts {list(experts)}, {prompts} prompts / {tokens} tokens, "
              f"max |asyncep - transformers| = {worst:.2e}  {status}")
    print("AsyncEP output matches the transformers reference on every rank." if ok else "AsyncEP output DIFFERS from the reference.")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="MoE checkpoint directory (default: generate the tiny Qwen3-MoE)")
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks to shard the experts over (default 2)")


def run(args: argparse.Namespace) -> int:
    from zeroprefill.common.checkpoint import CheckpointError, ExpertCheckpoint
    from zeroprefill.common.model_spec import ModelSpecError, MoEModelSpec
    from zeroprefill.tiny_model import default_tiny_model

    if args.ranks < 1:
        print(f"zeroprefill selftest: --ranks must be >= 1, got {args.ranks}")
        return 2
    model_dir = Path(args.model) if args.model else default_tiny_model()
    try:
        spec = MoEModelSpec.from_pretrained(model_dir)
        ExpertCheckpoint(model_dir).moe_layer(spec, spec.moe_layer_indices[0])
    except (ModelSpecError, CheckpointError) as exc:
        print(f"zeroprefill selftest: {exc}")
        return 2
    return 0 if run_selftest(model_dir, args.ranks) else 1
