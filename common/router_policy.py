"""Prefill-only routing policy: true-FLOPs cost, prefix affinity, step-aware dispatch.

A prefill-only request is known in full when it arrives, so its cost on each replica can be
computed before any GPU work::

    [RoutedRequest: prompts' token counts + block hashes]
        -> [PrefixIndex.match_all: leading cached blocks per replica]         (prefix_index.py)
        -> [request_flops(L, P): true FLOPs per replica, P = predicted hit]   (cost_model.py)
        -> [placement among replicas whose next forward has room: earliest
            estimated finish, then best prefix hit, then least outstanding]
        -> dispatched (outstanding FLOPs += cost)  |  queued at its home replica (no room)
    [complete / fail] -> outstanding FLOPs -= cost -> freed replicas pull from their homes

*Replica model*: a prefill-only engine runs one forward at a time over the requests it holds
(continuous batching without decode); requests that arrive while a forward runs wait for the
next one. A forward of ``F`` FLOPs takes ``max(F, saturation_flops) / flops_per_s`` — below
the saturation threshold it waits on the expert-weight stream (a floor). The policy mirrors
that per replica from its own dispatch/completion events: the *running* forward (what was
dispatched to it while idle, or was waiting when the previous forward's requests completed)
and the *next* forward (what was dispatched while one runs; an engine starts its next forward
before the router hears of the completions, so work sent in reply to them lands in the next
forward too). No engine feedback is needed.

*Placement*: the replica where the request finishes first: the end of the running forward
(estimated from its start and ``flops_per_s``; without a rate, its length in FLOPs) plus
``max(next + cost, saturation)``. Below the threshold extra work in a forward is free, so
replicas tie on the forward length and the earliest-ending running forward wins: a request
arriving just after a forward started on one replica goes to another whose forward is about
to end, instead of waiting a whole floor. Among equal finishes the best prefix hit wins
(affinity where it costs nothing), then the least outstanding work. A hit also shortens the
forward past the threshold, so it enters the finish estimate there.

*Bound*: the work waiting for a replica's next forward is kept under ``bound_flops`` (its
saturation threshold times a small factor) — enough to fill that forward past the threshold,
no more: work beyond it would only wait inside the engine, where it can no longer move to a
replica that frees up sooner. An empty next forward always takes one request, however large.
The running forward is not counted against the bound (it is already committed), so a replica
can be filling its next forward while the current one runs. Nor does a next forward exceed the
engine's token budget (``max_batch_tokens`` uncached tokens), past which the engine would
leave the rest for a forward after.

*Tail*: when less waits than would fill every healthy replica's next forward again, and nothing
arrived while the running forwards ran, the queue is the end of a backlog (a batch job's last
requests). Held back, it would make one more forward on some replicas while the others idle,
so it is dispatched at once past the bounds: largest first, each where it finishes first
(greedy list scheduling), within the token budget. A shallow queue that arrivals keep
refilling (the start of a backlog) is held back as usual.

*Global queue* (:mod:`.home_queue`): when no replica has room, a request waits at a *home*:
the replica that holds most of its prefix, counting requests already waiting there (so a burst
with a new prefix gathers at one replica); among replicas holding as much, the one that used
it last (so a copy used elsewhere ages out instead of being kept warm beside it), then the
least work queued and in flight. A replica with room serves its own home first — each prefix
keeps being served where it is cached, the affinity that sgl-router's cache-aware policy gets
by pinning, without its load thresholds. A replica whose home is empty does not idle
(work-conserving): it takes, from the top of the other homes, the request whose extra cost
(beyond its cost at home) per request sharing the prefix it lacks is least, and the requests
waiting at the victim with the prefix it brought move to the thief's home with it (hits there
now; moved while the thief's home stays below the victim's), so a prefix is copied once per
steal, not once per request; while the backlog could fill every healthy replica's next forward
(at least the sum of their bounds) it draws on the largest backlog only, below that on every
home. A waiting request is charged at its home as a hit on the prefix it shares with requests
already waiting there (one of them computes it, the rest hit it), so a burst of a new prefix
does not count as one miss per request in the backlogs that steals balance.

Each home is ordered shortest true FLOPs first (as charged at the home) with linear aging: the
key ``cost_flops - aging_flops_per_s * waited_s`` orders the same as the static ``cost_flops +
aging_flops_per_s * arrival_s``, which a heap keeps; every later arrival's key grows with its
arrival time, so a waiting request reaches the head of its home after a bounded number of
others: nothing starves. A head is dispatched strictly first (no overtaking within a home when
it does not fit). A drained replica's waiting requests move to new homes.

The policy is engine-agnostic and synchronous: the gateway (``zeroprefill.router``), the
simulator (``zeroprefill.simulate``) and engine-side load balancers drive it with their own
clocks (``now_s`` arguments; a request's ``arrival_s`` when omitted).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from zeroprefill.common.cost_model import request_flops
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.home_queue import HomeQueues, QueuedRequest
from zeroprefill.common.prefix_index import PrefixIndex
from zeroprefill.common.replica_load import ReplicaLoad

#: Waiting requests a replica with nothing of its own considers per home it may steal from.
STEAL_CANDIDATES = 32


@dataclass(frozen=True)
class PromptShape:
    """One prompt of a request: its length and the chained hashes of its full blocks."""

    num_tokens: int
    block_hashes: tuple[int, ...] = ()
    head_tokens: int = 1


@dataclass
class RoutedRequest:
    """A request as the policy sees it (a batch request carries several prompts)."""

    request_id: str
    prompts: Sequence[PromptShape]
    arrival_s: float

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.prompts)


@dataclass(frozen=True)
class Placement:
    """Where a request was dispatched and what it was charged there."""

    replica: int
    cost_flops: int
    cached_tokens: int
    new_tokens: int = 0


@dataclass
class PolicyStats:
    """Counters for metrics: prompt tokens dispatched and how many were predicted cached."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    queued_total: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class RouterPolicy:
    """True-FLOPs, prefix-aware, saturation-aware placement over ``len(bound_flops)`` replicas.

    Args:
        spec: the served model (for :func:`request_flops`).
        bound_flops: per-replica outstanding-FLOPs bound (saturation threshold x factor),
            one per replica; ``math.inf`` disables holding back.
        saturation_flops: per-replica saturation threshold (FLOPs of one forward that hides the
            weight stream); work below it finishes in one floor-bound forward anyway, so
            placement compares ``max(outstanding + cost, saturation)``. Empty: all zero.
        block_size: the engine's prefix-cache block size in tokens.
        cache_capacity_blocks: each replica's prefix cache size in blocks (LRU beyond it).
        aging_flops_per_s: priority a queued request gains per second waited; defaults to the
            smallest finite bound per second (a request that waited 1 s ranks like one a full
            bound cheaper).
        flops_per_s: per-replica effective compute rate (FLOP/s) to estimate when a running
            forward ends from its start time; empty: rank by forward lengths in FLOPs only.
        max_batch_tokens: the engines' budget of uncached tokens per forward (vLLM's
            ``--max-num-batched-tokens``): a next forward is not filled past it, since the
            engine would leave the rest for a forward after. None: no limit.
    """

    spec: MoEModelSpec
    bound_flops: Sequence[float]
    saturation_flops: Sequence[float] = ()
    block_size: int = 16
    cache_capacity_blocks: int | Sequence[int] = 1 << 20
    aging_flops_per_s: float | None = None
    flops_per_s: Sequence[float] = ()
    max_batch_tokens: int | None = None
    replicas: list[ReplicaLoad] = field(init=False)
    index: PrefixIndex = field(init=False)
    stats: PolicyStats = field(init=False)

    def __post_init__(self) -> None:
        if not self.bound_flops:
            raise ValueError("bound_flops needs one bound per replica, got none")
        if any(not b > 0 for b in self.bound_flops):
            raise ValueError(f"bound_flops must all be > 0, got {list(self.bound_flops)}")
        saturation = list(self.saturation_flops) if self.saturation_flops else [0.0] * len(self.bound_flops)
        if len(saturation) != len(self.bound_flops) or any(f < 0 for f in saturation):
            raise ValueError(
                f"saturation_flops needs {len(self.bound_flops)} values >= 0, got {list(saturation)}"
            )
        rates = [float(r) for r in self.flops_per_s]
        if rates and (len(rates) != len(self.bound_flops) or any(not r > 0 for r in rates)):
            raise ValueError(f"flops_per_s needs {len(self.bound_flops)} values > 0, got {rates}")
        rates = rates or [0.0] * len(self.bound_flops)
        self.replicas = [ReplicaLoad(float(b), float(f), float(r))
                         for b, f, r in zip(self.bound_flops, saturation, rates)]
        self.index = PrefixIndex(len(self.replicas), self.cache_capacity_blocks)
        self.stats = PolicyStats()
        if self.aging_flops_per_s is None:
            finite = [b for b in self.bound_flops if math.isfinite(b)]
            self.aging_flops_per_s = min(finite) if finite else 0.0
        if self.max_batch_tokens is not None and self.max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be > 0, got {self.max_batch_tokens}")
        if self.aging_flops_per_s < 0:
            raise ValueError(f"aging_flops_per_s must be >= 0, got {self.aging_flops_per_s}")
        # Home num_replicas holds requests that no healthy replica may take.
        self._queue = HomeQueues(len(self.replicas) + 1)
        self._in_flight: dict[str, Placement] = {}
        self._now_s = 0.0
        self._last_submit_s = -math.inf
        # request_flops is pure in (tokens, cached, head) for the fixed spec and costs ~10 us:
        # memoised, since prompt lengths repeat (placement evaluates it per replica).
        self._request_flops = functools.lru_cache(maxsize=1 << 16)(functools.partial(request_flops, self.spec))

    # ----------------------------------------------------------------------------- queries

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_per_replica(self) -> list[int]:
        """Requests waiting at each replica as their home (those no replica may take: none)."""
        return [self._queue.size(replica) for replica in range(self.num_replicas)]

    @property
    def queued_flops_per_replica(self) -> list[int]:
        """True FLOPs waiting at each replica as their home, as charged there when queued."""
        return [self._queue.backlog_flops(replica) for replica in range(self.num_replicas)]

    def placement_of(self, request_id: str) -> Placement | None:
        return self._in_flight.get(request_id)

    def cost_on(self, request: RoutedRequest, replica: int) -> tuple[int, int]:
        """``(true FLOPs, predicted cached tokens)`` of ``request`` on ``replica`` now."""
        return self._cost(request, [self.index.match(prompt.block_hashes, replica) for prompt in request.prompts])

    def _cost(self, request: RoutedRequest, hit_blocks: Sequence[int]) -> tuple[int, int]:
        """``(true FLOPs, cached tokens)`` of ``request`` with ``hit_blocks`` leading blocks of each
        prompt cached."""
        flops = 0
        cached = 0
        for prompt, blocks in zip(request.prompts, hit_blocks):
            # An engine always recomputes at least the last prompt token.
            hit_tokens = min(blocks * self.block_size, max(prompt.num_tokens - 1, 0))
            flops += self._request_flops(prompt.num_tokens, hit_tokens, prompt.head_tokens)
            cached += hit_tokens
        return flops, cached

    # ----------------------------------------------------------------------------- events

    def submit(
        self, request: RoutedRequest, excluded: frozenset[int] = frozenset(), now_s: float | None = None
    ) -> list[tuple[RoutedRequest, Placement]]:
        """Queue ``request`` and dispatch what fits; returns every request dispatched now.

        The list holds ``request`` itself unless it must wait (all replicas at their bound, or
        requests ahead of it in its home queue do not fit yet); it is then dispatched by a
        later :meth:`complete`, :meth:`fail` or :meth:`set_healthy`. ``excluded`` replicas
        (e.g. ones that already failed this request) are not chosen for it. ``now_s`` is the
        caller's clock (default: ``request.arrival_s``).
        """
        if request.request_id in self._in_flight:
            raise ValueError(f"request {request.request_id!r} is already in flight")
        now_s = request.arrival_s if now_s is None else now_s
        self._last_submit_s = now_s
        if not self.queue_depth:
            placement = self._try_place(request, excluded, now_s)
            if placement is not None:
                return [(request, placement)]
        self._enqueue(request, excluded)
        self.stats.queued_total += 1
        return self.drain_queue(now_s)

    def complete(self, request_id: str, now_s: float | None = None) -> list[tuple[RoutedRequest, Placement]]:
        """A request finished: release its FLOPs; returns queued requests dispatched now."""
        placement = self._release(request_id, now_s)
        self.replicas[placement.replica].completed_total += 1
        return self.drain_queue(now_s)

    def fail(self, request_id: str, now_s: float | None = None) -> list[tuple[RoutedRequest, Placement]]:
        """A request failed on its replica: release its FLOPs (the caller may resubmit it)."""
        placement = self._release(request_id, now_s)
        self.replicas[placement.replica].failed_total += 1
        return self.drain_queue(now_s)

    def set_healthy(
        self, replica: int, healthy: bool, now_s: float | None = None
    ) -> list[tuple[RoutedRequest, Placement]]:
        """Drain (``False``) or restore (``True``) a replica; returns requests dispatched now.

        Requests waiting at a drained replica, and on recovery those that no healthy replica
        could take, are queued again at new homes.
        """
        load = self.replicas[replica]
        if load.healthy == healthy:
            return []
        load.healthy = healthy
        if not healthy:
            # Whatever it had cached is gone if it died; forget it either way.
            self.index.clear(replica)
        for entry in self._queue.drain_home(replica if not healthy else self.num_replicas):
            self._enqueue(entry.request, entry.excluded)
        return self.drain_queue(now_s)

    def cancel(self, request_id: str) -> bool:
        """Drop a queued request (client gone or timed out). Returns whether it was queued."""
        for entry in self._queue:
            if entry.request.request_id == request_id:
                self._queue.remove(entry)
                return True
        return False

    def drain_queue(self, now_s: float | None = None) -> list[tuple[RoutedRequest, Placement]]:
        """Dispatch queued requests into replicas with room until none fits anywhere.

        In rounds of one request per replica with room: its own home's head, else a request
        taken from another home (:meth:`_steal`). The tail of a backlog is split at once
        (:meth:`_drain_tail`). ``now_s`` defaults to the latest time the policy was told of.
        """
        now_s = self._now_s if now_s is None else now_s
        self._now_s = max(self._now_s, now_s)
        dispatched: list[tuple[RoutedRequest, Placement]] = []
        pulled = True
        while pulled and self.queue_depth:
            if self._in_tail():
                self._drain_tail(now_s, dispatched)
                break
            pulled = False
            for replica in range(self.num_replicas):
                pulled |= self._pull(replica, now_s, dispatched)
        return dispatched

    # ----------------------------------------------------------------------------- internals

    def _enqueue(self, request: RoutedRequest, excluded: frozenset[int]) -> None:
        """Queue ``request`` at its home: the replica holding (or about to hold) most of it.

        "About to hold" counts requests already waiting there: a burst of requests with a new
        prefix gathers at one replica instead of spreading before the first is dispatched.
        Among replicas holding as much, the one that used it last (copies used elsewhere age
        out of the other caches instead of being kept warm side by side), then the one with
        the least work queued and in flight.
        """
        chains = tuple(tuple(prompt.block_hashes) for prompt in request.prompts)
        home, home_blocks = self.num_replicas, [0] * len(chains)
        best: tuple[float, ...] | None = None
        for replica, load in enumerate(self.replicas):
            if not load.healthy or replica in excluded:
                continue
            held = [self.index.match(chain, replica) for chain in chains]
            waiting = [self._queue.shared_depth(chain, replica) for chain in chains]
            if sum(waiting) and sum(waiting) >= sum(held):
                depth, last_used = sum(waiting), math.inf
            else:
                depth = sum(held)
                last_used = max(self.index.last_used(chain, blocks, replica) for chain, blocks in zip(chains, held))
            rank = (-depth, -last_used, self._queue.backlog_flops(replica) + load.outstanding_flops, replica)
            if best is None or rank < best:
                best, home = rank, replica
                home_blocks = [max(h, w) for h, w in zip(held, waiting)]
        # Charged as a hit on what waits there too: one of them computes it, the rest follow.
        home_cost = self._cost(request, home_blocks)[0]
        entry = QueuedRequest(request, chains, excluded, home, home_cost)
        self._queue.push(entry, self._priority(request, home_cost))

    def _priority(self, request: RoutedRequest, cost_flops: int) -> float:
        """Heap key at a home: shortest true FLOPs first, with linear aging (module docstring)."""
        return cost_flops + self.aging_flops_per_s * request.arrival_s

    def _backlog_fills_next_forwards(self) -> bool:
        """Whether the queue could fill every healthy replica's next forward (the sum of their bounds)."""
        return self._queue.backlog_flops() >= sum(load.bound_flops for load in self.replicas if load.healthy)

    def _in_tail(self) -> bool:
        """Whether the queue is the tail of a backlog: less waits than would fill every healthy
        replica's next forward again, and nothing arrived while the running forwards ran (a
        shallow queue that arrivals keep refilling, as at the start of a backlog, is not)."""
        healthy = [load for load in self.replicas if load.healthy]
        if not healthy or self._backlog_fills_next_forwards():
            return False
        return all(self._last_submit_s < load.step_start_s for load in healthy if load.running)

    def _drain_tail(self, now_s: float, dispatched: list[tuple[RoutedRequest, Placement]]) -> None:
        """Dispatch the tail of a backlog now, past the bounds: held back, it would make one more
        forward on some replicas while the others idle. Largest first, each where it finishes
        first (greedy list scheduling), within the engines' token budget."""
        for entry in sorted(self._queue, key=lambda entry: (-entry.cost_flops, entry.key, entry.sequence)):
            best: tuple[float, int, int, int, bool] | None = None
            for replica, load in enumerate(self.replicas):
                if not load.healthy or replica in entry.excluded:
                    continue
                cost, cached = self.cost_on(entry.request, replica)
                joins_running = self._room_for(load, cost, entry.request.num_tokens - cached, math.inf)
                if joins_running is None:
                    continue
                rank = (load.finish_time(cost, joins_running, now_s), -cached, replica, cost, joins_running)
                if best is None or rank < best:
                    best = rank
            if best is not None:
                _, minus_cached, replica, cost, joins_running = best
                self._queue.remove(entry)
                placement = self._commit(entry.request, replica, cost, -minus_cached, joins_running, now_s)
                dispatched.append((entry.request, placement))

    def _pull(self, replica: int, now_s: float, dispatched: list[tuple[RoutedRequest, Placement]]) -> bool:
        """``replica`` takes one waiting request if it has room: its own home's head, else a steal."""
        load = self.replicas[replica]
        if not load.healthy or self._room_for(load, 1, 1) is None:  # full: no request fits
            return False
        stolen = not self._queue.size(replica)
        entry = self._steal(replica) if stolen else self._queue.head(replica)
        if entry is None:
            return False
        held = [self.index.match(chain, replica) for chain in entry.chains]
        cost, cached = self._cost(entry.request, held)
        joins_running = self._room_for(load, cost, entry.request.num_tokens - cached)
        if joins_running is None:
            return False
        self._queue.remove(entry)
        dispatched.append((entry.request, self._commit(entry.request, replica, cost, cached, joins_running, now_s)))
        if stolen:
            self._follow(entry, replica, held)
        return True

    def _follow(self, stolen: QueuedRequest, thief: int, held_before: Sequence[int]) -> None:
        """Move to ``thief``'s home the requests waiting at the victim that share the prefix the
        steal just brought to ``thief`` (blocks it did not hold before), in priority order, while
        the thief's home stays below the victim's: the next ones are hits there, and the prefix
        is not copied again by the next steal."""
        victim = stolen.home
        marks = []
        for chain, before in zip(stolen.chains, held_before):
            depth = self._queue.shared_depth(chain, victim)
            if depth > before:
                marks.append((depth - 1, chain[depth - 1]))
        if not marks:
            return
        for follower in self._queue.sharing(victim, marks):
            if thief in follower.excluded:
                continue
            cost = self.cost_on(follower.request, thief)[0]
            if cost > follower.cost_flops:
                continue
            if self._queue.backlog_flops(thief) + cost > self._queue.backlog_flops(victim) - follower.cost_flops:
                break
            self._queue.move(follower, thief, cost, self._priority(follower.request, cost))

    def _steal(self, replica: int) -> QueuedRequest | None:
        """What ``replica``, with nothing of its own waiting, takes from other homes.

        Rather than idle (work-conserving), it takes, from the top of the homes it may draw
        on, the request whose extra cost here (beyond its cost at its home) per request waiting
        there with the prefix it lacks is least: a prefix many wait for is worth copying, one
        that a single request needs is not (:meth:`_follow` then moves the others along). While
        the backlog could fill every healthy replica's next forward (at least the sum of their
        bounds) it draws on the largest backlog only; below that, on every home, ties going to
        the highest priority.
        """
        homes = [home for home in range(self.num_replicas) if home != replica and self._queue.size(home)]
        if homes and self._backlog_fills_next_forwards():
            homes = [max(homes, key=self._queue.backlog_flops)]
        best: tuple[float, float, int] | None = None
        chosen = None
        for home in homes:
            for entry in self._queue.near_head(home, STEAL_CANDIDATES):
                if replica in entry.excluded:
                    continue
                held = [self.index.match(chain, replica) for chain in entry.chains]
                extra = self._cost(entry.request, held)[0] - entry.cost_flops
                # Requests that would follow it (waiting there with the prefix the thief lacks).
                followers = min((self._queue.count_with(home, chain[blocks])
                                 for chain, blocks in zip(entry.chains, held) if blocks < len(chain)), default=1)
                rank = (extra / max(followers, 1), entry.key, entry.sequence)
                if best is None or rank < best:
                    best, chosen = rank, entry
        return chosen

    def _room_for(self, load: ReplicaLoad, cost: int, new_tokens: int, limit: float | None = None) -> bool | None:
        """Where ``cost`` FLOPs (``new_tokens`` uncached tokens) fit on a replica: a forward it
        starts now (True: the replica is idle), the next forward (False: under ``limit``, by
        default its bound, and the engine's token budget), or nowhere (None).

        A replica that finishes a forward starts the next one with what it holds before the
        router hears of the completions, so work sent in reply waits for the forward after.
        """
        if not load.running:
            return True
        if load.next_step and (
            load.next_flops + cost > (load.bound_flops if limit is None else limit)
            or (self.max_batch_tokens is not None and load.next_tokens + new_tokens > self.max_batch_tokens)
        ):
            return None
        return False

    def _try_place(self, request: RoutedRequest, excluded: frozenset[int], now_s: float) -> Placement | None:
        """Place ``request`` where it finishes first (marginal cost); None if nowhere has room."""
        self._now_s = max(self._now_s, now_s)
        best: tuple[float, int, int, int] | None = None
        best_cost, best_joins = 0, False
        for replica, load in enumerate(self.replicas):
            if not load.healthy or replica in excluded:
                continue
            cost, cached = self.cost_on(request, replica)
            joins_running = self._room_for(load, cost, request.num_tokens - cached)
            if joins_running is None:
                continue
            finish = load.finish_time(cost, joins_running, now_s)
            before, sharing = (load.running_flops, len(load.running)) if joins_running else (
                load.next_flops, len(load.next_step))
            # What placing it here costs the requests already in that forward: each finishes
            # later by the forward's growth (0 below the saturation threshold, cost / rate past
            # it, less where the prefix is cached). Minimising own finish + this is the classic
            # marginal-cost rule for total completion time.
            growth = load.forward_time(before + cost) - load.forward_time(before)
            delay_to_others = sharing * growth
            rank = (finish + delay_to_others, -cached, load.outstanding_flops + cost, replica)
            if best is None or rank < best:
                best, best_cost, best_joins = rank, cost, joins_running
        if best is None:
            return None
        return self._commit(request, best[3], best_cost, -best[1], best_joins, now_s)

    def _commit(
        self, request: RoutedRequest, replica: int, cost: int, cached: int, joins_running: bool, now_s: float
    ) -> Placement:
        placement = Placement(replica=replica, cost_flops=cost, cached_tokens=cached,
                              new_tokens=request.num_tokens - cached)
        load = self.replicas[replica]
        if joins_running:  # the replica was idle: this starts its forward
            load.step_start_s = now_s
            load.running.add(request.request_id)
            load.running_flops += cost
        else:
            load.next_step.add(request.request_id)
            load.next_flops += cost
            load.next_tokens += placement.new_tokens
        load.outstanding_flops += cost
        load.in_flight += 1
        load.dispatched_total += 1
        self._in_flight[request.request_id] = placement
        self.stats.prompt_tokens += request.num_tokens
        self.stats.cached_tokens += placement.cached_tokens
        for prompt in request.prompts:
            self.index.insert(prompt.block_hashes, replica)
        return placement

    def _release(self, request_id: str, now_s: float | None) -> Placement:
        placement = self._in_flight.pop(request_id, None)
        if placement is None:
            raise KeyError(f"request {request_id!r} is not in flight")
        if now_s is not None:
            self._now_s = max(self._now_s, now_s)
        load = self.replicas[placement.replica]
        load.outstanding_flops -= placement.cost_flops
        load.in_flight -= 1
        if request_id in load.finishing:
            load.finishing.discard(request_id)
        elif request_id in load.running:
            # The forward ended (its requests finish together; the others' reports follow):
            # the engine has started the next one with what waited.
            load.running.discard(request_id)
            load.finishing |= load.running
            load.running, load.next_step = load.next_step, set()
            load.running_flops, load.next_flops, load.next_tokens = load.next_flops, 0, 0
            load.step_start_s = self._now_s
        else:
            load.next_step.discard(request_id)
            load.next_flops -= placement.cost_flops
            load.next_tokens -= placement.new_tokens
        return placement
