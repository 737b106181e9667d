"""AsyncEP weight streaming: gather MoE layer l+d while layer l computes.

Data path of one MoE layer on one rank (each box names the class that owns it)::

    [expert shards]          each rank stores 1/N of every MoE layer     ExpertShardLayout
          |                  (read in place: never copied)
    [transport: gather l+d]  side stream, async, lockstep across ranks   GatherTransport
          |                  (the other N-1 ranks' shards only)
    [ring buffer slot]       min(d + 1, L) slots of one layer's remote   ExpertWeightStreamer
          |                  experts each
    [experts kernel on       all experts, this rank's own tokens only:  AsyncEPMoE
     local tokens]           resident shard + ring slot, one output
          |
    [release slot]           compute-stream event; the slot's next      ExpertWeightStreamer
                             gather waits on it

:meth:`ExpertWeightStreamer.acquire` returns :class:`LayerExperts`: the rank's own shard where
it lives and the ring slot with the others' shards, each with a table from global expert id
to its row there (``-1`` where that tensor does not hold it: the kernels skip those slots). A
group of one rank has no ring at all: every layer is its resident shard, and nothing is
gathered or copied.

The streamer sees MoE layers as one endless sequence ``k = pass * L + l`` and keeps the
gathers of ``k+1 .. k+d`` in flight while ``k`` computes (``d`` = prefetch depth). Slots
are *pass-aligned*: layer ``l`` always lives in slot ``l % S`` (``S = min(d + 1, L)``
slots), so every pass begins in the same state: slots ``0 .. S-1`` hold (or are
receiving) layers ``0 .. S-1``. The next pass's first layers stream during this pass's
last ones, so layer 0's gather is exposed only on the very first pass. A gather into a slot
waits until the slot's previous layer is released; a slot that only ever holds one layer
(when ``s + S >= L``) is gathered once and kept.

Ordering without host syncs (CUDA): ``issue(k)`` makes the side stream wait on the
``released`` event of the slot's previous layer, enqueues the gather and records
``gathered[slot]``; ``acquire(k)`` makes the compute stream wait on ``gathered[slot]``;
``release(k)`` records ``released[slot]`` on the compute stream. Gather buffers are allocated
once and never freed, so the caching allocator cannot recycle them under a pending copy.
On CPU the same sequence runs with gloo's asynchronous work objects and host waits.

CUDA graphs: a layer run while the current stream is being captured takes the *captured*
path, which keeps the pass-aligned state without any host-side bookkeeping (nothing of
ours runs when a graph replays). Layer ``l`` forks the next layer's gather (when its slot
holds another layer) onto the side stream at acquire, so it overlaps this layer's experts,
and joins it back before release returns; the last layer re-gathers the slots the pass
overwrote (``l < S`` with ``l + S < L``), so a replayed pass ends in the same state as an
eager one. The gathers a replay issues are the ones an eager pass issues, in the same order,
so collective transports stay in lockstep whichever ranks replay. Eager gathers still in
flight when a graph replays are the one hazard the graph cannot see: before every capture
and replay the engine must order its stream after the side stream
(:meth:`ExpertWeightStreamer.order_after_side_stream`; the vLLM plugin does this through
vLLM's weight-offloader hook, which vLLM calls at exactly those points).

Collective transports need every rank to issue every gather in the same order, so a rank
with no tokens still acquires and releases every layer (``AsyncEPMoE`` does this for an
empty batch). A gather that does not complete within ``timeout_s`` raises
:class:`~zeroprefill.common.transport.GatherTimeoutError` naming the layer and the rank.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.transport import GatherHandle, GatherTimeoutError, GatherTransport


@dataclass(frozen=True)
class ExpertRows:
    """Some of a layer's experts in one set of tensors (``[rows, ...]`` each, named as the
    shards: ``w13``, ``w2``, FP8 ``*_scale``) and where each global expert id sits in them:
    ``row_of_expert [E]`` (int64), ``-1`` for an expert these tensors do not hold; None when
    expert ``e`` is row ``e`` (one rank: the shard is every expert, routing ids need no remap)."""

    tensors: Mapping[str, torch.Tensor]
    row_of_expert: torch.Tensor | None


@dataclass(frozen=True)
class LayerExperts:
    """One MoE layer's experts as the kernels read them, valid until ``release``.

    ``resident``: this rank's own shard, where it lives. ``gathered``: the other ranks' shards
    in a ring slot; None when nothing is gathered (one rank, or a pass that moves tokens).
    """

    resident: ExpertRows
    gathered: ExpertRows | None

    def parts(self) -> list[ExpertRows]:
        return [self.resident] if self.gathered is None else [self.resident, self.gathered]


class ExpertWeightStreamer:
    """Streams every MoE layer's remote experts into a ring of ``min(prefetch_depth + 1, L)`` buffers.

    Args:
        layer_shards: per MoE layer (in execution order), this rank's shard of each named
            expert tensor, ``[layout.capacity, ...]``; e.g. ``{"w13": ..., "w2": ...}`` and,
            for FP8, their block scales. Every layer must have the same names and shapes.
            The streamer takes them over: a transport that moves shards into shareable
            memory replaces them in these dicts, freeing originals nobody else holds.
        layout: how experts are split over the transport's ranks.
        transport: how shards are gathered (see ``transport.py``).
        prefetch_depth: layers gathered ahead of the one computing (``d >= 1``).
        timeout_s: how long a gather may take before it is reported as stuck.
    """

    def __init__(
        self,
        layer_shards: Sequence[Mapping[str, torch.Tensor]],
        layout: ExpertShardLayout,
        transport: GatherTransport,
        prefetch_depth: int = 1,
        timeout_s: float = 300.0,
    ) -> None:
        if prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be >= 1, got {prefetch_depth}")
        if not layer_shards:
            raise ValueError("layer_shards is empty: nothing to stream")
        if layout.world_size != transport.world_size:
            raise ValueError(
                f"layout has world_size={layout.world_size} but the transport's group has "
                f"{transport.world_size} ranks"
            )
        self.layout = layout
        self.transport = transport
        self.num_layers = len(layer_shards)
        self.prefetch_depth = prefetch_depth
        self.timeout_s = timeout_s
        self.rank = transport.rank

        self.expert_shapes = _check_shards(layer_shards, layout.capacity)
        self._check_same_shapes_across_ranks()
        # The transport takes the shards over (and may replace them in these dicts).
        self._shards = transport.register(list(layer_shards))
        self.device = next(iter(self._shards[0].values())).device
        self._cuda = self.device.type == "cuda"

        gathered_rows = transport.gathered_rows(layout.capacity)
        num_slots = min(prefetch_depth + 1, self.num_layers) if gathered_rows else 0
        self._slots = [
            {
                name: torch.empty((gathered_rows, *shape), dtype=dtype, device=self.device)
                for name, (shape, dtype) in self.expert_shapes.items()
            }
            for _ in range(num_slots)
        ]
        resident_rows, gathered_rows_of_expert = [], []
        for rank, row in layout.home_of_expert():
            base = transport.gathered_row_of_rank(rank, layout.capacity)
            resident_rows.append(row if rank == self.rank else -1)
            gathered_rows_of_expert.append(base + row if rank != self.rank and base is not None else -1)
        self._resident_row_of_expert = (
            None if resident_rows == list(range(layout.num_experts))
            else torch.tensor(resident_rows, dtype=torch.int64, device=self.device)
        )
        self._gathered_row_of_expert = torch.tensor(gathered_rows_of_expert, dtype=torch.int64, device=self.device)
        if self._cuda and num_slots:
            self._side_stream = torch.cuda.Stream(device=self.device, priority=-1)
            # Shards and buffers were written on the compute stream; gathers read/write them.
            self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._gathered = [torch.cuda.Event() for _ in range(num_slots)]
            self._released = [torch.cuda.Event() for _ in range(num_slots)]
        self._slot_layer: list[int | None] = [None] * num_slots  # layer last issued into each slot
        self._slot_seq = [-1] * num_slots  # sequence number of each slot's current occupant
        # (handles, issue time) of every gather not yet consumed, by sequence number.
        self._in_flight: dict[int, tuple[list[GatherHandle], float]] = {}
        self._next_to_issue = 0  # sequence number of the next gather to issue
        self._next_to_acquire = 0  # sequence number of the next layer to compute
        self._acquired: int | None = None
        self._captured: _CapturedLayer | None = None

    # -- public API -----------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def gather_buffer_bytes(self) -> int:
        """Device memory held by the ring of gather buffers (0 with one rank)."""
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot.values())

    @property
    def streams_weights(self) -> bool:
        """False for a group of one rank: every expert is resident, nothing is ever gathered."""
        return bool(self._slots)

    def slot_of_layer(self, layer: int) -> int:
        return layer % self.num_slots

    def resident(self, layer: int) -> ExpertRows:
        """``layer``'s experts on this rank alone (its shard, in place); no gather, no ordering."""
        return ExpertRows(self._shards[layer], self._resident_row_of_expert)

    def prefetch(self) -> None:
        """Issue the gathers of the next ``prefetch_depth + 1`` layers now.

        Call at the start of a forward pass (before embeddings and the first attention) so
        that, even on the first pass, layer 0's gather overlaps that work. Idempotent.
        """
        if self.streams_weights:
            self._issue_up_to(self._next_to_acquire + self.prefetch_depth)

    def acquire(self, layer: int) -> LayerExperts:
        """Wait (on the compute stream) for ``layer``'s remote experts and return all of them.

        Layers must be acquired in execution order ``0, 1, ..., L-1, 0, 1, ...`` and each
        released before the next is acquired. A forward pass that gathers nothing (one that
        moves tokens instead, see ``AsyncEPMoE``) acquires no layer: the ring keeps the state
        it had at the pass boundary, the next pass's first layers gathered or in flight.
        """
        if not self.streams_weights:
            return LayerExperts(self.resident(layer), None)
        if self._capturing():
            return self._acquire_captured(layer)
        if self._acquired is not None:
            raise RuntimeError(
                f"MoE layer {self._acquired % self.num_layers} is still acquired on rank {self.rank}; "
                "release it before acquiring the next layer"
            )
        expected = self._next_to_acquire % self.num_layers
        if layer != expected:
            raise RuntimeError(
                f"rank {self.rank} acquired MoE layer {layer} but layer {expected} is next: "
                "layers must run in order on every rank (collective gathers are in lockstep)"
            )
        seq = self._next_to_acquire
        self._issue_up_to(seq + self.prefetch_depth)
        slot = self.slot_of_layer(layer)
        pending = self._in_flight.pop(seq, None)  # None: the slot already held this layer
        if pending is not None:
            self._wait(seq, *pending)
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._gathered[slot])
        self._acquired = seq
        return self._layer_experts(layer)

    def _layer_experts(self, layer: int) -> LayerExperts:
        gathered = ExpertRows(self._slots[self.slot_of_layer(layer)], self._gathered_row_of_expert)
        return LayerExperts(self.resident(layer), gathered)

    def release(self, layer: int) -> None:
        """Mark ``layer``'s ring slot reusable once the compute enqueued so far has run."""
        if not self.streams_weights:
            return
        if self._captured is not None:
            self._release_captured(layer)
            return
        if self._acquired is None or self._acquired % self.num_layers != layer:
            raise RuntimeError(f"rank {self.rank} released MoE layer {layer}, which is not acquired")
        slot = self.slot_of_layer(layer)
        if self._cuda:
            self._released[slot].record(torch.cuda.current_stream(self.device))
        self._acquired = None
        self._next_to_acquire += 1
        # Start the gather that reuses this slot now, so it overlaps the next layer's compute.
        self._issue_up_to(self._next_to_acquire + self.prefetch_depth)

    def order_after_side_stream(self) -> None:
        """Make the current stream wait for every gather issued so far (no host wait).

        An engine calls this before it captures or replays a CUDA graph that runs MoE layers:
        a replay cannot see the eager gathers still in flight on the side stream, and would
        otherwise write the ring slots under them.
        """
        if self._cuda and self.streams_weights and not self._capturing():
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)

    def close(self) -> None:
        """Wait for every gather still in flight (e.g. the next pass's prefetch) to finish."""
        for seq in sorted(self._in_flight):
            self._wait(seq, *self._in_flight.pop(seq))
        if self._cuda and self.streams_weights:
            self._side_stream.synchronize()

    # -- eager path -----------------------------------------------------------------------
    def _issue_up_to(self, last_seq: int) -> None:
        while self._next_to_issue <= last_seq:
            seq = self._next_to_issue
            slot = self.slot_of_layer(seq % self.num_layers)
            if self._slot_seq[slot] >= self._next_to_acquire:
                return  # the slot's current layer has not been released yet
            self._issue(seq)
            self._next_to_issue += 1

    def _issue(self, seq: int) -> None:
        layer = seq % self.num_layers
        slot = self.slot_of_layer(layer)
        self._slot_seq[slot] = seq
        if self._slot_layer[slot] == layer:
            return  # a slot that only ever holds this layer: gathered once, kept
        self._check_stalled()
        buffers = self._slots[slot]
        if self._cuda:
            with torch.cuda.stream(self._side_stream):
                if self._slot_layer[slot] is not None:
                    self._wait_for_release(slot)
                handles = [self.transport.gather(layer, name, out) for name, out in buffers.items()]
                self._gathered[slot].record(self._side_stream)
        else:
            handles = [self.transport.gather(layer, name, out) for name, out in buffers.items()]
        self._slot_layer[slot] = layer
        self._in_flight[seq] = (handles, time.monotonic())

    def _wait_for_release(self, slot: int) -> None:
        """The side stream waits until the slot's previous layer has been computed."""
        self._side_stream.wait_event(self._released[slot])

    def _wait(self, seq: int, handles: list[GatherHandle], issued_at: float) -> None:
        # A gather issued before passes that moved tokens may be long done: wait at least a second.
        remaining = max(self.timeout_s - (time.monotonic() - issued_at), 1.0)
        try:
            for handle in handles:
                handle.wait(remaining)
        except GatherTimeoutError as exc:
            raise GatherTimeoutError(
                f"expert-weight gather for MoE layer {seq % self.num_layers} did not complete on "
                f"rank {self.rank} of {self.transport.world_size} within {self.timeout_s:.0f} s "
                f"(transport {self.transport.name}): {exc}. A peer rank died or skipped this layer; "
                "every rank must run every MoE layer, with an empty batch if it has no tokens."
            ) from exc

    def _check_stalled(self) -> None:
        """On CUDA, report the oldest gather if the device has not finished it in time."""
        if not self._cuda or not self._in_flight:
            return
        oldest = min(self._in_flight)
        _, issued_at = self._in_flight[oldest]
        slot = self.slot_of_layer(oldest % self.num_layers)
        if time.monotonic() - issued_at > self.timeout_s and not self._gathered[slot].query():
            raise GatherTimeoutError(
                f"expert-weight gather for MoE layer {oldest % self.num_layers} has not completed on "
                f"rank {self.rank} after {self.timeout_s:.0f} s (transport {self.transport.name})"
            )

    # -- captured path (CUDA graphs) ------------------------------------------------------
    def _capturing(self) -> bool:
        return self._cuda and torch.cuda.is_current_stream_capturing()

    def _captured_gathers(self, layer: int) -> list[int]:
        """The layers whose gathers a captured ``layer`` issues: the eager pass's, in order."""
        following = layer + 1
        if following < self.num_layers:
            # Layers below num_slots are in their slots when a pass starts; each later layer
            # is gathered while the one before it computes.
            return [following] if following >= self.num_slots else []
        # The pass ends: re-gather the slots it overwrote, as the eager pass's prefetch does.
        return [j for j in range(self.num_slots) if j + self.num_slots < self.num_layers]

    def _acquire_captured(self, layer: int) -> LayerExperts:
        if self._next_to_acquire < self.num_layers or self._acquired is not None:
            raise RuntimeError(
                f"MoE layer {layer} is being captured into a CUDA graph on rank {self.rank} before a "
                "whole eager forward pass has run: run one (the engine's warm-up) before capturing"
            )
        if self._captured is not None:
            raise RuntimeError(
                f"MoE layer {self._captured.layer} is still acquired in a CUDA-graph capture on rank "
                f"{self.rank}; release it before acquiring layer {layer}"
            )
        slot = self.slot_of_layer(layer)
        owed = self._captured_gathers(layer)
        # A gather into this layer's own slot must wait for its experts; those after it too,
        # so that the gathers keep the eager order (collective transports are in lockstep).
        into_own_slot = [i for i, j in enumerate(owed) if self.slot_of_layer(j) == slot]
        split = into_own_slot[0] if into_own_slot else len(owed)
        forked = self._fork_gathers(owed[:split])
        self._captured = _CapturedLayer(layer, owed[split:], [forked] if forked is not None else [])
        return self._layer_experts(layer)

    def _release_captured(self, layer: int) -> None:
        captured = self._captured
        if captured is None or captured.layer != layer:
            raise RuntimeError(f"rank {self.rank} released MoE layer {layer}, which is not acquired")
        forked = self._fork_gathers(captured.after_experts)
        if forked is not None:
            captured.joins.append(forked)
        compute = torch.cuda.current_stream(self.device)
        for done in captured.joins:  # a capture must end with every forked stream joined back
            compute.wait_event(done)
        self._captured = None

    def _fork_gathers(self, layers: Sequence[int]) -> torch.cuda.Event | None:
        """Gather ``layers`` on the side stream, forked from the current (capturing) stream."""
        if not layers:
            return None
        fork, done = torch.cuda.Event(), torch.cuda.Event()
        fork.record(torch.cuda.current_stream(self.device))
        self._side_stream.wait_event(fork)
        with torch.cuda.stream(self._side_stream):
            for layer in layers:
                for name, out in self._slots[self.slot_of_layer(layer)].items():
                    self.transport.gather(layer, name, out)
            done.record(self._side_stream)
        return done

    # -- set-up checks --------------------------------------------------------------------
    def _check_same_shapes_across_ranks(self) -> None:
        if not self.transport.is_collective or self.transport.world_size == 1 or not dist.is_initialized():
            return
        mine = sorted((name, tuple(shape), str(dtype)) for name, (shape, dtype) in self.expert_shapes.items())
        everyone: list[object] = [None] * self.transport.world_size
        dist.all_gather_object(everyone, mine, group=self.transport.group)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                raise ValueError(
                    f"expert shard shapes differ between rank {self.rank} {mine} and rank {rank} "
                    f"{theirs}: every rank must hold a [capacity, ...] shard of the same tensors"
                )


