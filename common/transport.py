"""Transports that assemble one MoE layer's expert shards into a full gather buffer.

A transport moves *weights*, never activations: every rank contributes its shard
``[capacity, ...]`` of a named expert tensor and receives the other ranks' shards into a gather
buffer of :meth:`GatherTransport.gathered_rows` rows, each peer's shard at
:meth:`GatherTransport.gathered_row_of_rank`. A rank's own shard is read where it lives, never
copied; a collective's buffer still has room for it (AllGather writes every rank's part), the
copy engine's holds the others' only. The streamer (``streamer.py``) decides *when* to gather
and into which ring slot; a transport only decides *how*:

- :class:`GlooAllGather`: ``torch.distributed`` all-gather over gloo (CPU; tests, CPU serving).
  Asynchronous on gloo's worker threads, so it overlaps the caller's compute on CPU too.
- :class:`NcclAllGather`: ``all_gather_into_tensor`` over NCCL, enqueued on the streamer's
  side stream. SM-based: its kernels share SMs and HBM with the compute they hide behind.
- :class:`CopyEngineGather`: every rank's shards live in torch symmetric memory; a gather is
  ``world_size - 1`` peer-to-peer ``cudaMemcpyAsync`` pulls on the side stream, executed by
  the copy engines, not SMs (about half the compute slowdown of NCCL: docs/design.md). Expert
  weights are read-only while serving, so a pull needs no handshake with the peer: no
  lockstep, no barrier per layer. Its buffer holds only the N-1 remote shards. With
  ``copy_streams`` > 1 each remote shard is pulled in
  that many chunks of experts on as many streams at once, so several copy engines share it
  (one copy engine may not fill an NVLink; ``zeroprefill calibrate`` measures 1, 2 and 4).

All transports are used the same way: every MoE layer's shards are handed over once, in
layer order — ``adopt(shards)`` per layer as an engine loads them, or ``register(layer_shards)``
for all at once — then ``gather(layer, name, out)`` per tensor per layer, on whatever stream
is current, returning a :class:`GatherHandle`. Adopting may move a shard into memory the
transport can share; it replaces the tensor in the caller's dict, so the original is freed
as soon as nobody else holds it (an engine adopting layer by layer as it loads never holds
two copies of the experts).
"""

from __future__ import annotations

import datetime
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist

from zeroprefill.common.transport_choice import resolve_transport

# torch 2.13 renames all_gather_into_tensor to all_gather_single (the old name warns).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GatherTimeoutError(RuntimeError):
    """A weight gather did not complete in time (a peer died or diverged from lockstep)."""


class GatherHandle:
    """Completion of one issued gather.

    On CUDA, ordering is by stream: the gather is complete for any work enqueued after it on
    the same stream, so :meth:`wait` only orders the *current* stream. On CPU, :meth:`wait`
    blocks the calling thread until the data has arrived, up to ``timeout_s``.
    """

    def __init__(self, work: dist.Work | None = None) -> None:
        self._work = work

    def wait(self, timeout_s: float) -> None:
        if self._work is None:
            return
        try:
            completed = self._work.wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:  # gloo raises on timeout or a dead peer
            raise GatherTimeoutError(str(exc).splitlines()[0]) from exc
        if completed is False:
            raise GatherTimeoutError(f"no completion after {timeout_s:.0f} s")
        self._work = None  # done: the handle no longer keeps the collective (and its tensors) alive


