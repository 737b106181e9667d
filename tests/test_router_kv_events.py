"""vLLM KV-cache events -> the router's prefix index, on vLLM's own event classes and publisher."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

kv_events = pytest.importorskip("vllm.distributed.kv_events")
msgspec = pytest.importorskip("msgspec")

from zeroprefill.common.prefix_index import PrefixIndex, block_hashes  # noqa: E402
from zeroprefill.ports import free_port  # noqa: E402
from zeroprefill.router.cli import _kv_event_endpoints  # noqa: E402
from zeroprefill.router.kv_events import KVEventFeed, KVEventIndexer  # noqa: E402

BLOCK = 4
_ENCODER = msgspec.msgpack.Encoder()


def _stored(vllm_hashes, parent, tokens, block_size=BLOCK, medium="GPU", extra_keys=None):
    return kv_events.BlockStored(block_hashes=list(vllm_hashes), parent_block_hash=parent, token_ids=list(tokens),
                                 block_size=block_size, lora_id=None, medium=medium, lora_name=None,
                                 extra_keys=extra_keys)


def _removed(vllm_hashes, medium="GPU"):
    return kv_events.BlockRemoved(block_hashes=list(vllm_hashes), medium=medium)


def _wire(*events):
    """A batch as it crosses the socket: vLLM's encoder, then a plain msgpack decode."""
    return msgspec.msgpack.decode(_ENCODER.encode(kv_events.KVEventBatch(ts=time.time(), events=list(events))))


def _indexer(replicas: int = 2) -> KVEventIndexer:
    return KVEventIndexer(PrefixIndex(replicas, 1000), BLOCK)


def test_stored_blocks_enter_the_index_under_the_routers_own_chained_hashes():
    indexer = _indexer()
    tokens = list(range(100, 112))  # three blocks
    ours = block_hashes(tokens, BLOCK)
    indexer.index.insert(ours[:2], 1)  # the router predicted the first two when it dispatched
    # vLLM hashes are opaque (sha256 bytes, or ints from a per-process seed).
    indexer.apply(1, 0, 0, _wire(_stored([b"h0", b"h1"], None, tokens[:8])))
    indexer.apply(1, 0, 1, _wire(_stored([b"h2"], b"h1", tokens[8:])))  # continues the chain
    assert indexer.index.match(ours, 1) == 3
    assert indexer.index.match(ours, 0) == 0
    stats = indexer.stats[1]
    assert (stats.batches, stats.stored_blocks, stats.confirmed_blocks, stats.skipped_blocks) == (2, 3, 2, 0)
    # A longer prompt sharing the first two blocks matches exactly those.
    assert indexer.index.match(block_hashes(tokens[:8] + [7, 7, 7, 7], BLOCK), 1) == 2
    indexer.apply(1, 0, 2, _wire(_removed([b"h2"])))
    assert indexer.index.match(ours, 1) == 2
    assert indexer.stats[1].removed_blocks == 1


def test_blocks_the_router_cannot_match_are_skipped_and_counted(caplog):
    indexer = _indexer()
    tokens = list(range(8))
    with caplog.at_level(logging.ERROR):
        indexer.apply(0, 0, 0, _wire(_stored([1, 2], None, tokens, block_size=2 * BLOCK),
                                     _stored([1], None, tokens[:4], block_size=2 * BLOCK)))
    assert caplog.text.count("--block-size 8") == 1  # said once, with the fix
    indexer.apply(0, 0, 1, _wire(
        _stored([3], 999, tokens[:4]),  # a parent the router never saw
        _stored([4], None, tokens[:4], medium="CPU"),  # an offload tier, not the engine's GPU cache
        _stored([5], None, tokens[:4], extra_keys=[("salt",)]),  # salted: a plain prompt never hits it
    ))
    assert indexer.stats[0].skipped_blocks == 6
    assert indexer.stats[0].stored_blocks == 0
    assert indexer.index.cached_blocks(0) == 0


def test_a_block_stays_while_any_dp_rank_of_the_replica_holds_it():
    indexer = _indexer()
    tokens = list(range(50, 58))
    ours = block_hashes(tokens, BLOCK)
    indexer.apply(0, 0, 0, _wire(_stored([10, 11], None, tokens)))
    indexer.apply(0, 1, 0, _wire(_stored([90, 91], None, tokens)))  # rank 1: its own hash seed
    indexer.apply(0, 0, 1, _wire(_removed([10, 11])))
    assert indexer.index.match(ours, 0) == 2
    indexer.apply(0, 1, 1, _wire(kv_events.AllBlocksCleared()))
    assert indexer.index.match(ours, 0) == 0


def test_lost_events_or_an_engine_restart_forget_that_ranks_blocks():
    indexer = _indexer()
    tokens = list(range(20, 28))
    indexer.apply(0, 0, 0, _wire(_stored([1, 2], None, tokens)))
    indexer.apply(0, 0, 5, _wire())  # seq 1..4 never arrived
    assert indexer.stats[0].gaps == 1
    assert indexer.index.match(block_hashes(tokens, BLOCK), 0) == 0
    indexer.apply(0, 0, 6, _wire(_stored([1, 2], None, tokens)))
    indexer.apply(0, 0, 0, _wire())  # a restarted engine counts from 0 again
    assert indexer.stats[0].gaps == 2
    assert indexer.index.match(block_hashes(tokens, BLOCK), 0) == 0


def test_feed_reads_vllms_zmq_publisher():
    port = free_port()
    publisher = kv_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=f"tcp://*:{port}",
                                            replay_endpoint=None)
    tokens = list(range(300, 312))
    ours = block_hashes(tokens, BLOCK)

    async def run() -> KVEventIndexer:
        indexer = _indexer(1)
        feed = KVEventFeed(indexer, [(f"tcp://127.0.0.1:{port}",)])
        await feed.start()
        try:
            deadline = time.monotonic() + 20
            while indexer.index.match(ours, 0) < 3 and time.monotonic() < deadline:
                # PUB drops what is sent before the subscription is in place: send until seen.
                publisher.publish(kv_events.KVEventBatch(ts=time.time(), events=[
                    _stored([b"a", b"b", b"c"], None, tokens)]))
                await asyncio.sleep(0.1)
        finally:
            await feed.close()
        return indexer

    try:
        indexer = asyncio.run(run())
    finally:
        publisher.shutdown()
    assert indexer.index.match(ours, 0) == 3
    assert indexer.stats[0].stored_blocks >= 3 and indexer.stats[0].gaps == 0


def test_cli_validates_kv_event_endpoints():
    assert _kv_event_endpoints([], 2) == ()
    assert _kv_event_endpoints(["tcp://a:1,tcp://a:2", "ipc:///tmp/x"], 2) == (("tcp://a:1", "tcp://a:2"),
                                                                              ("ipc:///tmp/x",))
    with pytest.raises(ValueError, match="once per backend"):
        _kv_event_endpoints(["tcp://a:1"], 2)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        _kv_event_endpoints(["a:1"], 1)


def test_an_endpoint_zmq_rejects_is_a_value_error_naming_it():
    async def start() -> None:
        feed = KVEventFeed(_indexer(1), [("tcp://nohostport",)])
        await feed.start()

    with pytest.raises(ValueError, match="nohostport"):
        asyncio.run(start())
