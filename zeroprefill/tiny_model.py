"""Generate a tiny, real-format MoE checkpoint for tests and the demo (nothing is downloaded).

The checkpoint is what a hub model directory holds — ``config.json``, ``model.safetensors``
and a tokenizer saved with ``save_pretrained`` — so vLLM, SGLang and transformers load it
through their ordinary code paths. Weights are random (seeded); the byte-level BPE tokenizer
is trained here with ``tokenizers`` on a small built-in corpus.

    zeroprefill tiny-model OUT_DIR [--arch qwen3_moe] [--experts 8] [--top-k 2] ... [--block-fp8]

``--block-fp8`` (Qwen3-MoE) then rewrites the checkpoint in the format Qwen3-*-FP8 ships:
every decoder-layer projection (attention, router, experts) in e4m3 with 128x128
``weight_scale_inv`` block scales, embeddings, norms and the LM head in bf16, and vLLM's
``fp8`` ``quantization_config`` (:func:`quantize_checkpoint_block_fp8`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts out of many.",
    "Prefill-only requests are scored in one forward pass: no decode, no sampling.",
    "Rerank these documents by how well they answer the question.",
    "Classify the sentiment of this review as positive, negative or neutral.",
    "Is the following statement true or false? Answer yes or no.",
    "Expert weights are gathered asynchronously while the previous layer computes.",
    "A prefix-cache hit removes compute but not tokens from a request.",
    "Query: what is the capital of France? Document: Paris is the capital of France.",
    "Embeddings map text to vectors so that similar texts are close together.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" @ # $ % & _",
]


@dataclass(frozen=True)
class TinyMoEConfig:
    """Shapes of the generated model. Defaults load in seconds on a 2-core CPU."""

    architecture: str = "qwen3_moe"
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 2
    hidden_size: int = 128
    expert_intermediate_size: int = 64
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    vocab_size: int = 512
    max_position_embeddings: int = 512
    shared_expert_intermediate_size: int = 128  # qwen2_moe only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` contents for this architecture."""
        common: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "dtype": "float32",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "num_experts_per_tok": self.top_k,
            "initializer_range": 0.02,
        }
        if self.architecture == "qwen3_moe":
            return common | {
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "head_dim": self.head_dim,
                "num_experts": self.num_experts,
                "moe_intermediate_size": self.expert_intermediate_size,
                "intermediate_size": 2 * self.expert_intermediate_size,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "norm_topk_prob": True,
                "attention_bias": False,
            }
        if self.architecture == "qwen2_moe":
            if self.head_dim * self.num_attention_heads != self.hidden_size:
                raise ValueError(
                    "qwen2_moe has no head_dim field: need head_dim * num_attention_heads == hidden_size"
                )
            return common | {
                "architectures": ["Qwen2MoeForCausalLM"],
                "model_type": "qwen2_moe",
                "num_experts": self.num_experts,
                "moe_intermediate_size": self.expert_intermediate_size,
                "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
                "intermediate_size": 2 * self.expert_intermediate_size,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "norm_topk_prob": False,
            }
        return common | {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "intermediate_size": self.expert_intermediate_size,
        }


def train_tokenizer(vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on the built-in corpus and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
        model_max_length=1 << 20,
    )
    fast.save_pretrained(out_dir)


@contextmanager
def no_transformers_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off (writing and loading a tiny model is instant)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def generate_tiny_moe(out_dir: str | Path, config: TinyMoEConfig | None = None) -> Path:
    """Write a random-weight MoE checkpoint with a trained tokenizer to ``out_dir``.

    Deterministic for a given config (seeded). Returns the directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or TinyMoEConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(config.vocab_size, out)

    hf_config = AutoConfig.for_model(**config.hf_config())
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        # HF initialises norms to one and biases to zero; give every weight a random, non-trivial
        # value so that a wrong expert or a missed renormalisation changes the outputs.
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5)
    with no_transformers_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    (out / "zeroprefill_tiny_model.json").write_text(json.dumps(asdict(config), indent=2))
    return out


def write_dummy_checkpoint(model_config: str | Path, out_dir: str | Path, vocab_size: int = 512) -> Path:
    """A model directory for vLLM's ``--load-format dummy``: a real model's ``config.json``
    (e.g. one of ``common/model_configs``) and a tokenizer trained here, whose token ids are
    all below ``vocab_size`` (no weights: vLLM fills them with random values)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(Path(model_config).read_text())
    train_tokenizer(vocab_size, out)
    return out


