"""Parallel layouts of a Qwen3-MoE layer stack, shared by the prefill benchmarks.

One decoder layer, prefill only, over a batch of packed requests of mixed lengths::

    h [T, H] -> RMSNorm -> qkv proj -> q/k RMSNorm -> RoPE -> causal SDPA per request
             -> o proj -> + h -> RMSNorm -> router (+ routing bias) -> MoE -> + h

and the ways to run it on N ranks (each class is one layout):

- :class:`LocalStack` ("dp"): every weight resident, each rank its own requests, no
  communication. Plain data parallelism; also the no-communication reference every other
  layout's *exposed communication* is measured against.
- :class:`AsyncEPStack` ("asyncep"): attention data-parallel, each rank stores 1/N of the
  experts, :class:`~zeroprefill.common.streamer.ExpertWeightStreamer` gathers layer l+d while
  layer l computes, :class:`~zeroprefill.common.asyncep_moe.AsyncEPMoE` runs all experts on
  the rank's own tokens.
- :class:`AllToAllEPStack` ("a2a_ep"): attention data-parallel, experts sharded, tokens
  dispatched to the experts' owners and combined back with NCCL ``all_to_all_single``
  (:class:`AllToAllEP`).
- :class:`TwoBatchOverlapStack` ("a2a_tbo"): AllToAll-EP with the batch split in two
  micro-batches (at a request boundary), one CUDA stream each, the collectives of one issued
  while the other computes (SGLang's two-batch overlap).
- :class:`TensorParallelStack` ("tp"): every rank runs the whole group's batch with 1/N of
  the attention heads and 1/N of every expert's FFN columns; two all-reduces per layer.

Attention runs one ``scaled_dot_product_attention(is_causal=True)`` call per run of
same-length requests (requests are packed sorted by length, so such a run is one
``[count, heads, length, head_dim]`` batch): a request's tokens attend only within the
request, no padding, no mask; on CUDA the flash backend is forced.

Also here: :func:`time_passes` (the timing helper of every benchmark) and the routing-bias
models (balanced, skewed) of ``e2e_prefill.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from zeroprefill.common.asyncep_model import AsyncEPConfig, build_asyncep_model
from zeroprefill.common.asyncep_moe import experts_reference, select_experts
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.model_spec import MoEModelSpec

FP8_DTYPE = torch.float8_e4m3fn
LAYOUT_FAMILIES = ("dp", "asyncep", "a2a_ep", "a2a_tbo", "tp")
#: Logit added to the experts a token must pick in the balanced regime (dominates N(0, 1)).
BALANCED_LOGIT_BOOST = 20.0

ExpertsKernel = Callable[..., torch.Tensor]


# -- timing --------------------------------------------------------------------------------
def run_ranks(rank_main: Callable[..., None], num_ranks: int, args: object) -> dict:
    """Spawn ``rank_main(rank, num_ranks, port, args, result_file)`` per rank; return rank 0's JSON.

    ``port`` is a free loopback port for the rendezvous; rank 0 writes its result to
    ``result_file``.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "raw.json")
        mp.spawn(rank_main, args=(num_ranks, port, args, result_file), nprocs=num_ranks, join=True)
        with open(result_file) as f:
            return json.load(f)


