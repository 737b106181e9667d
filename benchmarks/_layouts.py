"""The ways to run a Qwen3-MoE layer stack (``_model.py``) on N ranks: one class per layout.

- :class:`LocalStack` ("dp"): every weight resident, each rank its own requests, no
  communication. Plain data parallelism; also the no-communication reference every other
  layout's *exposed communication* is measured against.
- :class:`AsyncEPStack` ("asyncep"): attention data-parallel, each rank stores 1/N of the
  experts, :class:`~zeroprefill.common.streamer.ExpertWeightStreamer` gathers layer l+d while
  layer l computes, :class:`~zeroprefill.common.asyncep_moe.AsyncEPMoE` runs all experts on
  the rank's own tokens.
- :class:`ExpertParallelStack` ("a2a_ep"): attention data-parallel, experts sharded, MoE by
  :class:`DeduplicatedEP`, expert parallelism as DeepEP's normal mode and vLLM run it: each
  token goes once to every rank holding one of its experts, the expert side applies the
  routing weights and sums its experts per token, one row per (token, rank) comes back.
- :class:`TwoBatchOverlapStack` ("a2a_tbo"): the same EP over two micro-batches cut at half
  the tokens (inside a request if need be), each with its own stream and communicator; one
  micro-batch's dispatch and combine run while the other computes (SGLang's two-batch
  overlap).
- :class:`TensorParallelStack` ("tp"): every rank runs the whole group's batch with 1/N of
  the attention heads and 1/N of every expert's FFN columns; two all-reduces per layer.

Every stack can record the bytes it sends per layer beside the minimum its algorithm needs
(``_harness.LayerTraffic``). :func:`build_stack` builds the stack a ``--layouts`` name
(:func:`parse_layout`) asks for from the full weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from _harness import LayerTraffic, asyncep_minimum_bytes, ep_minimum_bytes, remote_token_rank_pairs, tp_minimum_bytes
from _model import (ExpertsKernel, KeyValue, PackedBatch, StackConfig, attention, causal_attention, experts_kernel_for,
                    qkv_projection, quantize_experts_fp8, rms_norm, router_logits)
from zeroprefill.common.asyncep_model import AsyncEPConfig, build_asyncep_model
from zeroprefill.common.asyncep_moe import select_experts
from zeroprefill.common.expert_sharding import ExpertShardLayout

LAYOUT_FAMILIES = ("dp", "asyncep", "a2a_ep", "a2a_tbo", "tp")


class _Stack:
    """A K-layer stack under one layout; ``forward(batch) -> hidden [T, H]``.

    Set ``traffic`` to a list to have the next forward append one :class:`LayerTraffic` per
    layer (an accounting pass: it may synchronise; not for timed passes).
    """

    family: str

    def __init__(self, cfg: StackConfig, dense: Sequence[dict[str, torch.Tensor]], kernel: ExpertsKernel) -> None:
        self.cfg, self.dense, self.kernel = cfg, list(dense), kernel
        self.traffic: list[LayerTraffic] | None = None

    def attention_residual(self, h: torch.Tensor, layer: int, batch: PackedBatch) -> torch.Tensor:
        w = self.dense[layer]
        return h + attention(rms_norm(h, w["input_norm"], self.cfg.rms_norm_eps), w, batch, self.cfg,
                             self.cfg.num_heads, self.cfg.num_kv_heads)

    def moe_input(self, h: torch.Tensor, layer: int, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.dense[layer]
        x = rms_norm(h, w["post_norm"], self.cfg.rms_norm_eps)
        return x, router_logits(x, w, batch, layer)

    def record(self, traffic: LayerTraffic) -> None:
        if self.traffic is not None:
            self.traffic.append(traffic)

    def close(self) -> None:
        """Release communication resources (streamer gathers in flight, communicators)."""


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
            self.record(LayerTraffic(0, 0))
        return h


class AsyncEPStack(_Stack):
    """Attention data-parallel; experts streamed by AsyncEP's weight streamer ("asyncep").

    Traffic: the transport moves ``N - 1`` shards per layer (padded to ``ceil(E / N)``
    experts, FP8 scales included); the minimum is ``(N - 1) / N`` of the layer's experts.
    """

    family = "asyncep"

    def __init__(self, cfg, dense, kernel, shards: Sequence[dict[str, torch.Tensor]], layout: ExpertShardLayout,
                 transport: str, prefetch_depth: int, device: torch.device, copy_streams: int = 1) -> None:
        super().__init__(cfg, dense, kernel)
        shard_bytes = sum(t.numel() * t.element_size() for t in shards[0].values())
        layer_bytes = shard_bytes // layout.capacity * layout.num_experts
        self.layer_traffic = LayerTraffic((layout.world_size - 1) * shard_bytes,
                                          asyncep_minimum_bytes(layer_bytes, layout.world_size))
        asyncep = build_asyncep_model(shards, layout, AsyncEPConfig(transport, prefetch_depth, copy_streams),
                                      top_k=cfg.top_k,
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
            self.record(self.layer_traffic)
        return h

    def close(self) -> None:
        self.streamer.close()


def _items_in_row_order(row_of_item: torch.Tensor, rows: int, padding_item: int) -> torch.Tensor:
    """``[rows + 1]``: the item that goes to each row, then ``padding_item``.

    ``row_of_item[i]`` is item i's row, or ``rows`` for an item without one. The inverse of
    a compaction whose size the host already knows, so no host synchronisation.
    """
    items = torch.arange(row_of_item.numel(), device=row_of_item.device)
    order = torch.empty(rows + 1, dtype=torch.int64, device=row_of_item.device).scatter_(0, row_of_item, items)
    order[rows] = padding_item
    return order


@dataclass
class _EPStep:
    """One micro-batch's trip through a :class:`DeduplicatedEP` layer (state between stages)."""

    x: torch.Tensor             # [T, H] this rank's tokens
    ids: torch.Tensor           # [T, K] their experts
    weights: torch.Tensor       # [T, K] routing weights (float32)
    holds: torch.Tensor         # [N, T] rank r holds at least one of token t's experts
    send_counts: torch.Tensor   # [N, 2] (tokens, (token, expert) pairs) for each rank
    recv_counts: torch.Tensor   # [N, 2] the same, from each rank
    works: list = field(default_factory=list)
    send_rows: list[int] = field(default_factory=list)  # host copies, after the count exchange
    recv_rows: list[int] = field(default_factory=list)
    recv_pairs: int = 0
    row_of_hold: torch.Tensor | None = None  # [N, T] send row of (rank, token), or the zero row
    recv_x: torch.Tensor | None = None       # [received + 1, H]; the last row is zero
    recv_meta: torch.Tensor | None = None    # [received + 1, 2K]: local expert ids (-1: elsewhere), weights
    expert_out: torch.Tensor | None = None   # [received, H]
    back: torch.Tensor | None = None         # [sent + 1, H]; the last row is zero