#: ``config.json``'s ``quantization_config`` of a block-FP8 checkpoint, as Qwen3-*-FP8 ship it.
BLOCK_FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def quantize_checkpoint_block_fp8(model_dir: str | Path, experts_only: bool = False) -> Path:
    """Rewrite a generated Qwen3-MoE checkpoint in ``model_dir`` as block FP8, in place.

    Every 2-D weight of a decoder layer (q/k/v/o projections, the router gate, each expert's
    gate/up/down projections) becomes e4m3 plus a float32 ``<name>_scale_inv`` of 128x128
    blocks; the rest is stored in bf16, and ``config.json`` gets
    :data:`BLOCK_FP8_QUANTIZATION_CONFIG`. vLLM needs the projections' output sizes to be
    multiples of 128 (the expert intermediate size, the k/v heads' width).

    ``experts_only``: only the routed experts become FP8; the attention projections and the
    router stay bf16 and are listed in ``modules_to_not_convert`` (vLLM's CPU build runs FP8
    linear layers only on CPUs with AMX, so a CPU test serves FP8 experts this way).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from zeroprefill.common.block_fp8 import quantize_block_fp8

    out = Path(model_dir)
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type") != "qwen3_moe":
        raise ValueError(f"block-FP8 tiny checkpoints are Qwen3-MoE ones; {out} is {hf_config.get('model_type')!r}")
    block = BLOCK_FP8_QUANTIZATION_CONFIG["weight_block_size"][0]
    widths = {"moe_intermediate_size": hf_config["moe_intermediate_size"]}
    if not experts_only:
        widths["k/v width (num_key_value_heads * head_dim)"] = hf_config["num_key_value_heads"] * hf_config["head_dim"]
    for what, width in widths.items():
        if width % block:
            raise ValueError(f"block FP8 needs a {what} that is a multiple of {block}, got {width}")
    weights_path = out / "model.safetensors"
    quantized: dict[str, torch.Tensor] = {}
    not_converted: list[str] = []
    for name, tensor in load_file(str(weights_path)).items():
        projection = name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
        if projection and experts_only and ".mlp.experts." not in name:
            not_converted.append(name.removesuffix(".weight"))
            projection = False
        if projection:
            quantized[name], quantized[name + "_scale_inv"] = quantize_block_fp8(tensor, block)
        else:
            quantized[name] = tensor.to(torch.bfloat16)
    save_file(quantized, str(weights_path), metadata={"format": "pt"})
    quantization_config = dict(BLOCK_FP8_QUANTIZATION_CONFIG)
    if not_converted:
        quantization_config["modules_to_not_convert"] = sorted(not_converted)
    hf_config.update(dtype="bfloat16", quantization_config=quantization_config)
    config_path.write_text(json.dumps(hf_config, indent=2))
    return out


DEFAULT_TINY_MODEL_DIR = Path(".work") / "tiny-qwen3-moe"


def default_tiny_model() -> Path:
    """The demo's checkpoint (default config) in ``.work/``, generated on first use."""
    if not (DEFAULT_TINY_MODEL_DIR / "config.json").is_file():
        print(f"generating the tiny Qwen3-MoE checkpoint in {DEFAULT_TINY_MODEL_DIR} ...", flush=True)
        generate_tiny_moe(DEFAULT_TINY_MODEL_DIR, TinyMoEConfig())
    return DEFAULT_TINY_MODEL_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TinyMoEConfig()
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--arch", dest="architecture", choices=ARCHITECTURES, default=defaults.architecture)
    for name in ("num_experts", "top_k", "num_layers", "hidden_size", "expert_intermediate_size",
                 "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--block-fp8", action="store_true",
                        help="store the decoder layers in block FP8 (128x128 scales), as Qwen3-*-FP8 ship")


def run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in TinyMoEConfig.__dataclass_fields__}
    try:
        config = TinyMoEConfig(**fields)
        path = generate_tiny_moe(args.out_dir, config)
        if args.block_fp8:
            quantize_checkpoint_block_fp8(path)
    except ValueError as exc:
        print(f"zeroprefill tiny-model: {exc}")
        return 2
    weights = "block FP8" if args.block_fp8 else "float32"
    print(f"wrote {config.architecture} ({config.num_experts} experts, top-{config.top_k}, "
          f"{config.num_layers} layers, hidden {config.hidden_size}, {weights}) to {path}")
    return 0