def time_passes(run_pass: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of one pass on this rank, all ranks aligned by a barrier before each.

    CUDA: events around the pass on the current stream; CPU: wall clock.
    """
    for _ in range(warmup):
        run_pass()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_pass()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            run_pass()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


# -- model shapes and weights --------------------------------------------------------------
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
    """

    hidden: torch.Tensor
    lengths: tuple[int, ...]
    router_bias: torch.Tensor | None
    bias_per_layer: bool
    cos: torch.Tensor | None = field(init=False, default=None)  # [T, 1, D] after set_rope
    sin: torch.Tensor | None = field(init=False, default=None)
    groups: tuple[tuple[int, int, int], ...] = field(init=False)  # (first token, count, length)

    def __post_init__(self) -> None:
        if sum(self.lengths) != self.hidden.shape[0]:
            raise ValueError(f"request lengths sum to {sum(self.lengths)}, hidden has {self.hidden.shape[0]} tokens")
        groups, start = [], 0
        for length in self.lengths:
            if groups and groups[-1][2] == length:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1, length)
            else:
                groups.append((start, 1, length))
            start += length
        self.groups = tuple(groups)

    def set_rope(self, head_dim: int, theta: float) -> None:
        """RoPE tables ``[T, 1, D]`` at each token's position inside its request."""
        device = self.hidden.device
        positions = torch.cat([torch.arange(n, device=device) for n in self.lengths]).float() if self.lengths else \
            torch.zeros(0, device=device)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, D]
        self.cos = angles.cos().to(self.hidden.dtype)
        self.sin = angles.sin().to(self.hidden.dtype)

    def bias(self, layer: int) -> torch.Tensor | None:
        if self.router_bias is None:
            return None
        return self.router_bias[layer] if self.bias_per_layer else self.router_bias

    def split(self, num_requests: int) -> tuple[PackedBatch, PackedBatch]:
        """The first ``num_requests`` requests and the rest."""
        cut = sum(self.lengths[:num_requests])
        parts = []
        for sl, lengths in ((slice(0, cut), self.lengths[:num_requests]), (slice(cut, None), self.lengths[num_requests:])):
            bias = self.router_bias
            if bias is not None and not self.bias_per_layer:
                bias = bias[sl]
            part = PackedBatch(self.hidden[sl], tuple(lengths), bias, self.bias_per_layer)
            if self.cos is not None:
                part.cos, part.sin = self.cos[sl], self.sin[sl]
            parts.append(part)
        return parts[0], parts[1]

    def split_in_two(self) -> tuple[PackedBatch, PackedBatch]:
        """Two micro-batches cut at the request boundary nearest half the tokens."""
        total, best, best_gap, acc = sum(self.lengths), 0, None, 0
        for n in range(len(self.lengths) + 1):
            gap = abs(2 * acc - total)
            if best_gap is None or gap < best_gap:
                best, best_gap = n, gap
            if n < len(self.lengths):
                acc += self.lengths[n]
        return self.split(best)


def balanced_router_bias(first_token: int, tokens: int, cfg: StackConfig, device: torch.device) -> torch.Tensor:
    """``[T, E]`` bias that makes global token ``g`` pick experts ``(g K + j) mod E``, j < K:
    every expert (and so every EP rank) gets exactly the same load when ``T K`` is a multiple
    of ``E`` (EP's best case)."""
    g = torch.arange(first_token, first_token + tokens, device=device)
    ids = (g[:, None] * cfg.top_k + torch.arange(cfg.top_k, device=device)[None, :]) % cfg.num_experts
    bias = torch.zeros(tokens, cfg.num_experts, device=device, dtype=torch.bfloat16)
    bias.scatter_(1, ids, BALANCED_LOGIT_BOOST)
    return bias


