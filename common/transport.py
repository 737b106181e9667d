"""Transports that assemble one MoE layer's expert shards into a full gather buffer.

A transport moves *weights*, never activations: every rank contributes its shard
``[capacity, ...]`` of a named expert tensor and receives all ranks' shards in rank order,
``[world_size * capacity, ...]``. The streamer (``streamer.py``) decides *when* to gather and
into which ring slot; a transport only decides *how*:

- :class:`GlooAllGather`: ``torch.distributed`` all-gather over gloo (CPU; tests, CPU serving).
  Asynchronous on gloo's worker threads, so it overlaps the caller's compute on CPU too.
- :class:`NcclAllGather`: ``all_gather_into_tensor`` over NCCL, enqueued on the streamer's
  side stream. SM-based: its kernels share SMs and HBM with the compute they hide behind.
- :class:`CopyEngineGather`: every rank's shards live in torch symmetric memory; a gather is
  ``world_size - 1`` peer-to-peer ``cudaMemcpyAsync`` pulls on the side stream, executed by
  the copy engines, not SMs (about half the compute slowdown of NCCL: docs/design.md). Expert
  weights are read-only while serving, so a pull needs no handshake with the peer: no
  lockstep, no barrier per layer.

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

from zeroprefill.common.hardware import GPU_TRANSPORTS

TRANSPORTS = ("gloo", *GPU_TRANSPORTS)

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

    @abstractmethod
    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        """Fill ``out`` (``[world_size * capacity, ...]``) with all ranks' shards of ``name``."""


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

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        self._handles: list[object] = []
        self._peer_views: list[dict[str, list[torch.Tensor]]] = []
        self._device: torch.device | None = None

    @property
    def is_collective(self) -> bool:
        return False

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
        dist.barrier(group=self.group or dist.group.WORLD)  # every peer has written its shards

    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        views = self._peer_views[layer][name]
        capacity = views[0].shape[0]
        # Remote shards first (they take longest), the local shard last (HBM copy).
        order = [p for p in range(self.world_size) if p != self.rank] + [self.rank]
        for peer in order:
            out[peer * capacity : (peer + 1) * capacity].copy_(views[peer], non_blocking=True)
        return GatherHandle()


def _has_symmetric_memory() -> bool:
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return True


def make_transport(name: str, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> GatherTransport:
    """Build a transport by name; ``"auto"`` picks the measured-fastest one for the device.

    ``auto``: gloo on CPU; on CUDA the copy engine when torch has symmetric memory (it halves
    the compute slowdown of NCCL: docs/design.md), else NCCL.
    """
    if name == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if not on_cuda:
            name = "gloo"
        else:
            name = "copy_engine" if _has_symmetric_memory() else "nccl"
    if name == "gloo":
        return GlooAllGather(group)
    if name == "nccl":
        return NcclAllGather(group)
    if name == "copy_engine":
        return CopyEngineGather(group)
    raise ValueError(f"unknown transport {name!r}; choose one of {('auto', *TRANSPORTS)}")
