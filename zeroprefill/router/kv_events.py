"""vLLM's KV-cache events -> the router's prefix index: what each replica really holds.

The router predicts a replica's prefix cache from its own dispatches (an LRU mirror). vLLM can
publish the real thing: with ``--kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://*:5557"}'`` its scheduler sends, after every step in
which its prefix cache changed, a msgpack ``KVEventBatch`` ``[ts, events, dp_rank]`` on a ZMQ
PUB socket as the frames ``(topic, seq: 8 bytes big-endian, payload)``; data-parallel rank
``r`` publishes on the endpoint's port + ``r``. The events this module uses::

    BlockStored(block_hashes, parent_block_hash, token_ids, block_size, medium, extra_keys, ...)
        -> the router's chained hash of each block, recomputed from its tokens and its parent
           (prefix_index.block_hashes' scheme), recorded for that replica  -> index.insert
    BlockRemoved(block_hashes, medium)  -> forgotten once no DP rank of the replica holds it
    AllBlocksCleared                    -> everything that rank held is forgotten

vLLM's own block hashes (sha256 or a per-process seed) cannot be compared with the router's,
so each stored block is translated once through its parent, and vLLM's hash -> the router's
is remembered per (replica, rank) until the block is removed. Skipped, and counted: blocks
whose parent the router never saw (it subscribed late or lost events), blocks of another
block size than the router's ``--block-size`` (the hashes cannot match: logged once per
replica with the fix), blocks outside GPU memory (offload tiers), of a secondary KV-cache
group, or with extra hash keys (LoRA, multimodal, cache salt: a plain prompt never matches
them). A gap or a restart in a rank's sequence numbers means lost events: that rank's blocks
are forgotten and learned again from what follows.

:class:`KVEventIndexer` applies decoded batches (no I/O, no vLLM import); :class:`KVEventFeed`
subscribes to the endpoints with ``pyzmq``'s asyncio sockets and feeds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zeroprefill.common.prefix_index import ROOT_BLOCK_HASH, PrefixIndex, block_hashes

logger = logging.getLogger(__name__)

_GPU_MEDIA = (None, "GPU")


@dataclass
class KVEventStats:
    """Per-replica counters (exposed as Prometheus metrics by the gateway)."""

    batches: int = 0
    stored_blocks: int = 0
    confirmed_blocks: int = 0  # stored blocks the index already had (predicted by the router's dispatch)
    removed_blocks: int = 0
    skipped_blocks: int = 0
    gaps: int = 0


@dataclass
class _RankState:
    """What one DP rank of a replica holds: vLLM block hash -> the router's block hash."""

    blocks: dict[Any, int] = field(default_factory=dict)
    last_seq: int | None = None


