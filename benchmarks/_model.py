"""One Qwen3-MoE decoder layer in plain torch, its weights, and the packed requests it runs.

Prefill only, over a batch of packed requests of mixed lengths::

    h [T, H] -> RMSNorm -> qkv proj -> q/k RMSNorm -> RoPE -> causal SDPA per request
             -> o proj -> + h -> RMSNorm -> router (+ routing bias) -> MoE -> + h

Attention runs one ``scaled_dot_product_attention(is_causal=True)`` call per run of
same-length requests (requests are packed sorted by length, so such a run is one
``[count, heads, length, head_dim]`` batch): a request's tokens attend only within the
request, no padding, no mask; on CUDA the flash backend is forced. A micro-batch that
starts inside a request attends that request's earlier tokens through their keys and values
(bottom-right-aligned causal mask), as a prefill chunk reads its prefix from the KV cache.

Also here: the model by name (:func:`load_model`: ``tiny`` or a shipped config), random
weights from seeds (bf16, and FP8 with 128x128 block scales), the experts kernel for a
device, and the routing-bias models of ``e2e_prefill.py`` (balanced, skewed). The layouts
that run this layer on N ranks are in ``_layouts.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from zeroprefill.common.asyncep_moe import experts_reference
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.routing_skew import popularity_biases

CONFIGS = Path(__file__).resolve().parent.parent / "common" / "model_configs"
#: A CPU-sized Qwen3-MoE (gloo runs and tests): FP8 blocks of 128 divide I / 2 ranks.
TINY_CONFIG = {
    "model_type": "qwen3_moe", "hidden_size": 128, "moe_intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "vocab_size": 512, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
}
#: Logit added to the experts a token must pick in the balanced regime (dominates N(0, 1)).
BALANCED_LOGIT_BOOST = 20.0

ExpertsKernel = Callable[..., torch.Tensor]


def load_model(name: str) -> tuple[MoEModelSpec, dict]:
    """``tiny`` or a shipped config's name (``qwen3-235b-a22b``): its spec and HF config."""
    if name == "tiny":
        config = dict(TINY_CONFIG)
    else:
        path = CONFIGS / f"{name}.json"
        if not path.is_file():
            known = ", ".join(["tiny", *sorted(p.stem for p in CONFIGS.glob("*.json"))])
            raise SystemExit(f"error: unknown model {name!r}; choose from {known}")
        config = json.loads(path.read_text())
    return MoEModelSpec.from_hf_config(config), config


