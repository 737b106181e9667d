"""One typed description of a Mixture-of-Experts transformer, read from its HF ``config.json``.

Everything downstream — expert sharding, gather-buffer sizing, the true-FLOPs cost model,
the saturation threshold, the memory planner — needs the same handful of shapes. This
module turns the config dialects of the MoE families we serve into one :class:`MoEModelSpec`:

======================  =====================  ==================  ========================
family (model_type)     experts / top-k        expert FFN          shared experts, dense
======================  =====================  ==================  ========================
qwen3_moe               num_experts [1]_       moe_intermediate    none; mlp_only_layers
qwen2_moe               num_experts [1]_       moe_intermediate    shared_expert_intermediate
mixtral                 num_local_experts      intermediate_size   none; every layer MoE
deepseek_v2/v3          n_routed_experts       moe_intermediate    n_shared_experts, MLA,
                                                                   first_k_dense_replace
======================  =====================  ==================  ========================

.. [1] transformers >= 5 writes ``num_local_experts`` for the Qwen MoE families; both read.

Parameter counts are exact for the weights that exist in these checkpoints (norm vectors
included); a missing field raises :class:`ModelSpecError` naming it, never a ``KeyError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Bytes per element of the weight formats we stream.
BYTES_PER_ELEMENT: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}

#: FP8 weights carry one fp32 scale per 128x128 block (Qwen3-FP8 / DeepSeek-V3 layout).
FP8_WEIGHT_BLOCK = 128


class ModelSpecError(ValueError):
    """The config cannot be described: unknown architecture or a missing/invalid field."""


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes of one attention block. ``kind`` is ``"gqa"`` (MHA/GQA/MQA) or ``"mla"``."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key head dim (for MLA: nope + rope)
    v_head_dim: int
    q_lora_rank: int = 0  # MLA only (0: queries projected directly)
    kv_lora_rank: int = 0  # MLA only
    qk_rope_head_dim: int = 0  # MLA only
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections

    def params(self, hidden_size: int) -> int:
        """Weights of the attention projections (and their norms) of one layer."""
        h = hidden_size
        if self.kind == "gqa":
            q = h * self.num_heads * self.head_dim
            kv = 2 * h * self.num_kv_heads * self.head_dim
            o = self.num_heads * self.v_head_dim * h
            norms = 2 * self.head_dim if self.qk_norm else 0
            bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
            return q + kv + o + norms + bias
        # MLA (DeepSeek-V2/V3): low-rank q (optional) and a shared compressed kv.
        nope = self.head_dim - self.qk_rope_head_dim
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.num_heads * self.head_dim
        else:
            q = h * self.num_heads * self.head_dim
        kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_up = self.kv_lora_rank * self.num_heads * (nope + self.v_head_dim)
        o = self.num_heads * self.v_head_dim * h
        return q + kv_down + kv_up + o

    @property
    def flops_per_query_key_pair(self) -> int:
        """FLOPs of one (query, key) pair in one layer: ``q·k`` plus ``p·v`` over all heads."""
        return 2 * self.num_heads * (self.head_dim + self.v_head_dim)


@dataclass(frozen=True)
class MoEModelSpec:
    """Shapes of a decoder-only MoE model, in the terms the AsyncEP core uses.

    Expert weights follow vLLM's fused layout: ``w13`` is ``[E, 2*I, H]`` (gate rows then
    up rows) and ``w2`` is ``[E, H, I]``, so one expert holds ``3 * H * I`` weights.
    """

    architecture: str
    num_layers: int
    moe_layer_indices: tuple[int, ...]
    hidden_size: int
    vocab_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize_topk: bool
    scoring_func: str  # "softmax" or "sigmoid"
    shared_expert_intermediate_size: int  # total over shared experts, 0 if none
    dense_intermediate_size: int  # FFN of the non-MoE layers, 0 if every layer is MoE
    attention: AttentionSpec
    tie_word_embeddings: bool
    max_position_embeddings: int

    # -- derived shapes -------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_params_per_layer(self) -> int:
        """Weights of all routed experts of one MoE layer: what AsyncEP streams per layer."""
        return self.num_experts * self.expert_params

    def expert_bytes_per_layer(self, dtype: str = "bf16") -> int:
        """Bytes of one MoE layer's routed experts in ``dtype`` (FP8 includes block scales)."""
        if dtype not in BYTES_PER_ELEMENT:
            raise ModelSpecError(
                f"unknown weight dtype {dtype!r}; choose one of {sorted(BYTES_PER_ELEMENT)}"
            )
        weights = self.expert_params_per_layer * BYTES_PER_ELEMENT[dtype]
        if dtype == "fp8":
            h, i, b = self.hidden_size, self.expert_intermediate_size, FP8_WEIGHT_BLOCK
            blocks_w13 = -(-2 * i // b) * -(-h // b)
            blocks_w2 = -(-h // b) * -(-i // b)
            weights += self.num_experts * (blocks_w13 + blocks_w2) * 4
        return int(weights)

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def shared_expert_params_per_layer(self) -> int:
        if not self.shared_expert_intermediate_size:
            return 0
        # Qwen2-MoE also gates the shared expert with a [1, H] projection; DeepSeek does not.
        gate = self.hidden_size if self.architecture == "qwen2_moe" else 0
        return 3 * self.hidden_size * self.shared_expert_intermediate_size + gate

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def attention_params_per_layer(self) -> int:
        return self.attention.params(self.hidden_size)

    @property
    def embedding_params(self) -> int:
        tied = 1 if self.tie_word_embeddings else 2
        return tied * self.vocab_size * self.hidden_size

    @property
    def dense_params(self) -> int:
        """Every weight except routed experts: what each data-parallel rank replicates."""
        per_layer_norms = 2 * self.hidden_size
        moe_layer = self.router_params_per_layer + self.shared_expert_params_per_layer
        return (
            self.embedding_params
            + self.hidden_size  # final norm
            + self.num_layers * (self.attention_params_per_layer + per_layer_norms)
            + self.num_moe_layers * moe_layer
            + self.num_dense_layers * self.dense_mlp_params
        )

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_moe_layers * self.expert_params_per_layer

    @property
    def active_params_per_token(self) -> int:
        """Weights one token multiplies through (top-k experts, not all), LM head included."""
        return self.dense_params + self.num_moe_layers * self.top_k * self.expert_params

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> MoEModelSpec:
        """Read a model directory (or a ``config.json`` path) into a spec."""
        return cls.from_hf_config(read_hf_config(path))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> MoEModelSpec:
        """Build a spec from an HF config dict (``config.to_dict()`` or parsed JSON)."""
        if not isinstance(config, Mapping):
            raise ModelSpecError(f"expected a config mapping, got {type(config).__name__}")
        # Multimodal wrappers (e.g. Qwen3-VL-MoE) nest the language model's config.
        if "text_config" in config and "num_hidden_layers" not in config:
            config = config["text_config"]
        model_type = config.get("model_type")
        reader = _READERS.get(str(model_type))
        if reader is None:
            raise ModelSpecError(
                f"unsupported architecture model_type={model_type!r}; supported: "
                f"{', '.join(sorted(_READERS))}"
            )
        spec = reader(_Fields(config, str(model_type)))
        spec._validate()
        return spec

    def _validate(self) -> None:
        if self.top_k > self.num_experts:
            raise ModelSpecError(
                f"{self.architecture}: top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )
        for name in ("num_layers", "hidden_size", "num_experts", "top_k", "expert_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ModelSpecError(f"{self.architecture}: {name} must be positive, got {getattr(self, name)}")
        if not self.moe_layer_indices:
            raise ModelSpecError(f"{self.architecture}: the config describes no MoE layer")


class _Fields:
    """Typed access to config fields with errors that name the missing one."""

    def __init__(self, config: Mapping[str, Any], model_type: str) -> None:
        self._config = config
        self.model_type = model_type

    def int(self, *names: str, default: int | None = None) -> int:
        for name in names:
            value = self._config.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                    raise ModelSpecError(f"{self.model_type}: field {name!r} must be an integer, got {value!r}")
                return int(value)
        if default is not None:
            return default
        raise ModelSpecError(
            f"{self.model_type} config is missing required field {' or '.join(repr(n) for n in names)}"
        )

    def bool(self, name: str, default: bool) -> bool:
        return bool(self._config.get(name, default))

    def str(self, name: str, default: str) -> str:
        return str(self._config.get(name, default))

    def list(self, name: str) -> list[int]:
        return [int(v) for v in (self._config.get(name) or [])]


def _gqa(f: _Fields, qk_norm: bool, qkv_bias: bool) -> AttentionSpec:
    heads = f.int("num_attention_heads")
    hidden = f.int("hidden_size")
    head_dim = f.int("head_dim", default=hidden // heads)
    return AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", default=heads),
        head_dim=head_dim,
        v_head_dim=head_dim,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
    )


def _sparse_step_layers(f: _Fields, num_layers: int) -> tuple[int, ...]:
    """Qwen2/Qwen3-MoE: MoE where ``(i + 1) % decoder_sparse_step == 0`` and not mlp-only."""
    step = f.int("decoder_sparse_step", default=1)
    mlp_only = set(f.list("mlp_only_layers"))
    if step <= 0:
        raise ModelSpecError(f"{f.model_type}: decoder_sparse_step must be positive, got {step}")
    return tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)


def _common(f: _Fields) -> dict[str, Any]:
    return {
        "architecture": f.model_type,
        "num_layers": f.int("num_hidden_layers"),
        "hidden_size": f.int("hidden_size"),
        "vocab_size": f.int("vocab_size"),
        "tie_word_embeddings": f.bool("tie_word_embeddings", False),
        "max_position_embeddings": f.int("max_position_embeddings", default=4096),
    }


def _read_qwen_moe(f: _Fields) -> MoEModelSpec:
    base = _common(f)
    qwen3 = f.model_type == "qwen3_moe"
    layers = _sparse_step_layers(f, base["num_layers"])
    return MoEModelSpec(
        **base,
        moe_layer_indices=layers,
        num_experts=f.int("num_experts", "num_local_experts"),
        top_k=f.int("num_experts_per_tok"),
        expert_intermediate_size=f.int("moe_intermediate_size"),
        renormalize_topk=f.bool("norm_topk_prob", qwen3),
        scoring_func="softmax",
        shared_expert_intermediate_size=0 if qwen3 else f.int("shared_expert_intermediate_size", default=0),
        dense_intermediate_size=f.int("intermediate_size", default=0) if len(layers) < base["num_layers"] else 0,
        attention=_gqa(f, qk_norm=qwen3, qkv_bias=not qwen3 or f.bool("attention_bias", False)),
    )


def _read_mixtral(f: _Fields) -> MoEModelSpec:
    base = _common(f)
    return MoEModelSpec(
        **base,
        moe_layer_indices=tuple(range(base["num_layers"])),
        num_experts=f.int("num_local_experts", "num_experts"),
        top_k=f.int("num_experts_per_tok"),
        expert_intermediate_size=f.int("intermediate_size"),
        renormalize_topk=True,  # softmax over the selected logits == renormalised top-k
        scoring_func="softmax",
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,
        attention=_gqa(f, qk_norm=False, qkv_bias=False),
    )


def _read_deepseek(f: _Fields) -> MoEModelSpec:
    base = _common(f)
    first_dense = f.int("first_k_dense_replace", default=0)
    freq = f.int("moe_layer_freq", default=1)
    layers = tuple(i for i in range(base["num_layers"]) if i >= first_dense and i % freq == 0)
    expert_ffn = f.int("moe_intermediate_size")
    nope = f.int("qk_nope_head_dim")
    rope = f.int("qk_rope_head_dim")
    heads = f.int("num_attention_heads")
    attention = AttentionSpec(
        kind="mla",
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope + rope,
        v_head_dim=f.int("v_head_dim"),
        q_lora_rank=f.int("q_lora_rank", default=0),
        kv_lora_rank=f.int("kv_lora_rank"),
        qk_rope_head_dim=rope,
    )
    v3 = f.model_type == "deepseek_v3"
    return MoEModelSpec(
        **base,
        moe_layer_indices=layers,
        num_experts=f.int("n_routed_experts"),
        top_k=f.int("num_experts_per_tok"),
        expert_intermediate_size=expert_ffn,
        renormalize_topk=f.bool("norm_topk_prob", v3),
        scoring_func=f.str("scoring_func", "sigmoid" if v3 else "softmax"),
        shared_expert_intermediate_size=f.int("n_shared_experts", default=0) * expert_ffn,
        dense_intermediate_size=f.int("intermediate_size") if len(layers) < base["num_layers"] else 0,
        attention=attention,
    )


_READERS = {
    "qwen3_moe": _read_qwen_moe,
    "qwen2_moe": _read_qwen_moe,
    "mixtral": _read_mixtral,
    "deepseek_v2": _read_deepseek,
    "deepseek_v3": _read_deepseek,
}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """A model directory's (or a ``config.json`` path's) config, with a clear error if absent."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ModelSpecError(f"no config.json at {str(path)!r}: pass a model directory or a config.json file")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{config_path.name} is not valid JSON: {exc}") from exc


def stored_weight_dtype(config: Mapping[str, Any]) -> str | None:
    """``"fp8"`` for a block-FP8 checkpoint (``quant_method`` fp8 with ``weight_block_size``),
    else None: what the checkpoint stores, as the planner names formats."""
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") == "fp8" and quantization.get("weight_block_size"):
        return "fp8"
    return None