class KVEventIndexer:
    """Applies vLLM KV-event batches to a :class:`PrefixIndex`, one replica at a time.

    Args:
        index: the router policy's prefix index (replicas indexed as the backends).
        block_size: the router's hashing block size; blocks of another size are skipped.
    """

    def __init__(self, index: PrefixIndex, block_size: int) -> None:
        self.index = index
        self.block_size = block_size
        self.stats = [KVEventStats() for _ in range(index.num_replicas)]
        self._ranks: list[dict[int, _RankState]] = [{} for _ in range(index.num_replicas)]
        self._holders: list[dict[int, int]] = [{} for _ in range(index.num_replicas)]  # block -> ranks holding
        self._warned_block_size: set[int] = set()

    def apply(self, replica: int, rank: int, seq: int, batch: Sequence[Any]) -> None:
        """Apply one decoded ``KVEventBatch`` (``[ts, events, dp_rank?]``) received with ``seq``."""
        state = self._ranks[replica].setdefault(rank, _RankState())
        if state.last_seq is not None and seq != state.last_seq + 1:
            logger.warning("replica %d rank %d: KV events %d..%d lost (or the engine restarted); "
                           "forgetting its blocks", replica, rank, state.last_seq + 1, seq - 1)
            self.stats[replica].gaps += 1
            self.forget(replica, rank)
            state = self._ranks[replica].setdefault(rank, _RankState())
        state.last_seq = seq
        self.stats[replica].batches += 1
        for event in batch[1]:
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "BlockStored":
                self._stored(replica, state, event)
            elif kind == "BlockRemoved":
                self._removed(replica, state, event)
            elif kind == "AllBlocksCleared":
                self.forget(replica, rank)
                self._ranks[replica][rank] = _RankState(last_seq=seq)
                state = self._ranks[replica][rank]

    def forget(self, replica: int, rank: int) -> None:
        """Drop everything ``rank`` of ``replica`` was known to hold."""
        state = self._ranks[replica].pop(rank, None)
        if state is not None:
            self._release(replica, state.blocks.values())

    def _stored(self, replica: int, state: _RankState, event: dict) -> None:
        hashes = event.get("block_hashes") or []
        stats = self.stats[replica]
        block_size = event.get("block_size")
        if block_size != self.block_size:
            stats.skipped_blocks += len(hashes)
            if replica not in self._warned_block_size:
                self._warned_block_size.add(replica)
                logger.error("replica %d caches blocks of %s tokens but the router hashes %d-token blocks: "
                             "its KV events cannot be matched; restart the router with --block-size %s",
                             replica, block_size, self.block_size, block_size)
            return
        extra_keys = event.get("extra_keys") or ()
        if (event.get("medium") not in _GPU_MEDIA or event.get("group_idx") not in (None, 0)
                or any(key is not None for key in extra_keys)):
            stats.skipped_blocks += len(hashes)
            return
        vllm_parent = event.get("parent_block_hash")
        parent = ROOT_BLOCK_HASH if vllm_parent is None else state.blocks.get(vllm_parent)
        if parent is None:
            stats.skipped_blocks += len(hashes)
            return
        tokens = event.get("token_ids") or []
        if len(tokens) != len(hashes) * block_size:
            stats.skipped_blocks += len(hashes)
            return
        chain = block_hashes(tokens, block_size, parent)
        holders = self._holders[replica]
        for vllm_hash, ours in zip(hashes, chain):
            if vllm_hash not in state.blocks:
                state.blocks[vllm_hash] = ours
                holders[ours] = holders.get(ours, 0) + 1
        stats.stored_blocks += len(chain)
        # The leading run the index already has was predicted by the router's own dispatch of
        # the same tokens (or stored by another DP rank): a zero count while blocks are stored
        # means the router tokenises prompts differently from the engine.
        stats.confirmed_blocks += self.index.match(chain, replica)
        self.index.insert(chain, replica)

    def _removed(self, replica: int, state: _RankState, event: dict) -> None:
        if event.get("medium") not in _GPU_MEDIA:
            return
        ours = [state.blocks.pop(vllm_hash) for vllm_hash in event.get("block_hashes") or ()
                if vllm_hash in state.blocks]
        self.stats[replica].removed_blocks += len(ours)
        self._release(replica, ours)

    def _release(self, replica: int, blocks) -> None:
        holders = self._holders[replica]
        gone = []
        for block in blocks:
            count = holders.get(block, 0) - 1
            if count > 0:
                holders[block] = count
            else:
                holders.pop(block, None)
                gone.append(block)
        self.index.remove(gone, replica)


class KVEventFeed:
    """Subscribes to every replica's KV-event endpoints and applies what arrives.

    Args:
        indexer: where the events go.
        endpoints: per replica, its DP ranks' ZMQ endpoints in rank order (``()``: no feed for
            that replica), e.g. ``[("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558"), ()]``.
        topic: the publishers' topic (vLLM's ``kv_events_config.topic``, default empty).
    """

    def __init__(self, indexer: KVEventIndexer, endpoints: Sequence[Sequence[str]], topic: str = "") -> None:
        if len(endpoints) != indexer.index.num_replicas:
            raise ValueError(f"need KV-event endpoints for {indexer.index.num_replicas} replicas, "
                             f"got {len(endpoints)}")
        self.indexer = indexer
        self.endpoints = [tuple(e) for e in endpoints]
        self.topic = topic.encode()
        self._tasks: list[asyncio.Task] = []
        self._context = None

    async def start(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio

        self._context = zmq.asyncio.Context()
        decoder = msgspec.msgpack.Decoder()
        for replica, endpoints in enumerate(self.endpoints):
            for rank, endpoint in enumerate(endpoints):
                socket = self._context.socket(zmq.SUB)
                socket.setsockopt(zmq.SUBSCRIBE, self.topic)
                try:
                    socket.connect(endpoint)
                except zmq.ZMQError as exc:
                    socket.close(linger=0)
                    await self.close()
                    raise ValueError(f"KV-event endpoint {endpoint!r} of replica {replica}: {exc}") from exc
                self._tasks.append(asyncio.create_task(self._receive(socket, decoder, replica, rank, endpoint)))

    async def _receive(self, socket, decoder, replica: int, rank: int, endpoint: str) -> None:
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3:
                    continue
                _, seq_bytes, payload = frames
                try:
                    batch = decoder.decode(payload)
                    self.indexer.apply(replica, rank, int.from_bytes(seq_bytes, "big"), batch)
                except Exception:  # a malformed batch must not stop the feed
                    logger.exception("replica %d: bad KV-event batch from %s", replica, endpoint)
        finally:
            socket.close(linger=0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._context is not None:
            self._context.term()
            self._context = None
