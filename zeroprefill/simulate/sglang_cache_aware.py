"""sgl-router's cache-aware policy, re-implemented for the simulator.

``sgl-router/src/policies/cache_aware.rs`` and ``tree.rs``: per-worker approximate radix tree
of request text (here: token ids as characters), in-flight request counts as load; if
``max - min > balance_abs_threshold`` and ``max > min x balance_rel_threshold`` -> least
loaded; else the deepest prefix match's most recent worker if the match rate exceeds
``cache_threshold``, otherwise the worker with the smallest tree; LRU leaf eviction to
``max_tree_size`` every ``eviction_interval_s``. Defaults are the Python CLI's: 0.3, 64, 1.5,
120 s, 2^26.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from zeroprefill.simulate.policies import Dispatches, SimPolicy
from zeroprefill.simulate.workloads import SimRequest


class _TreeNode:
    """A radix-tree node: its text, its children by first token, each tenant's last access."""

    __slots__ = ("text", "children", "tenants", "parent")

    def __init__(self, text: tuple[int, ...], parent: _TreeNode | None) -> None:
        self.text = text
        self.children: dict[int, _TreeNode] = {}
        self.tenants: dict[int, float] = {}  # tenant -> last access time
        self.parent = parent


def _shared_prefix_length(text: tuple[int, ...], start: int, node_text: tuple[int, ...]) -> int:
    n = min(len(text) - start, len(node_text))
    if text[start : start + n] == node_text[:n]:
        return n
    low, high = 0, n  # text[start:start+low] matches, text[start:start+high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if text[start : start + mid] == node_text[:mid]:
            low = mid
        else:
            high = mid
    return low


class ApproximateTree:
    """sgl-router's ``tree.rs``: a radix tree whose nodes remember which tenants sent them."""

    def __init__(self, tenants: Sequence[int]) -> None:
        self.root = _TreeNode((), None)
        self.char_count = {t: 0 for t in tenants}
        for tenant in tenants:
            self.root.tenants[tenant] = 0.0

    def insert(self, text: tuple[int, ...], tenant: int, now_s: float) -> None:
        node = self.root
        node.tenants[tenant] = now_s
        index = 0
        while index < len(text):
            child = node.children.get(text[index])
            if child is None:
                leaf = _TreeNode(text[index:], node)
                leaf.tenants[tenant] = now_s
                node.children[text[index]] = leaf
                self.char_count[tenant] += len(leaf.text)
                return
            shared = _shared_prefix_length(text, index, child.text)
            if shared < len(child.text):  # split child into child.text[:shared] + rest
                upper = _TreeNode(child.text[:shared], node)
                upper.tenants = dict(child.tenants)
                child.text = child.text[shared:]
                child.parent = upper
                upper.children[child.text[0]] = child
                node.children[upper.text[0]] = upper
                child = upper
            if tenant not in child.tenants:
                self.char_count[tenant] += len(child.text)
            child.tenants[tenant] = now_s
            node = child
            index += shared

    def prefix_match(self, text: tuple[int, ...], now_s: float) -> tuple[int, int | None]:
        """(matched length, most recent tenant of the deepest matched node)."""
        node, index = self.root, 0
        while index < len(text):
            child = node.children.get(text[index])
            if child is None:
                break
            shared = _shared_prefix_length(text, index, child.text)
            index += shared
            node = child
            if shared < len(child.text):
                break
        if not node.tenants:
            return index, None
        tenant = max(node.tenants, key=node.tenants.__getitem__)
        walk: _TreeNode | None = node
        while walk is not None:
            walk.tenants[tenant] = now_s
            walk = walk.parent
        return index, tenant

    def smallest_tenant(self) -> int:
        return min(self.char_count, key=lambda t: (self.char_count[t], t))

    def evict_by_size(self, max_size: int) -> None:
        """LRU leaf eviction per tenant until each tenant's char count is ``<= max_size``."""
        if all(count <= max_size for count in self.char_count.values()):
            return
        heap: list[tuple[float, int, int, _TreeNode]] = []
        order = itertools.count()
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            for tenant in self._leaf_tenants(node):
                heapq.heappush(heap, (node.tenants[tenant], next(order), tenant, node))
        while heap:
            _, _, tenant, node = heapq.heappop(heap)
            if self.char_count[tenant] <= max_size or tenant not in node.tenants or node is self.root:
                continue
            self.char_count[tenant] -= len(node.text)
            del node.tenants[tenant]
            parent = node.parent
            if not node.children and not node.tenants and parent is not None:
                del parent.children[node.text[0]]
            if parent is not None and parent is not self.root and tenant in self._leaf_tenants(parent):
                heapq.heappush(heap, (parent.tenants[tenant], next(order), tenant, parent))

    @staticmethod
    def _leaf_tenants(node: _TreeNode) -> set[int]:
        below = set().union(*(child.tenants.keys() for child in node.children.values())) if node.children else set()
        return set(node.tenants) - below


@dataclass(frozen=True)
class CacheAwareConfig:
    """sgl-router's cache-aware knobs, Python CLI defaults."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_s: float = 120.0
    max_tree_size: int = 1 << 26


class SGLangCacheAware(SimPolicy):
    """``CacheAwarePolicy::select_worker`` over an :class:`ApproximateTree` (see the module docstring)."""

    name = "sglang_cache_aware"

    def __init__(self, num_replicas: int, config: CacheAwareConfig = CacheAwareConfig()) -> None:
        self.config = config
        self.load = [0] * num_replicas
        self.tree = ApproximateTree(range(num_replicas))
        self._next_eviction_s = config.eviction_interval_s

    def arrive(self, request: SimRequest, now_s: float) -> Dispatches:
        while now_s >= self._next_eviction_s:
            self.tree.evict_by_size(self.config.max_tree_size)
            self._next_eviction_s += self.config.eviction_interval_s
        max_load, min_load = max(self.load), min(self.load)
        imbalanced = (max_load - min_load > self.config.balance_abs_threshold
                      and max_load > min_load * self.config.balance_rel_threshold)
        if imbalanced:
            replica = min(range(len(self.load)), key=self.load.__getitem__)
        else:
            matched, tenant = self.tree.prefix_match(request.tokens, now_s)
            rate = matched / len(request.tokens) if request.tokens else 0.0
            replica = tenant if rate > self.config.cache_threshold and tenant is not None else self.tree.smallest_tenant()
        self.tree.insert(request.tokens, replica, now_s)
        self.load[replica] += 1
        return [(request, replica)]

    def complete(self, request: SimRequest, replica: int, now_s: float) -> Dispatches:
        self.load[replica] -= 1
        return []