def expected_max_over_mean_load(bias: torch.Tensor, top_k: int, samples: int, seed: int) -> float:
    """Max/mean expert load of top-k routing over N(0, 1) logits plus ``bias [E]`` (simulated)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, bias.numel(), generator=gen) + bias[None, :]
    ids = torch.topk(logits, top_k, dim=-1).indices.reshape(-1)
    load = torch.bincount(ids, minlength=bias.numel()).float()
    return float(load.max() / load.mean())


def skewed_router_bias(cfg: StackConfig, num_layers: int, target_ratio: float, seed: int,
                       samples: int = 32768) -> tuple[torch.Tensor, list[float]]:
    """Per-layer expert popularity: bias ``alpha_l * z_l`` with ``z_l ~ N(0, 1)^E`` (a
    log-normal popularity, different hot experts per layer), ``alpha_l`` bisected so that
    top-k routing of N(0, 1) router logits plus the bias has max/mean expert load
    ``target_ratio``. Returns ``([layers, E] float32 on CPU, alpha per layer)``."""
    gen = torch.Generator().manual_seed(seed)
    rows, alphas = [], []
    for layer in range(num_layers):
        z = torch.randn(cfg.num_experts, generator=gen)
        low, high = 0.0, 4.0
        for _ in range(20):
            mid = (low + high) / 2
            if expected_max_over_mean_load(mid * z, cfg.top_k, samples, seed + layer) < target_ratio:
                low = mid
            else:
                high = mid
        alphas.append((low + high) / 2)
        rows.append(alphas[-1] * z)
    return torch.stack(rows), alphas


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


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], batch: PackedBatch, cfg: StackConfig,
              num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Causal self-attention of ``num_heads`` query heads over each request: ``[T, H]``.

    Without the o-projection's reduction over ranks (tensor parallelism all-reduces it).
    """
    tokens, d = x.shape[0], cfg.head_dim
    qkv = F.linear(x, w["qkv"])
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = apply_rope(rms_norm(q.view(tokens, num_heads, d), w["q_norm"], cfg.rms_norm_eps), batch.cos, batch.sin)
    k = apply_rope(rms_norm(k.view(tokens, num_kv_heads, d), w["k_norm"], cfg.rms_norm_eps), batch.cos, batch.sin)
    v = v.view(tokens, num_kv_heads, d)
    out = torch.empty(tokens, num_heads, d, device=x.device, dtype=x.dtype)
    with _sdpa_context(x.device):
        for first, count, length in batch.groups:
            rows = slice(first, first + count * length)

            def heads_major(t: torch.Tensor) -> torch.Tensor:
                return t[rows].view(count, length, t.shape[1], d).transpose(1, 2)

            o = F.scaled_dot_product_attention(heads_major(q), heads_major(k), heads_major(v), is_causal=True,
                                               enable_gqa=num_heads != num_kv_heads)
            out[rows] = o.transpose(1, 2).reshape(count * length, num_heads, d)
    return F.linear(out.view(tokens, num_heads * d), w["o"])


def router_logits(x: torch.Tensor, w: dict[str, torch.Tensor], batch: PackedBatch, layer: int) -> torch.Tensor:
    logits = F.linear(x, w["router"])
    bias = batch.bias(layer)
    return logits if bias is None else logits + bias.to(logits.dtype)


