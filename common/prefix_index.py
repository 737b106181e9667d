"""Which replica has which prompt prefix cached: chained block hashes with per-replica LRU.

An engine's prefix cache (vLLM's, SGLang's radix cache) stores KV in fixed-size token blocks.
A block is reusable only when every block before it is too, so a block is identified by a
hash *chained* over its parent's hash and its own tokens, exactly as vLLM's prefix cache does::

    h_0 = hash((ROOT, tokens[0:B]))        h_i = hash((h_{i-1}, tokens[i*B:(i+1)*B]))

Only full blocks are hashed (a trailing partial block is never reused). The router keeps, for
each replica, the set of block hashes it believes that replica holds, capacity-bounded to the
replica's cache size in blocks and evicted least-recently-used. When a request's blocks are
recorded, they are touched leaf first and root last, so under pressure a chain loses its tail
before its head — the order in which vLLM frees a finished request's blocks.

:class:`PrefixIndex` answers "how many leading blocks of this prompt does replica ``r``
hold?" for every replica in one call; :func:`block_hashes` turns token ids into the chain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence

#: Parent of the first block of every prompt.
ROOT_BLOCK_HASH = 0x5EED


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_BLOCK_HASH) -> list[int]:
    """Chained hashes of the full ``block_size``-token blocks of ``token_ids``.

    ``parent`` is the hash of the block before ``token_ids[0]`` (a chain continued from the
    middle, as a KV-cache event reports it); the root for a whole prompt.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    tokens = tuple(token_ids)
    hashes: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tokens[start : start + block_size]))
        hashes.append(parent)
    return hashes


def leading_blocks_in(hashes: Sequence[int], blocks: Container[int]) -> int:
    """How many leading hashes of a chain ``blocks`` contains (a chain breaks at its first miss)."""
    hit = 0
    for block_hash in hashes:
        if block_hash not in blocks:
            break
        hit += 1
    return hit


class PrefixIndex:
    """Per-replica LRU sets of cached block hashes.

    Args:
        num_replicas: replicas indexed ``0 .. num_replicas - 1``.
        capacity_blocks: blocks each replica's prefix cache holds (one number for all, or one
            per replica); the least recently used blocks beyond it are forgotten.
    """

    def __init__(self, num_replicas: int, capacity_blocks: int | Sequence[int]) -> None:
        if num_replicas <= 0:
            raise ValueError(f"num_replicas must be > 0, got {num_replicas}")
        capacities = (
            [int(capacity_blocks)] * num_replicas
            if isinstance(capacity_blocks, int)
            else [int(c) for c in capacity_blocks]
        )
        if len(capacities) != num_replicas or any(c < 0 for c in capacities):
            raise ValueError(
                f"capacity_blocks must be one count >= 0 or {num_replicas} of them, "
                f"got {capacity_blocks!r}"
            )
        self.capacity_blocks = capacities
        # Per replica: block hash -> when it was last recorded (a counter over all inserts).
        self._blocks: list[OrderedDict[int, int]] = [OrderedDict() for _ in capacities]
        self._clock = 0

    @property
    def num_replicas(self) -> int:
        return len(self._blocks)

    def cached_blocks(self, replica: int) -> int:
        """How many blocks the index currently attributes to ``replica``."""
        return len(self._blocks[replica])

    def match(self, hashes: Sequence[int], replica: int) -> int:
        """Leading blocks of ``hashes`` that ``replica`` holds (stops at the first miss)."""
        return leading_blocks_in(hashes, self._blocks[replica])

    def last_used(self, hashes: Sequence[int], blocks: int, replica: int) -> int:
        """When ``replica`` last recorded block ``blocks - 1`` of ``hashes`` (0: never / none)."""
        return self._blocks[replica].get(hashes[blocks - 1], 0) if blocks > 0 else 0

    def match_all(self, hashes: Sequence[int]) -> list[int]:
        """:meth:`match` for every replica."""
        return [self.match(hashes, replica) for replica in range(len(self._blocks))]

    def insert(self, hashes: Sequence[int], replica: int) -> None:
        """Record that ``replica`` now holds ``hashes`` (a prompt's chain), evicting LRU blocks."""
        blocks = self._blocks[replica]
        capacity = self.capacity_blocks[replica]
        self._clock += 1
        # Leaf first, root last: the root ends most recently used and is evicted last.
        for block_hash in reversed(hashes):
            if block_hash in blocks:
                blocks.move_to_end(block_hash)
            blocks[block_hash] = self._clock
        while len(blocks) > capacity:
            blocks.popitem(last=False)

    def remove(self, hashes: Sequence[int], replica: int) -> None:
        """Forget blocks a replica reported evicted (e.g. from vLLM's KV-cache events)."""
        blocks = self._blocks[replica]
        for block_hash in hashes:
            blocks.pop(block_hash, None)

    def clear(self, replica: int) -> None:
        """Forget everything about ``replica`` (it restarted or was replaced)."""
        self._blocks[replica].clear()