class GatherTransport(ABC):
    """How a layer's expert shards become one gathered tensor on every rank."""

    name: str

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self._adopted: list[dict[str, torch.Tensor]] = []

    @property
    def num_layers(self) -> int:
        """How many layers have been handed over."""
        return len(self._adopted)

    def adopt(self, shards: dict[str, torch.Tensor]) -> None:
        """Take the next layer's shards over (collective for some transports: every rank, in order).

        Replaces tensors in ``shards`` by the ones :meth:`gather` will read.
        """
        self._adopt(shards)
        self._adopted.append(shards)

    def register(self, layer_shards: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Hand over every layer not adopted yet; returns all layers' shards, in order.

        ``layer_shards`` lists every layer: those already adopted (the same dicts) first.
        """
        if len(layer_shards) < self.num_layers or any(
            given is not adopted for given, adopted in zip(layer_shards, self._adopted)
        ):
            raise ValueError(
                f"{self.name}: {self.num_layers} layers were adopted already; register must list them "
                "first, as the same dicts"
            )
        for shards in layer_shards[self.num_layers :]:
            self.adopt(shards)
        self._after_register()
        return list(self._adopted)

    def _adopt(self, shards: dict[str, torch.Tensor]) -> None:
        """Transport-specific adoption of one layer (default: use the tensors as they are)."""

    def _after_register(self) -> None:
        """Runs once every layer is adopted (default: nothing)."""

    @property
    def is_collective(self) -> bool:
        """True if every rank must issue every gather in the same order (lockstep)."""
        return True

    def gathered_rows(self, capacity: int) -> int:
        """Expert rows of a gather buffer for shards of ``capacity`` experts (all ranks' by default)."""
        return self.world_size * capacity

    def gathered_row_of_rank(self, rank: int, capacity: int) -> int | None:
        """First row of ``rank``'s shard in a gather buffer; None if the buffer has no copy of it."""
        return rank * capacity

    @abstractmethod
    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        """Fill ``out`` (``[gathered_rows(capacity), ...]``) with the other ranks' shards of ``name``."""


class _ProcessGroupAllGather(GatherTransport):
    """AllGather through ``torch.distributed`` on the registered shards."""

    def _adopt(self, shards: dict[str, torch.Tensor]) -> None:
        for name, tensor in shards.items():
            shards[name] = tensor.contiguous()

    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        shard = self._adopted[layer][name]
        if self.world_size == 1:
            out.copy_(shard, non_blocking=True)
            return GatherHandle()
        # A gather copies bytes: byte views let every dtype through (gloo has no float8).
        work = _all_gather_single(out.view(torch.uint8), shard.view(torch.uint8), group=self.group, async_op=True)
        return self._after_issue(work)

    def _after_issue(self, work: dist.Work) -> GatherHandle:
        return GatherHandle(work)


class GlooAllGather(_ProcessGroupAllGather):
    name = "gloo"


class NcclAllGather(_ProcessGroupAllGather):
    name = "nccl"

    def _after_issue(self, work: dist.Work) -> GatherHandle:
        # Make the current (side) stream wait for NCCL's internal stream; the host does not block.
        work.wait()
        return GatherHandle()


class CopyEngineGather(GatherTransport):
    """Peer pulls from torch symmetric memory with ``cudaMemcpyAsync`` (copy engines, no SMs)."""

    name = "copy_engine"

    def __init__(self, group: dist.ProcessGroup | None = None, copy_streams: int = 1) -> None:
        super().__init__(group)
        if copy_streams < 1:
            raise ValueError(f"copy_streams must be at least 1, got {copy_streams}")
        self.copy_streams = copy_streams
        self._handles: list[object] = []
        self._peer_views: list[dict[str, list[torch.Tensor]]] = []
        self._device: torch.device | None = None
        self._streams: list[torch.cuda.Stream] = []  # copy_streams > 1: made at registration, before any capture

    @property
    def is_collective(self) -> bool:
        return False

    def gathered_rows(self, capacity: int) -> int:
        return (self.world_size - 1) * capacity  # the remote shards only: the local one is read in place

    def gathered_row_of_rank(self, rank: int, capacity: int) -> int | None:
        if rank == self.rank:
            return None
        return (rank if rank < self.rank else rank - 1) * capacity

    def _adopt(self, shards: dict[str, torch.Tensor]) -> None:
        """Copy one layer's shards into a symmetric buffer of its own; ``shards`` then holds the copies.

        One buffer per layer: the original of each layer is freed before the next is copied,
        so the peak is the shards plus one layer (one pool for all would need twice the
        experts' memory at once). Collective over the group: every rank, every layer, in order.
        """
        import torch.distributed._symmetric_memory as symm_mem

        if not shards:
            raise ValueError("a MoE layer with no expert shards to adopt")
        group = self.group or dist.group.WORLD
        if not self._adopted and hasattr(symm_mem, "enable_symm_mem_for_group"):  # before torch 2.9
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(group.group_name)
        names = list(shards)
        sizes = [shards[name].numel() * shards[name].element_size() for name in names]
        offsets = [sum(-(-size // 256) * 256 for size in sizes[:i]) for i in range(len(names))]  # 256-byte aligned
        device = self._device = shards[names[0]].device
        buffer = symm_mem.empty(offsets[-1] + -(-sizes[-1] // 256) * 256, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buffer, group.group_name)
        views: dict[str, list[torch.Tensor]] = {}
        for name, offset, size in zip(names, offsets, sizes):
            shape, dtype = tuple(shards[name].shape), shards[name].dtype
            local = buffer[offset : offset + size].view(dtype).view(shape)
            local.copy_(shards[name])
            shards[name] = local  # the original goes once nobody else holds it
            views[name] = [
                local if peer == self.rank else handle.get_buffer(peer, shape, dtype, offset // local.element_size())
                for peer in range(self.world_size)
            ]
        torch.cuda.current_stream(device).synchronize()  # copies done before the originals are freed
        torch.cuda.empty_cache()  # their memory back to the driver, for the next layer's buffer
        self._handles.append(handle)  # keeps the peers' mappings alive
        self._peer_views.append(views)

    def _after_register(self) -> None:
        torch.cuda.synchronize(self._device)
        if self.copy_streams > 1:
            self._streams = [torch.cuda.Stream(self._device) for _ in range(self.copy_streams)]
        dist.barrier(group=self.group or dist.group.WORLD)  # every peer has written its shards

    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        views = self._peer_views[layer][name]
        capacity = views[0].shape[0]
        remote = [p for p in range(self.world_size) if p != self.rank]
        destinations = [out[row : row + capacity] for row in (self.gathered_row_of_rank(p, capacity) for p in remote)]
        if not self._streams:
            for peer, destination in zip(remote, destinations):
                destination.copy_(views[peer], non_blocking=True)
            return GatherHandle()
        # Each remote shard in chunks of experts, one chunk per stream, the streams forked from
        # the caller's stream and joined back to it: capture-safe, and ordered for the caller
        # as a single-stream gather is.
        current = torch.cuda.current_stream(out.device)
        for stream in self._streams:
            stream.wait_stream(current)
        for peer, destination in zip(remote, destinations):
            chunks = zip(destination.tensor_split(len(self._streams)), views[peer].tensor_split(len(self._streams)))
            for stream, (chunk_out, chunk_in) in zip(self._streams, chunks):
                with torch.cuda.stream(stream):
                    chunk_out.copy_(chunk_in, non_blocking=True)
        for stream in self._streams:
            current.wait_stream(stream)
        return GatherHandle()


class ResidentOnly(GatherTransport):
    """One rank holds every expert: nothing to gather, shards are used where they are loaded."""

    name = "none (one rank)"

    def __init__(self) -> None:
        super().__init__(None)
        self.rank, self.world_size = 0, 1

    def gathered_rows(self, capacity: int) -> int:
        return 0

    def gathered_row_of_rank(self, rank: int, capacity: int) -> int | None:
        return None

    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        raise RuntimeError("one rank holds every expert: there is nothing to gather")


def _has_symmetric_memory() -> bool:
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return True


def make_transport(name: str, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                   copy_streams: int = 1) -> GatherTransport:
    """Build a transport by name; ``"auto"`` as :func:`~zeroprefill.common.transport_choice.
    resolve_transport` decides for ``device`` (gloo off CUDA; on CUDA the copy engine where torch
    has symmetric memory, else NCCL). ``copy_streams``: the copy engine's concurrent pulls per
    remote shard (other transports ignore it). A group of one rank gets :class:`ResidentOnly`,
    whatever the name: it holds every expert.
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    name = resolve_transport(name, device_type, symmetric_memory=device_type == "cuda" and _has_symmetric_memory())
    if (dist.get_world_size(group) if dist.is_initialized() else 1) == 1:
        return ResidentOnly()
    if name == "gloo":
        return GlooAllGather(group)
    if name == "nccl":
        return NcclAllGather(group)
    return CopyEngineGather(group, copy_streams)