# -- layouts -------------------------------------------------------------------------------
class _Stack:
    """A K-layer stack under one layout; ``forward(batch) -> hidden [T, H]``."""

    family: str

    def __init__(self, cfg: StackConfig, dense: Sequence[dict[str, torch.Tensor]], kernel: ExpertsKernel) -> None:
        self.cfg, self.dense, self.kernel = cfg, list(dense), kernel

    def attention_residual(self, h: torch.Tensor, layer: int, batch: PackedBatch) -> torch.Tensor:
        w = self.dense[layer]
        return h + attention(rms_norm(h, w["input_norm"], self.cfg.rms_norm_eps), w, batch, self.cfg,
                             self.cfg.num_heads, self.cfg.num_kv_heads)

    def moe_input(self, h: torch.Tensor, layer: int, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.dense[layer]
        x = rms_norm(h, w["post_norm"], self.cfg.rms_norm_eps)
        return x, router_logits(x, w, batch, layer)

    def close(self) -> None:
        """Release communication resources (streamer gathers in flight)."""


class LocalStack(_Stack):
    """Every weight resident on the rank; no communication ("dp")."""

    family = "dp"

    def __init__(self, cfg, dense, kernel, experts: Sequence[dict[str, torch.Tensor]]) -> None:
        super().__init__(cfg, dense, kernel)
        self.experts = list(experts)
        self.recorded_ids: list[torch.Tensor] | None = None  # routing ids per layer when recording

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        h = batch.hidden
        for layer, experts in enumerate(self.experts):
            h = self.attention_residual(h, layer, batch)
            x, logits = self.moe_input(h, layer, batch)
            weights, ids = select_experts(logits, self.cfg.top_k, self.cfg.renormalize)
            if self.recorded_ids is not None:
                self.recorded_ids.append(ids)
            scales = {name: t for name, t in experts.items() if name.endswith("_scale")}
            h = h + self.kernel(x.contiguous(), experts["w13"], experts["w2"], weights, ids, **scales)
        return h


class AsyncEPStack(_Stack):
    """Attention data-parallel; experts streamed by AsyncEP's weight streamer ("asyncep")."""

    family = "asyncep"

    def __init__(self, cfg, dense, kernel, shards: Sequence[dict[str, torch.Tensor]], layout: ExpertShardLayout,
                 transport: str, prefetch_depth: int, device: torch.device) -> None:
        super().__init__(cfg, dense, kernel)
        asyncep = build_asyncep_model(shards, layout, AsyncEPConfig(transport, prefetch_depth), top_k=cfg.top_k,
                                      renormalize=cfg.renormalize, device=device, experts_kernel=kernel)
        self.streamer = asyncep.streamer
        self.moe = asyncep.layers

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        self.streamer.prefetch()  # layer 0's gather overlaps layer 0's attention
        h = batch.hidden
        for layer, moe in enumerate(self.moe):
            h = self.attention_residual(h, layer, batch)
            x, logits = self.moe_input(h, layer, batch)
            h = h + moe(x.contiguous(), logits)
        return h

    def close(self) -> None:
        self.streamer.close()


@dataclass
class _EPStep:
    """One micro-batch's trip through an AllToAll-EP MoE layer (state between stages)."""

    tokens: int
    token_of_row: torch.Tensor
    rows: torch.Tensor
    meta: torch.Tensor
    send_counts: torch.Tensor
    recv_counts: torch.Tensor
    works: list = field(default_factory=list)
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    recv_rows: torch.Tensor | None = None
    recv_meta: torch.Tensor | None = None
    back: torch.Tensor | None = None
    expert_out: torch.Tensor | None = None


class AllToAllEP:
    """Plain expert parallelism: dispatch token copies to the experts' owners, combine back.

    Stages (each issues its collectives asynchronously, so a caller can interleave two
    micro-batches): :meth:`route` (top-k, sort rows by owner, exchange counts),
    :meth:`dispatch` (host sync on the counts, as EP's split sizes need; rows and routing
    metadata all_to_all), :meth:`compute` (experts on the received rows), :meth:`combine`
    (all_to_all back), :meth:`finish` (weighted rows summed per token). :meth:`forward` runs
    them in order.
    """

    def __init__(self, layout: ExpertShardLayout, shards: Sequence[dict[str, torch.Tensor]], top_k: int,
                 kernel: ExpertsKernel, renormalize: bool = True) -> None:
        self.layout, self.shards, self.top_k, self.kernel = layout, list(shards), top_k, kernel
        self.renormalize = renormalize
        device = next(iter(self.shards[0].values())).device
        owner = torch.empty(layout.num_experts, dtype=torch.int64)
        local = torch.empty(layout.num_experts, dtype=torch.int64)
        for r in range(layout.world_size):
            for j, e in enumerate(layout.experts_of_rank(r)):
                owner[e], local[e] = r, j
        self.owner, self.local_id = owner.to(device), local.to(device)

    def route(self, x: torch.Tensor, logits: torch.Tensor) -> _EPStep:
        weights, ids = select_experts(logits, self.top_k, self.renormalize)
        flat_ids = ids.reshape(-1)
        dest = self.owner[flat_ids]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.layout.world_size)
        recv_counts = torch.empty_like(send_counts)
        token_of_row = order // self.top_k
        meta = torch.stack([self.local_id[flat_ids[order]].float(), weights.reshape(-1)[order]], dim=1)
        step = _EPStep(x.shape[0], token_of_row, x[token_of_row], meta, send_counts, recv_counts)
        step.works.append(dist.all_to_all_single(recv_counts, send_counts, async_op=True))
        return step

    def dispatch(self, step: _EPStep) -> None:
        for work in step.works:
            work.wait()
        step.send_splits, step.recv_splits = step.send_counts.tolist(), step.recv_counts.tolist()  # host sync
        received = sum(step.recv_splits)
        step.recv_rows = step.rows.new_empty((received, step.rows.shape[1]))
        step.recv_meta = step.meta.new_empty((received, 2))
        step.works = [
            dist.all_to_all_single(step.recv_rows, step.rows, step.recv_splits, step.send_splits, async_op=True),
            dist.all_to_all_single(step.recv_meta, step.meta, step.recv_splits, step.send_splits, async_op=True),
        ]

    def compute(self, layer: int, step: _EPStep) -> None:
        for work in step.works:
            work.wait()
        shard = self.shards[layer]
        scales = {name: t for name, t in shard.items() if name.endswith("_scale")}
        step.expert_out = self.kernel(step.recv_rows, shard["w13"], shard["w2"], step.recv_meta[:, 1:].contiguous(),
                                      step.recv_meta[:, :1].long().contiguous(), **scales)

    def combine(self, step: _EPStep) -> None:
        step.back = torch.empty_like(step.rows)
        step.works = [dist.all_to_all_single(step.back, step.expert_out, step.send_splits, step.recv_splits,
                                             async_op=True)]

    def finish(self, step: _EPStep) -> torch.Tensor:
        for work in step.works:
            work.wait()
        out = torch.zeros((step.tokens, step.rows.shape[1]), dtype=torch.float32, device=step.rows.device)
        out.index_add_(0, step.token_of_row, step.back.float())
        return out.to(step.rows.dtype)

    def forward(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        step = self.route(x, logits)
        self.dispatch(step)
        self.compute(layer, step)
        self.combine(step)
        return self.finish(step)


class AllToAllEPStack(_Stack):
    """Attention data-parallel, MoE by :class:`AllToAllEP` ("a2a_ep")."""

    family = "a2a_ep"

    def __init__(self, cfg, dense, kernel, shards: Sequence[dict[str, torch.Tensor]], layout: ExpertShardLayout) -> None:
        super().__init__(cfg, dense, kernel)
        self.ep = AllToAllEP(layout, shards, cfg.top_k, kernel, cfg.renormalize)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        h = batch.hidden
        for layer in range(len(self.dense)):
            h = self.attention_residual(h, layer, batch)
            x, logits = self.moe_input(h, layer, batch)
            h = h + self.ep.forward(layer, x.contiguous(), logits)
        return h


class TwoBatchOverlapStack(AllToAllEPStack):
    """AllToAll-EP over two micro-batches A and B, one CUDA stream each ("a2a_tbo").

    Host issue order per layer (collectives in brackets run on NCCL's stream, in this order
    on every rank, each after the work its own micro-batch enqueued before it)::

        A: attention, route [counts A]     B: -
        A: host waits counts; [dispatch A] B: attention, route [counts B]   (dispatch A || attn B)
        A: experts                         B: host waits counts; [dispatch B] (experts A || dispatch B)
        A: [combine A]                     B: experts                        (combine A || experts B)
        A: sum rows (next: attention A)    B: [combine B], sum rows          (attn A' || combine B)

    The micro-batches are cut at the request boundary nearest half the tokens (attention
    stays per request). On CPU the same order runs on one thread (the tests check its result).
    """

    family = "a2a_tbo"

    def __init__(self, cfg, dense, kernel, shards: Sequence[dict[str, torch.Tensor]], layout: ExpertShardLayout) -> None:
        super().__init__(cfg, dense, kernel, shards, layout)
        device = self.ep.owner.device
        self.streams = [torch.cuda.Stream(device) for _ in range(2)] if device.type == "cuda" else None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        halves = batch.split_in_two()
        if self.streams is not None:
            main = torch.cuda.current_stream(batch.hidden.device)
            for stream in self.streams:
                stream.wait_stream(main)

        def on(i: int):
            return torch.cuda.stream(self.streams[i]) if self.streams is not None else contextlib.nullcontext()

        h = [halves[0].hidden, halves[1].hidden]
        for layer in range(len(self.dense)):
            steps: list[_EPStep | None] = [None, None]
            with on(0):
                h[0] = self.attention_residual(h[0], layer, halves[0])
                x0, logits0 = self.moe_input(h[0], layer, halves[0])
                steps[0] = self.ep.route(x0.contiguous(), logits0)
                self.ep.dispatch(steps[0])
            with on(1):
                h[1] = self.attention_residual(h[1], layer, halves[1])
                x1, logits1 = self.moe_input(h[1], layer, halves[1])
                steps[1] = self.ep.route(x1.contiguous(), logits1)
            with on(0):
                self.ep.compute(layer, steps[0])
            with on(1):
                self.ep.dispatch(steps[1])
            with on(0):
                self.ep.combine(steps[0])
            with on(1):
                self.ep.compute(layer, steps[1])
                self.ep.combine(steps[1])
            with on(0):
                h[0] = h[0] + self.ep.finish(steps[0])
            with on(1):
                h[1] = h[1] + self.ep.finish(steps[1])
        if self.streams is not None:
            for stream, part in zip(self.streams, h):
                main.wait_stream(stream)
                part.record_stream(main)  # allocated on the side stream, read by the main one
        return torch.cat(h)


class TensorParallelStack(_Stack):
    """Heads and expert FFN columns split over the ranks; two all-reduces per layer ("tp").

    Rank r holds query heads ``[r Hq/N, (r+1) Hq/N)`` and the kv heads they read (replicated
    when ``Hkv < N``), the matching o-projection columns, and columns
    ``[r I/N, (r+1) I/N)`` of every expert's gate/up (rows of w2's input); router and norms
    are replicated. Every rank runs the whole group's batch. FP8: each rank quantises its own
    bf16 slice (block scales follow the slice; equal to slicing the quantised whole when
    ``I / N`` is a multiple of 128).
    """

    family = "tp"

    def __init__(self, cfg, dense, kernel, experts_bf16: Sequence[dict[str, torch.Tensor]], rank: int,
                 world_size: int, fp8: bool) -> None:
        if cfg.num_heads % world_size or cfg.intermediate % world_size:
            raise ValueError(f"TP over {world_size} ranks needs heads ({cfg.num_heads}) and expert FFN "
                             f"({cfg.intermediate}) divisible by {world_size}")
        d = cfg.head_dim
        self.heads = cfg.num_heads // world_size
        first_q = rank * self.heads
        group = cfg.num_heads // cfg.num_kv_heads
        first_kv, last_kv = first_q // group, (first_q + self.heads - 1) // group
        self.kv_heads = last_kv - first_kv + 1
        q_rows = slice(first_q * d, (first_q + self.heads) * d)
        k_base, v_base = cfg.num_heads * d, (cfg.num_heads + cfg.num_kv_heads) * d
        local_dense = []
        for w in dense:
            qkv = torch.cat([w["qkv"][q_rows], w["qkv"][k_base + first_kv * d: k_base + (last_kv + 1) * d],
                             w["qkv"][v_base + first_kv * d: v_base + (last_kv + 1) * d]])
            local_dense.append({**w, "qkv": qkv.contiguous(), "o": w["o"][:, q_rows].contiguous()})
        super().__init__(cfg, local_dense, kernel)
        i_local = cfg.intermediate // world_size
        cols = slice(rank * i_local, (rank + 1) * i_local)
        self.experts = []
        for experts in experts_bf16:
            w13 = torch.cat([experts["w13"][:, cols], experts["w13"][:, cfg.intermediate + cols.start:
                                                                     cfg.intermediate + cols.stop]], dim=1)
            local = {"w13": w13.contiguous(), "w2": experts["w2"][:, :, cols].contiguous()}
            self.experts.append(quantize_experts_fp8(local) if fp8 else local)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        h = batch.hidden
        for layer, experts in enumerate(self.experts):
            w = self.dense[layer]
            partial = attention(rms_norm(h, w["input_norm"], self.cfg.rms_norm_eps), w, batch, self.cfg,
                                self.heads, self.kv_heads)
            dist.all_reduce(partial)
            h = h + partial
            x, logits = self.moe_input(h, layer, batch)
            weights, ids = select_experts(logits, self.cfg.top_k, self.cfg.renormalize)
            scales = {name: t for name, t in experts.items() if name.endswith("_scale")}
            partial = self.kernel(x.contiguous(), experts["w13"], experts["w2"], weights, ids, **scales)
            dist.all_reduce(partial)
            h = h + partial
        return h


def max_over_mean(loads: torch.Tensor) -> float:
    """``max / mean`` of a load vector (1.0 = perfectly balanced)."""
    mean = loads.float().mean()
    return float(loads.float().max() / mean) if mean > 0 else 1.0


def routing_balance(ids_per_layer: Sequence[torch.Tensor], layout: ExpertShardLayout) -> dict[str, float]:
    """Achieved balance of the group's routing (ids summed over ranks): expert- and EP-rank-level."""
    expert_ratios, rank_ratios = [], []
    for ids in ids_per_layer:
        load = torch.bincount(ids.reshape(-1), minlength=layout.num_experts).to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(load)
        rank_load = torch.stack([load[list(layout.experts_of_rank(r))].sum() for r in range(layout.world_size)])
        expert_ratios.append(max_over_mean(load))
        rank_ratios.append(max_over_mean(rank_load))
    return {
        "expert_max_over_mean": statistics.mean(expert_ratios),
        "expert_max_over_mean_worst_layer": max(expert_ratios),
        "ep_rank_max_over_mean": statistics.mean(rank_ratios),
        "ep_rank_max_over_mean_worst_layer": max(rank_ratios),
    }


def fp8_supported(device: torch.device) -> tuple[bool, str | None]:
    """Whether ``zeroprefill.kernels`` provides the FP8 experts path here (reason if not)."""
    try:
        import zeroprefill.kernels as kernels  # noqa: F401
    except ImportError as exc:
        return False, f"zeroprefill.kernels is not importable ({exc}); FP8 experts not run"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False, "FP8 (e4m3) needs compute capability >= 8.9"
    return True, None



def parse_layout(name: str) -> tuple[str, str | None, int | None]:
    """``"asyncep-<transport>-d<depth>"`` -> ``("asyncep", transport, depth)``; others as is."""
    if name.startswith("asyncep-"):
        parts = name.split("-")
        if len(parts) == 3 and parts[2].startswith("d") and parts[2][1:].isdigit():
            return "asyncep", parts[1], int(parts[2][1:])
    elif name in LAYOUT_FAMILIES:
        return name, None, None
    raise ValueError(f"unknown layout {name!r}; use one of {LAYOUT_FAMILIES[:1] + LAYOUT_FAMILIES[2:]} "
                     "or asyncep-<transport>-d<prefetch depth>, e.g. asyncep-nccl-d1")


def build_stack(name: str, cfg: StackConfig, dense: Sequence[dict[str, torch.Tensor]],
                experts_bf16: Sequence[dict[str, torch.Tensor]], experts_fp8: Sequence[dict[str, torch.Tensor]] | None,
                rank: int, world_size: int, device: torch.device) -> _Stack:
    """The K-layer stack of layout ``name`` on this rank, from the full (unsharded) weights.

    ``experts_fp8`` (quantised ``experts_bf16``) selects FP8 experts; ``None`` runs bf16.
    """
    family, transport, depth = parse_layout(name)
    fp8 = experts_fp8 is not None
    experts = experts_fp8 if fp8 else experts_bf16
    kernel = experts_kernel_for(device, fp8)
    if family == "dp":
        return LocalStack(cfg, dense, kernel, experts)
    if family == "tp":
        return TensorParallelStack(cfg, dense, kernel, experts_bf16, rank, world_size, fp8)
    layout = ExpertShardLayout(cfg.num_experts, world_size)
    shards = [layout.shard_all(e, rank) for e in experts]
    if family == "asyncep":
        return AsyncEPStack(cfg, dense, kernel, shards, layout, transport, depth, device)
    if family == "a2a_ep":
        return AllToAllEPStack(cfg, dense, kernel, shards, layout)
    return TwoBatchOverlapStack(cfg, dense, kernel, shards, layout)
