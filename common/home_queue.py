"""The router's global queue, partitioned by *home* replica.

When every replica is at its bound, requests wait in the router. Where they wait decides what
they cost later: a request whose prefix one replica holds is cheap only there. So a waiting
request is queued at a home — the replica that holds, or is about to hold, most of its
prefix — and a replica with room serves its own home first::

    [enqueue] -> heap of its home (priority key) + its blocks counted at that home
    [replica r has room] -> head of r's heap, or (r's empty) one near another's top -> dispatched

"About to hold" is what :meth:`HomeQueues.shared_depth` answers: the blocks that requests
already waiting at a home have, so a burst of requests with a new prefix gathers at one
replica before the first of them is dispatched (and before the router's prefix index, which
records dispatches, knows the prefix). Prompts' block hashes are chained
(:mod:`.prefix_index`), so a block shared with a waiting request implies all blocks before it.

Each heap is ordered by a caller-given priority key (FIFO on ties); removal is lazy (a
cancelled, dispatched or moved request's slot is skipped when it reaches the top).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from zeroprefill.common.prefix_index import leading_blocks_in


@dataclass(eq=False)
class QueuedRequest:
    """A waiting request and what it was charged at its home when queued."""

    request: Any
    chains: tuple[tuple[int, ...], ...]
    excluded: frozenset[int]
    home: int
    cost_flops: int
    key: float = field(default=0.0, repr=False)
    sequence: int = field(default=0, repr=False)
    queued: bool = field(default=True, repr=False)


def _live(sequence: int, entry: QueuedRequest) -> bool:
    """Whether a heap slot still holds its entry (not dispatched, cancelled or moved since)."""
    return entry.queued and entry.sequence == sequence


class HomeQueues:
    """One priority heap and one count of waiting requests' blocks per home.

    Args:
        num_homes: homes indexed ``0 .. num_homes - 1`` (the router adds one for requests
            that no healthy replica may take).
    """

    def __init__(self, num_homes: int) -> None:
        self._heaps: list[list[tuple[float, int, QueuedRequest]]] = [[] for _ in range(num_homes)]
        self._blocks: list[Counter[int]] = [Counter() for _ in range(num_homes)]
        self._flops = [0] * num_homes
        self._sizes = [0] * num_homes
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return sum(self._sizes)

    def __iter__(self) -> Iterator[QueuedRequest]:
        for heap in self._heaps:
            for _, sequence, entry in heap:
                if _live(sequence, entry):
                    yield entry

    def size(self, home: int) -> int:
        return self._sizes[home]

    def backlog_flops(self, home: int | None = None) -> int:
        """FLOPs queued at ``home`` (all homes: None), as charged at their homes when queued."""
        return sum(self._flops) if home is None else self._flops[home]

    def push(self, entry: QueuedRequest, key: float) -> None:
        """Queue ``entry`` at ``entry.home`` with priority ``key`` (lower first; FIFO on ties)."""
        entry.key, entry.sequence, entry.queued = key, next(self._sequence), True
        heapq.heappush(self._heaps[entry.home], (key, entry.sequence, entry))
        self._flops[entry.home] += entry.cost_flops
        self._sizes[entry.home] += 1
        for chain in entry.chains:
            self._blocks[entry.home].update(chain)

    def head(self, home: int) -> QueuedRequest | None:
        """The highest-priority request waiting at ``home`` (left queued)."""
        heap = self._heaps[home]
        while heap and not _live(heap[0][1], heap[0][2]):
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def near_head(self, home: int, count: int) -> list[QueuedRequest]:
        """Up to ``count`` requests waiting at ``home`` from the top of its heap (the head first;
        the rest in heap order, which is near, not exactly, priority order)."""
        head = self.head(home)
        if head is None:
            return []
        entries = [head]
        for _, sequence, entry in self._heaps[home][1:]:
            if len(entries) == count:
                break
            if _live(sequence, entry):
                entries.append(entry)
        return entries

    def remove(self, entry: QueuedRequest) -> None:
        """Take ``entry`` out (dispatched or cancelled); its heap slot is dropped lazily."""
        if not entry.queued:
            raise ValueError(f"{entry.request!r} is not queued")
        entry.queued = False
        self._flops[entry.home] -= entry.cost_flops
        self._sizes[entry.home] -= 1
        blocks = self._blocks[entry.home]
        for chain in entry.chains:
            for block_hash in chain:
                blocks[block_hash] -= 1
                if not blocks[block_hash]:
                    del blocks[block_hash]

    def shared_depth(self, chain: Sequence[int], home: int) -> int:
        """Leading blocks of ``chain`` that some request waiting at ``home`` also has."""
        return leading_blocks_in(chain, self._blocks[home])

    def count_with(self, home: int, block_hash: int) -> int:
        """Requests waiting at ``home`` with ``block_hash`` (so the prefix up to it) in a chain."""
        return self._blocks[home].get(block_hash, 0)

    def sharing(self, home: int, marks: Sequence[tuple[int, int]]) -> list[QueuedRequest]:
        """Requests waiting at ``home`` with a chain whose block ``i`` is ``block_hash`` for some
        ``(i, block_hash)`` in ``marks`` (chained hashes: they share the prefix up to it), in
        priority order."""
        found = [
            (key, sequence, entry) for key, sequence, entry in self._heaps[home]
            if _live(sequence, entry)
            and any(len(chain) > i and chain[i] == block_hash for chain in entry.chains for i, block_hash in marks)
        ]
        return [entry for *_, entry in sorted(found, key=lambda item: item[:2])]

    def move(self, entry: QueuedRequest, home: int, cost_flops: int, key: float) -> None:
        """Queue ``entry`` at another ``home``, charged ``cost_flops`` there, with priority ``key``."""
        self.remove(entry)
        entry.home, entry.cost_flops = home, cost_flops
        self.push(entry, key)

    def drain_home(self, home: int) -> list[QueuedRequest]:
        """Take every request waiting at ``home`` out, in priority order."""
        entries = [entry for _, sequence, entry in sorted(self._heaps[home], key=lambda item: item[:2])
                   if _live(sequence, entry)]
        for entry in entries:
            self.remove(entry)
        self._heaps[home].clear()
        return entries