class DeduplicatedEP:
    """Expert parallelism with DeepEP normal-mode semantics, over ``all_to_all_single``.

    Per MoE layer, for this rank's T tokens (top-k, N ranks):

    1. :meth:`route`: top-k; per rank, the tokens with at least one expert there (each
       once) and their (token, expert) pairs are counted; the counts are exchanged (async).
    2. :meth:`dispatch`: the one host wait (``all_to_all_single`` takes its split sizes on
       the host, as DeepEP's normal mode waits on the host for its receive counts), then one
       row per (token, rank) with its K routing slots relative to that rank (local expert
       id, or -1 for an expert elsewhere, and the weight) goes out.
    3. :meth:`compute`: the rank's experts on its (received token, local expert) pairs, each
       times its routing weight, summed per received token (fp32 accumulation).
    4. :meth:`combine`: one row per received token goes back (the dispatch reversed).
    5. :meth:`finish`: each token sums its at most N partial rows (fp32 accumulation).

    The experts kernel takes K slots per token and has no "skip" id, so the expert side
    lists the (token, local expert) pairs and runs the kernel on one slot per pair: no padded
    FLOP, at the price of gathering the pairs' rows (one extra activation pass). Stages issue
    their collectives asynchronously on ``group``, so a caller can interleave two
    micro-batches (:class:`TwoBatchOverlapStack`); :meth:`forward` runs them in order.
    """

    def __init__(self, layout: ExpertShardLayout, shards: Sequence[dict[str, torch.Tensor]], top_k: int,
                 kernel: ExpertsKernel, renormalize: bool = True, group: dist.ProcessGroup | None = None) -> None:
        self.layout, self.shards, self.top_k, self.kernel = layout, list(shards), top_k, kernel
        self.renormalize, self.group = renormalize, group
        self.world_size = layout.world_size
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        device = next(iter(self.shards[0].values())).device
        owner = torch.empty(layout.num_experts, dtype=torch.int64)
        local = torch.empty(layout.num_experts, dtype=torch.int64)
        for r in range(layout.world_size):
            for j, e in enumerate(layout.experts_of_rank(r)):
                owner[e], local[e] = r, j
        self.owner, self.local_id = owner.to(device), local.to(device)

    def route(self, x: torch.Tensor, logits: torch.Tensor) -> _EPStep:
        weights, ids = select_experts(logits, self.top_k, self.renormalize)
        owners = self.owner[ids]
        holds = torch.zeros(self.world_size, x.shape[0], dtype=torch.bool, device=x.device)
        holds.scatter_(0, owners.t(), True)
        pairs = torch.zeros(self.world_size, dtype=torch.int64, device=x.device)  # bincount would sync on CUDA
        pairs.scatter_add_(0, owners.reshape(-1), torch.ones_like(owners.reshape(-1)))
        send_counts = torch.stack([holds.sum(dim=1), pairs], dim=1)
        recv_counts = torch.empty_like(send_counts)
        step = _EPStep(x, ids, weights, holds, send_counts, recv_counts)
        step.works = [dist.all_to_all_single(recv_counts, send_counts, group=self.group, async_op=True)]
        return step

    def dispatch(self, step: _EPStep) -> None:
        for work in step.works:
            work.wait()
        counts = torch.cat([step.send_counts, step.recv_counts]).tolist()  # the host wait
        n, (tokens, hidden) = self.world_size, step.x.shape
        step.send_rows, step.recv_rows = [c[0] for c in counts[:n]], [c[0] for c in counts[n:]]
        step.recv_pairs = sum(c[1] for c in counts[n:])
        sent, received = sum(step.send_rows), sum(step.recv_rows)
        holds = step.holds.reshape(-1)  # (rank, token), rank-major: the send order
        row_of_hold = torch.where(holds, holds.cumsum(0) - 1, sent)
        step.row_of_hold = row_of_hold.view(n, tokens)
        hold_of_row = _items_in_row_order(row_of_hold, sent, padding_item=0)[:sent]
        token_of_row, rank_of_row = hold_of_row % tokens, hold_of_row // tokens
        row_ids = step.ids[token_of_row]
        local_ids = torch.where(self.owner[row_ids] == rank_of_row[:, None], self.local_id[row_ids], -1)
        meta = torch.cat([local_ids.float(), step.weights[token_of_row]], dim=1)
        step.recv_x = step.x.new_empty(received + 1, hidden)
        step.recv_x[received].zero_()
        step.recv_meta = meta.new_empty(received + 1, meta.shape[1])
        step.recv_meta[received].zero_()
        step.works = [
            dist.all_to_all_single(step.recv_x[:received], step.x[token_of_row], step.recv_rows, step.send_rows,
                                   group=self.group, async_op=True),
            dist.all_to_all_single(step.recv_meta[:received], meta, step.recv_rows, step.send_rows,
                                   group=self.group, async_op=True),
        ]

    def compute(self, layer: int, step: _EPStep) -> None:
        for work in step.works:
            work.wait()
        k, pairs = self.top_k, step.recv_pairs
        received = step.recv_x.shape[0] - 1
        slot_ids, slot_weights = step.recv_meta[:, :k].reshape(-1), step.recv_meta[:, k:].reshape(-1)
        valid = slot_ids[:received * k] >= 0
        pair_of_slot = torch.where(valid, valid.cumsum(0) - 1, pairs)  # `pairs`: the padding pair
        # the padding pair is slot 0 of the zero row: expert 0, weight 0, so its output is 0
        slot_of_pair = _items_in_row_order(pair_of_slot, pairs, padding_item=received * k)
        shard = self.shards[layer]
        scales = {name: t for name, t in shard.items() if name.endswith("_scale")}
        pair_out = self.kernel(step.recv_x[slot_of_pair // k], shard["w13"], shard["w2"],
                               slot_weights[slot_of_pair][:, None], slot_ids[slot_of_pair].long()[:, None], **scales)
        step.expert_out = pair_out[pair_of_slot.view(received, k)].sum(dim=1)
        step.recv_x = step.recv_meta = None  # consumed: free them before the combine

    def combine(self, step: _EPStep) -> None:
        sent = sum(step.send_rows)
        step.back = step.x.new_empty(sent + 1, step.x.shape[1])
        step.back[sent].zero_()
        step.works = [dist.all_to_all_single(step.back[:sent], step.expert_out, step.send_rows, step.recv_rows,
                                             group=self.group, async_op=True)]

    def finish(self, step: _EPStep) -> torch.Tensor:
        for work in step.works:
            work.wait()
        back, step.back, step.expert_out, step.works = step.back, None, None, []
        return back[step.row_of_hold].sum(dim=0)

    def forward(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, _EPStep]:
        """The MoE output ``[T, H]`` and the finished step (for :meth:`traffic_of`)."""
        step = self.route(x, logits)
        self.dispatch(step)
        self.compute(layer, step)
        self.combine(step)
        return self.finish(step), step

    def traffic_of(self, step: _EPStep) -> LayerTraffic:
        """Bytes this rank sent in ``step`` (counts, rows and routing slots to other ranks, rows
        back), beside :func:`ep_minimum_bytes` of its tokens' routing."""
        row = step.x.shape[1] * step.x.element_size()
        slots = 2 * self.top_k * 4
        others = [r for r in range(self.world_size) if r != self.rank]
        moved = (sum(step.send_rows[r] for r in others) * (row + slots) + sum(step.recv_rows[r] for r in others) * row
                 + len(others) * step.send_counts.shape[1] * step.send_counts.element_size())
        pairs = remote_token_rank_pairs(step.ids, self.owner, self.rank, self.world_size)
        return LayerTraffic(moved, ep_minimum_bytes(pairs, step.x.shape[1], step.x.element_size()))


class ExpertParallelStack(_Stack):
    """Attention data-parallel, MoE by :class:`DeduplicatedEP` ("a2a_ep")."""

    family = "a2a_ep"

    def __init__(self, cfg, dense, kernel, shards: Sequence[dict[str, torch.Tensor]],
                 layout: ExpertShardLayout) -> None:
        super().__init__(cfg, dense, kernel)
        self.ep = DeduplicatedEP(layout, shards, cfg.top_k, kernel, cfg.renormalize)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        h = batch.hidden
        for layer in range(len(self.dense)):
            h = self.attention_residual(h, layer, batch)
            x, logits = self.moe_input(h, layer, batch)
            out, step = self.ep.forward(layer, x.contiguous(), logits)
            h = h + out
            if self.traffic is not None:
                self.record(self.ep.traffic_of(step))
        return h


class TwoBatchOverlapStack(_Stack):
    """:class:`DeduplicatedEP` over two micro-batches A and B, as SGLang's two-batch overlap ("a2a_tbo").

    The batch is cut at half its tokens (:meth:`PackedBatch.split_in_half`), inside a request
    if one spans the cut: B's part of that request attends A's part through the keys and
    values A computed in the same layer. Each micro-batch has its own CUDA stream and its own
    communicator (process group), so one's collectives never queue behind the other's. Host
    issue order per layer (brackets: collectives; ``||``: what the GPU overlaps)::

        A: attention, route [counts A]
        B: attention, route [counts B]                  [counts A] || B attention
        A: wait counts A; [dispatch A]; experts A       [dispatch A] || B attention
        B: wait counts B; [dispatch B]                  [dispatch B] || A experts
        A: [combine A]
        B: experts B                                    [combine A] || B experts
        A: sum partials (next layer: attention A)       [combine B] || A's next attention
        B: [combine B], sum partials

    The host waits only on a count exchange, each time with the other micro-batch's compute
    already queued, so the GPU does not idle on the host. On CPU (gloo) the same order runs
    with host waits; the tests check its result.
    """

    family = "a2a_tbo"

    def __init__(self, cfg, dense, kernel, shards: Sequence[dict[str, torch.Tensor]],
                 layout: ExpertShardLayout) -> None:
        super().__init__(cfg, dense, kernel)
        ranks = list(range(layout.world_size))
        self.groups = [dist.new_group(ranks) for _ in range(2)]
        self.eps = [DeduplicatedEP(layout, shards, cfg.top_k, kernel, cfg.renormalize, group) for group in self.groups]
        device = self.eps[0].owner.device
        self.streams = [torch.cuda.Stream(device) for _ in range(2)] if device.type == "cuda" else None

    def _on(self, micro_batch: int):
        return torch.cuda.stream(self.streams[micro_batch]) if self.streams is not None else contextlib.nullcontext()

    def _attention_residual(self, h: torch.Tensor, layer: int, batch: PackedBatch,
                            prefix_kv: KeyValue | None) -> tuple[torch.Tensor, KeyValue]:
        """``h`` + attention, and the layer's keys and values (B continues A's last request)."""
        w, cfg = self.dense[layer], self.cfg
        q, k, v = qkv_projection(rms_norm(h, w["input_norm"], cfg.rms_norm_eps), w, batch, cfg, cfg.num_heads,
                                 cfg.num_kv_heads)
        return h + F.linear(causal_attention(q, k, v, batch, prefix_kv), w["o"]), (k, v)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        halves = batch.split_in_half()
        continued = halves[1].continued_tokens
        if self.streams is not None:
            main = torch.cuda.current_stream(batch.hidden.device)
            for stream in self.streams:
                stream.wait_stream(main)
        ep_a, ep_b = self.eps
        h = [halves[0].hidden, halves[1].hidden]
        for layer in range(len(self.dense)):
            with self._on(0):
                h[0], (k, v) = self._attention_residual(h[0], layer, halves[0], None)
                x, logits = self.moe_input(h[0], layer, halves[0])
                step_a = ep_a.route(x.contiguous(), logits)
            prefix_kv = (k[-continued:], v[-continued:]) if continued else None
            if prefix_kv is not None and self.streams is not None:
                self.streams[1].wait_stream(self.streams[0])
                for t in prefix_kv:
                    t.record_stream(self.streams[1])
            with self._on(1):
                h[1], _ = self._attention_residual(h[1], layer, halves[1], prefix_kv)
                x, logits = self.moe_input(h[1], layer, halves[1])
                step_b = ep_b.route(x.contiguous(), logits)
            with self._on(0):
                ep_a.dispatch(step_a)
                ep_a.compute(layer, step_a)
            with self._on(1):
                ep_b.dispatch(step_b)
            with self._on(0):
                ep_a.combine(step_a)
            with self._on(1):
                ep_b.compute(layer, step_b)
            with self._on(0):
                h[0] = h[0] + ep_a.finish(step_a)
            with self._on(1):
                ep_b.combine(step_b)
                h[1] = h[1] + ep_b.finish(step_b)
            if self.traffic is not None:
                self.record(ep_a.traffic_of(step_a) + ep_b.traffic_of(step_b))
        if self.streams is not None:
            for stream, part in zip(self.streams, h):
                main.wait_stream(stream)
                part.record_stream(main)  # allocated on the side stream, read by the main one
        return torch.cat(h)

    def close(self) -> None:
        # Every rank finishes its last exchange on the micro-batch groups before any rank
        # tears them down: gloo completes a rank's op once its own sends and receives are
        # done, which can be before the peer has read the last bytes.
        dist.barrier()
        for group in self.groups:
            dist.destroy_process_group(group)


class TensorParallelStack(_Stack):
    """Heads and expert FFN columns split over the ranks; two all-reduces per layer ("tp").

    Rank r holds query heads ``[r Hq/N, (r+1) Hq/N)`` and the kv heads they read (replicated
    when ``Hkv < N``), the matching o-projection columns, and columns
    ``[r I/N, (r+1) I/N)`` of every expert's gate/up (rows of w2's input); router and norms
    are replicated. Every rank runs the whole group's batch. Traffic: NCCL's all-reduces,
    counted as rings (:func:`tp_minimum_bytes`), so moved and minimum are the same. FP8: each rank quantises its own
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
        self.world_size = world_size
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
            if self.traffic is not None:
                all_reduces = tp_minimum_bytes(h.shape[0], h.shape[1], h.element_size(), self.world_size)
                self.record(LayerTraffic(all_reduces, all_reduces))
        return h


@dataclass(frozen=True)
class LayoutName:
    """A parsed ``--layouts`` entry: the family, and AsyncEP's transport settings."""

    family: str
    transport: str | None = None
    prefetch_depth: int | None = None
    copy_streams: int = 1


def parse_layout(name: str) -> LayoutName:
    """``"asyncep-<transport>-d<depth>[-s<copy streams>]"`` -> AsyncEP's settings; others as is."""
    if name.startswith("asyncep-"):
        parts = name.split("-")
        depth_ok = len(parts) in (3, 4) and parts[2].startswith("d") and parts[2][1:].isdigit()
        streams_ok = len(parts) == 3 or (len(parts) == 4 and parts[3].startswith("s") and parts[3][1:].isdigit()
                                         and int(parts[3][1:]) >= 1)
        if depth_ok and streams_ok:
            return LayoutName("asyncep", parts[1], int(parts[2][1:]), int(parts[3][1:]) if len(parts) == 4 else 1)
    elif name in LAYOUT_FAMILIES:
        return LayoutName(name)
    raise ValueError(f"unknown layout {name!r}; use one of {LAYOUT_FAMILIES[:1] + LAYOUT_FAMILIES[2:]} "
                     "or asyncep-<transport>-d<prefetch depth>[-s<copy streams>], e.g. asyncep-nccl-d1, "
                     "asyncep-copy_engine-d1-s2")


def build_stack(name: str, cfg: StackConfig, dense: Sequence[dict[str, torch.Tensor]],
                experts_bf16: Sequence[dict[str, torch.Tensor]], experts_fp8: Sequence[dict[str, torch.Tensor]] | None,
                rank: int, world_size: int, device: torch.device) -> _Stack:
    """The K-layer stack of layout ``name`` on this rank, from the full (unsharded) weights.

    ``experts_fp8`` (quantised ``experts_bf16``) selects FP8 experts; ``None`` runs bf16.
    """
    parsed = parse_layout(name)
    family = parsed.family
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
        return AsyncEPStack(cfg, dense, kernel, shards, layout, parsed.transport, parsed.prefetch_depth, device,
                            parsed.copy_streams)
    if family == "a2a_ep":
        return ExpertParallelStack(cfg, dense, kernel, shards, layout)
    return TwoBatchOverlapStack(cfg, dense, kernel, shards, layout)