@dataclass
class _CapturedLayer:
    """A layer acquired inside a CUDA-graph capture: gathers still to fork, and to join."""

    layer: int
    after_experts: list[int]
    joins: list[torch.cuda.Event]


def _check_shards(
    layer_shards: Sequence[Mapping[str, torch.Tensor]], capacity: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every layer has the same tensor names, per-expert shapes and dtypes; dim 0 is capacity."""
    first = layer_shards[0]
    signature = {name: (tuple(t.shape[1:]), t.dtype) for name, t in first.items()}
    if not signature:
        raise ValueError("MoE layer 0 has no expert tensors")
    for layer, shards in enumerate(layer_shards):
        if set(shards) != set(signature):
            raise ValueError(
                f"MoE layer {layer} has expert tensors {sorted(shards)} but layer 0 has {sorted(signature)}"
            )
        for name, tensor in shards.items():
            shape, dtype = signature[name]
            if tensor.dim() == 0 or tensor.shape[0] != capacity or tuple(tensor.shape[1:]) != shape:
                raise ValueError(
                    f"MoE layer {layer} shard {name!r} has shape {tuple(tensor.shape)}, expected "
                    f"{(capacity, *shape)} (capacity={capacity} experts per rank)"
                )
            if tensor.dtype != dtype:
                raise ValueError(f"MoE layer {layer} shard {name!r} is {tensor.dtype}, layer 0's is {dtype}")
    return signature