# -- shapes and weights --------------------------------------------------------------------
@dataclass(frozen=True)
class StackConfig:
    """Shapes of one Qwen3-MoE decoder layer (what the stack needs from the model config)."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    intermediate: int
    renormalize: bool
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def from_config(cls, spec: MoEModelSpec, hf_config: dict) -> StackConfig:
        if spec.architecture != "qwen3_moe" or spec.attention.kind != "gqa":
            raise ValueError(
                f"the benchmark stack models Qwen3-MoE layers (GQA, q/k norm, no shared experts); "
                f"got architecture {spec.architecture!r}"
            )
        attention = spec.attention
        return cls(
            hidden=spec.hidden_size,
            num_heads=attention.num_heads,
            num_kv_heads=attention.num_kv_heads,
            head_dim=attention.head_dim,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            intermediate=spec.expert_intermediate_size,
            renormalize=spec.renormalize_topk,
            rope_theta=float(hf_config.get("rope_theta", 1e6)),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        )


def dense_weights(cfg: StackConfig, num_layers: int, seed: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Per layer: norms, fused qkv ``[(Hq + 2 Hkv) D, H]``, o ``[H, Hq D]``, q/k norms, router."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, h = cfg.head_dim, cfg.hidden
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

    def randn(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen) * fan_in**-0.5

    return [
        {
            "input_norm": torch.ones(h, device=device, dtype=torch.bfloat16),
            "qkv": randn(qkv_rows, h, fan_in=h),
            "q_norm": torch.ones(d, device=device, dtype=torch.bfloat16),
            "k_norm": torch.ones(d, device=device, dtype=torch.bfloat16),
            "o": randn(h, cfg.num_heads * d, fan_in=cfg.num_heads * d),
            "post_norm": torch.ones(h, device=device, dtype=torch.bfloat16),
            "router": randn(cfg.num_experts, h, fan_in=h),
        }
        for _ in range(num_layers)
    ]


def expert_weights_bf16(cfg: StackConfig, layer: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One layer's full experts in vLLM layout: w13 ``[E, 2I, H]``, w2 ``[E, H, I]`` (bf16)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + layer)
    e, i, h = cfg.num_experts, cfg.intermediate, cfg.hidden
    return {
        "w13": torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16, generator=gen) * h**-0.5,
        "w2": torch.randn(e, h, i, device=device, dtype=torch.bfloat16, generator=gen) * i**-0.5,
    }


def quantize_experts_fp8(experts: dict[str, torch.Tensor], chunk_experts: int = 16) -> dict[str, torch.Tensor]:
    """bf16 experts -> e4m3 weights with 128x128 block scales (``zeroprefill.kernels`` format)."""
    from zeroprefill.kernels import quantize_weights_fp8_block

    out: dict[str, torch.Tensor] = {}
    for name in ("w13", "w2"):
        full = experts[name]
        parts = [quantize_weights_fp8_block(full[s : s + chunk_experts]) for s in range(0, full.shape[0], chunk_experts)]
        out[name] = torch.cat([p[0] for p in parts])
        out[f"{name}_scale"] = torch.cat([p[1] for p in parts])
    return out


def experts_kernel_for(device: torch.device, fp8: bool) -> ExpertsKernel:
    """``zeroprefill.kernels.fused_experts`` on CUDA; the plain-torch references on CPU."""
    if device.type == "cuda":
        from zeroprefill.kernels import fused_experts

        return fused_experts
    if fp8:
        from zeroprefill.kernels import fused_experts_reference

        return fused_experts_reference
    return experts_reference


# -- packed requests -----------------------------------------------------------------------
def mixed_request_lengths(tokens: int, context: int, seed: int) -> list[int]:
    """Request lengths that fill exactly ``tokens``: drawn from ``{C/2, 3C/4, C, 5C/4, 3C/2}``
    (mean ``C`` = ``context``), the last one cut to fit, sorted ascending."""
    if tokens < context:
        raise ValueError(f"tokens={tokens} < context={context}: a batch needs at least one whole request")
    choices = [max(1, context * f // 4) for f in (2, 3, 4, 5, 6)]
    gen = torch.Generator().manual_seed(seed)
    lengths, filled = [], 0
    while filled < tokens:
        length = min(choices[int(torch.randint(len(choices), (1,), generator=gen))], tokens - filled)
        lengths.append(length)
        filled += length
    return sorted(lengths)


@dataclass
class PackedBatch:
    """A rank's tokens: requests packed back to back (sorted by length), RoPE tables, bias.

    ``router_bias`` is added to the router logits of every layer: ``[T, E]`` (balanced
    regime) or ``[layers, E]`` (skewed regime: row ``l`` for layer ``l``), or ``None``.
    ``continued_tokens`` > 0 marks a micro-batch that starts inside a request: its first
    request's first ``continued_tokens`` tokens lie in the previous micro-batch, so its
    positions start there and its queries also attend those tokens (their keys and values
    are handed over by the caller, see :func:`causal_attention`).
    """

    hidden: torch.Tensor
    lengths: tuple[int, ...]
    router_bias: torch.Tensor | None
    bias_per_layer: bool
    continued_tokens: int = 0
    cos: torch.Tensor | None = field(init=False, default=None)  # [T, 1, D] after set_rope
    sin: torch.Tensor | None = field(init=False, default=None)
    groups: tuple[tuple[int, int, int], ...] = field(init=False)  # (first token, count, length)

    def __post_init__(self) -> None:
        if sum(self.lengths) != self.hidden.shape[0]:
            raise ValueError(f"request lengths sum to {sum(self.lengths)}, hidden has {self.hidden.shape[0]} tokens")
        if self.continued_tokens and not self.lengths:
            raise ValueError("a batch with continued_tokens needs a first request to continue")
        groups, start = [], 0
        for index, length in enumerate(self.lengths):
            after_continued = index == 1 and self.continued_tokens > 0  # the continued request stays alone
            if groups and groups[-1][2] == length and not after_continued:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1, length)
            else:
                groups.append((start, 1, length))
            start += length
        self.groups = tuple(groups)

    def set_rope(self, head_dim: int, theta: float) -> None:
        """RoPE tables ``[T, 1, D]`` at each token's position inside its request."""
        device = self.hidden.device
        firsts = [self.continued_tokens if i == 0 else 0 for i in range(len(self.lengths))]
        positions = torch.cat([torch.arange(f, f + n, device=device) for f, n in zip(firsts, self.lengths)]).float() \
            if self.lengths else torch.zeros(0, device=device)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, D]
        self.cos = angles.cos().to(self.hidden.dtype)
        self.sin = angles.sin().to(self.hidden.dtype)

    def bias(self, layer: int) -> torch.Tensor | None:
        if self.router_bias is None:
            return None
        return self.router_bias[layer] if self.bias_per_layer else self.router_bias

    def split_at(self, cut: int) -> tuple[PackedBatch, PackedBatch]:
        """Tokens ``[0, cut)`` and ``[cut, T)``; a request across the cut is split in two.

        The second part's ``continued_tokens`` is then the number of that request's tokens in
        the first part (its last request). RoPE tables, if set, are sliced (positions kept).
        """
        total = self.hidden.shape[0]
        if not 0 < cut < total:
            raise ValueError(f"cut={cut} must lie strictly inside the batch of {total} tokens")
        if self.continued_tokens:
            raise ValueError("only a whole batch is split, not a micro-batch that continues a request")
        index, start = 0, 0
        while start + self.lengths[index] <= cut:
            start += self.lengths[index]
            index += 1
        inside = cut - start  # tokens of request `index` before the cut (0: the cut is a boundary)
        first_lengths = self.lengths[:index] + ((inside,) if inside else ())
        second_lengths = (self.lengths[index] - inside,) + self.lengths[index + 1:]
        parts = []
        for rows, lengths, continued in ((slice(0, cut), first_lengths, 0), (slice(cut, None), second_lengths, inside)):
            bias = self.router_bias
            if bias is not None and not self.bias_per_layer:
                bias = bias[rows]
            part = PackedBatch(self.hidden[rows], lengths, bias, self.bias_per_layer, continued)
            if self.cos is not None:
                part.cos, part.sin = self.cos[rows], self.sin[rows]
            parts.append(part)
        return parts[0], parts[1]

    def split_in_half(self) -> tuple[PackedBatch, PackedBatch]:
        """Two micro-batches of ``T // 2`` and ``T - T // 2`` tokens (SGLang's two-batch split)."""
        return self.split_at(self.hidden.shape[0] // 2)


def balanced_router_bias(first_token: int, tokens: int, cfg: StackConfig, device: torch.device) -> torch.Tensor:
    """``[T, E]`` bias that makes global token ``g`` pick experts ``(g K + j) mod E``, j < K:
    every expert (and so every EP rank) gets exactly the same load when ``T K`` is a multiple
    of ``E`` (EP's best case)."""
    g = torch.arange(first_token, first_token + tokens, device=device)
    ids = (g[:, None] * cfg.top_k + torch.arange(cfg.top_k, device=device)[None, :]) % cfg.num_experts
    bias = torch.zeros(tokens, cfg.num_experts, device=device, dtype=torch.bfloat16)
    bias.scatter_(1, ids, BALANCED_LOGIT_BOOST)
    return bias


def skewed_router_bias(cfg: StackConfig, num_layers: int, target_ratio: float, seed: int,
                       samples: int = 32768) -> tuple[torch.Tensor, list[float]]:
    """Per-layer expert popularity of the skew model (:mod:`zeroprefill.common.routing_skew`):
    top-k routing of N(0, 1) router logits plus the bias has max/mean expert load
    ``target_ratio``. Returns ``([layers, E] float32 on CPU, alpha per layer)``."""
    return popularity_biases(cfg.num_experts, cfg.top_k, num_layers, target_ratio, seed, samples)


# -- one decoder layer's pieces ------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Qwen3/Llama): ``x [T, heads, D]``, ``cos``/``sin`` ``[T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _sdpa_context(device: torch.device):
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


KeyValue = tuple[torch.Tensor, torch.Tensor]


def qkv_projection(x: torch.Tensor, w: dict[str, torch.Tensor], batch: PackedBatch, cfg: StackConfig,
                   num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[T, num_heads, D]``, keys and values ``[T, num_kv_heads, D]`` (q/k RMSNorm, RoPE)."""
    tokens, d = x.shape[0], cfg.head_dim
    qkv = F.linear(x, w["qkv"])
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = apply_rope(rms_norm(q.view(tokens, num_heads, d), w["q_norm"], cfg.rms_norm_eps), batch.cos, batch.sin)
    k = apply_rope(rms_norm(k.view(tokens, num_kv_heads, d), w["k_norm"], cfg.rms_norm_eps), batch.cos, batch.sin)
    return q, k, v.view(tokens, num_kv_heads, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                     prefix_kv: KeyValue | None = None) -> torch.Tensor:
    """Causal attention within each request: ``[T, heads * D]``.

    When ``batch.continued_tokens`` > 0 the first request's queries also attend
    ``prefix_kv`` (the keys and values ``[continued_tokens, kv_heads, D]`` of its tokens in
    the previous micro-batch), through a bottom-right-aligned causal mask.
    """
    tokens, num_heads, d = q.shape
    gqa = num_heads != k.shape[1]
    out = torch.empty_like(q)

    def heads_major(t: torch.Tensor, rows: slice, count: int, length: int) -> torch.Tensor:
        return t[rows].view(count, length, t.shape[1], d).transpose(1, 2)

    groups = batch.groups
    with _sdpa_context(q.device):
        if batch.continued_tokens:
            from torch.nn.attention.bias import causal_lower_right  # imports triton: not at module import

            if prefix_kv is None or prefix_kv[0].shape[0] != batch.continued_tokens:
                raise ValueError(f"the batch continues a request after {batch.continued_tokens} tokens: "
                                 "prefix_kv must hold their keys and values")
            length, known = batch.lengths[0], batch.continued_tokens
            rows, everything = slice(0, length), slice(None)
            keys, values = torch.cat([prefix_kv[0], k[rows]]), torch.cat([prefix_kv[1], v[rows]])
            o = F.scaled_dot_product_attention(
                heads_major(q, rows, 1, length), heads_major(keys, everything, 1, known + length),
                heads_major(values, everything, 1, known + length),
                attn_mask=causal_lower_right(length, known + length), enable_gqa=gqa)
            out[rows] = o.transpose(1, 2).reshape(length, num_heads, d)
            groups = groups[1:]
        for first, count, length in groups:
            rows = slice(first, first + count * length)
            o = F.scaled_dot_product_attention(heads_major(q, rows, count, length), heads_major(k, rows, count, length),
                                               heads_major(v, rows, count, length), is_causal=True, enable_gqa=gqa)
            out[rows] = o.transpose(1, 2).reshape(count * length, num_heads, d)
    return out.view(tokens, num_heads * d)


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], batch: PackedBatch, cfg: StackConfig,
              num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Causal self-attention of ``num_heads`` query heads over each request: ``[T, H]``.

    Without the o-projection's reduction over ranks (tensor parallelism all-reduces it).
    """
    q, k, v = qkv_projection(x, w, batch, cfg, num_heads, num_kv_heads)
    return F.linear(causal_attention(q, k, v, batch), w["o"])


def router_logits(x: torch.Tensor, w: dict[str, torch.Tensor], batch: PackedBatch, layer: int) -> torch.Tensor:
    logits = F.linear(x, w["router"])
    bias = batch.bias(layer)
    return logits if bias is None else logits + bias.to(logits.dtype)


def fp8_supported(device: torch.device) -> tuple[bool, str | None]:
    """Whether ``zeroprefill.kernels`` provides the FP8 experts path here (reason if not)."""
    try:
        import zeroprefill.kernels as kernels  # noqa: F401
    except ImportError as exc:
        return False, f"zeroprefill.kernels is not importable ({exc}); FP8 experts not run"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False, "FP8 (e4m3) needs compute capability >= 8.9"
    return True, None
