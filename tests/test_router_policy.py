"""Router policy: prefix index, step-aware placement, the next-forward bound, queue order, bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from zeroprefill.common.cost_model import request_flops
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.prefix_index import PrefixIndex, block_hashes
from zeroprefill.common.router_policy import PromptShape, RoutedRequest, RouterPolicy

CONFIGS = Path(__file__).resolve().parents[1] / "common" / "model_configs"
BLOCK = 4


@pytest.fixture(scope="module")
def spec() -> MoEModelSpec:
    return MoEModelSpec.from_pretrained(CONFIGS / "qwen3-30b-a3b.json")


def _request(request_id: str, tokens: list[int], arrival_s: float = 0.0) -> RoutedRequest:
    prompt = PromptShape(len(tokens), tuple(block_hashes(tokens, BLOCK)))
    return RoutedRequest(request_id, [prompt], arrival_s)


def _policy(
    spec: MoEModelSpec, bounds: list[float], capacity: int = 1000, saturation: list[float] = ()
) -> RouterPolicy:
    return RouterPolicy(spec, bounds, saturation, block_size=BLOCK, cache_capacity_blocks=capacity)


def _placed(policy: RouterPolicy, request: RoutedRequest, excluded: frozenset[int] = frozenset()):
    """Submit ``request``; its placement if it was dispatched now, else None."""
    for routed, placement in policy.submit(request, excluded):
        if routed.request_id == request.request_id:
            return placement
    return None


def test_block_hashes_are_chained_and_full_blocks_only():
    a = block_hashes(list(range(10)), BLOCK)
    assert len(a) == 2  # 10 tokens -> 2 full blocks, the partial one is not hashed
    b = block_hashes([99] + list(range(1, 10)), BLOCK)
    assert a[1] != b[1]  # same tokens in block 1, different parent: different hash
    assert block_hashes(list(range(10)), BLOCK) == a
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)


def test_prefix_index_match_stops_at_first_miss_and_lru_evicts_tail_first():
    index = PrefixIndex(2, capacity_blocks=3)
    chain = block_hashes(list(range(16)), BLOCK)  # 4 blocks
    index.insert(chain[:3], 0)
    assert index.match_all(chain) == [3, 0]
    index.insert(block_hashes([7] * 8, BLOCK), 0)  # 2 new blocks: 2 LRU blocks go
    # The chain was touched leaf first, so its tail (blocks 1, 2) was least recent.
    assert index.match(chain, 0) == 1
    assert index.cached_blocks(0) == 3
    index.clear(0)
    assert index.match(chain, 0) == 0


def test_places_on_prefix_hit_while_under_saturation(spec):
    shared = list(range(64))
    cost = request_flops(spec, 80)
    policy = _policy(spec, [10 * cost, 10 * cost], saturation=[10 * cost, 10 * cost])
    first = _placed(policy, _request("a", shared + [1000 + i for i in range(16)]))
    assert first.replica == 0 and first.cached_tokens == 0
    # No hit anywhere: the idle replica (it starts at once).
    assert _placed(policy, _request("x", [3000 + i for i in range(8)])).replica == 1
    # Both busy and under their saturation threshold (one floor-bound forward either way):
    # the prefix hit wins although replica 0 has more outstanding FLOPs.
    second = _placed(policy, _request("b", shared + [2000 + i for i in range(16)]))
    assert second.replica == 0
    assert second.cached_tokens == 64
    assert second.cost_flops == request_flops(spec, 80, 64)
    assert policy.stats.prefix_hit_rate == pytest.approx(64 / 168)
    # Past the threshold the earliest finish in FLOPs wins over the hit: replica 0's running
    # forward (the hit's owner) is long, replica 1's short.
    tight = _policy(spec, [10 * cost, 10 * cost], saturation=[1.0, 1.0])
    _placed(tight, _request("a", shared + [1000 + i for i in range(400)]))
    _placed(tight, _request("x", [3000 + i for i in range(8)]))
    assert _placed(tight, _request("b", shared + [2000 + i for i in range(16)])).replica == 1


def test_bound_limits_the_next_forward_and_queue_drains_into_freed_room(spec):
    cost = request_flops(spec, 80)
    policy = _policy(spec, [cost, cost])
    assert _placed(policy, _request("a", list(range(80)))).replica == 0  # both idle: lowest index
    # No hit anywhere: the idle replica (it starts at once, before a's forward ends).
    assert _placed(policy, _request("b", [5000 + i for i in range(80)])).replica == 1
    # Both busy, next forwards empty: the full hit on replica 0 makes its next forward shortest.
    hit = _placed(policy, _request("c", list(range(80))))
    assert (hit.replica, hit.cached_tokens) == (0, 79)
    assert hit.cost_flops == request_flops(spec, 80, 79)
    # Replica 0's next forward has no room left for a full request: replica 1's has.
    assert _placed(policy, _request("d", [6000 + i for i in range(80)])).replica == 1
    # Both next forwards at their bound: queued, then dispatched where room frees up.
    assert _placed(policy, _request("e", [7000 + i for i in range(80)], arrival_s=1.0)) is None
    assert policy.queue_depth == 1
    # a's forward ends: c's starts, and e fills replica 0's next one.
    dispatched = policy.complete("a")
    assert [(r.request_id, p.replica) for r, p in dispatched] == [("e", 0)]
    assert policy.queue_depth == 0
    assert policy.replicas[0].outstanding_flops == hit.cost_flops + cost
    assert (policy.replicas[0].running_flops, policy.replicas[0].next_flops) == (hit.cost_flops, cost)


def test_empty_next_forward_takes_a_request_larger_than_its_bound(spec):
    policy = _policy(spec, [1.0, 1.0])  # bound far below any request
    for name in "abcd":  # running forward, then next forward, on each replica
        assert _placed(policy, _request(name, [ord(name)] * 40)) is not None
    assert _placed(policy, _request("e", list(range(200, 240)))) is None


def test_request_goes_where_the_running_forward_ends_first(spec):
    saturation = 1e15
    rate = 1e15  # one-second floor per forward
    policy = RouterPolicy(spec, [2 * saturation] * 2, [saturation] * 2, block_size=BLOCK,
                          flops_per_s=[rate, rate])
    policy.submit(_request("a", [1] * 40, arrival_s=0.0))  # replica 0: forward over [0, 1)
    policy.submit(_request("b", [2] * 40, arrival_s=0.5))  # replica 1 (idle): forward over [0.5, 1.5)
    assert policy.placement_of("b").replica == 1
    # Both busy, both next forwards floor-bound: replica 0's running forward ends first.
    assert _placed(policy, _request("c", [3] * 40, arrival_s=0.6)).replica == 0
    # Without a rate the policy cannot tell the phases apart: the tie goes to least outstanding.
    blind = RouterPolicy(spec, [2 * saturation] * 2, [saturation] * 2, block_size=BLOCK)
    blind.submit(_request("a", [1] * 40, arrival_s=0.0))
    blind.submit(_request("b", [2] * 8, arrival_s=0.5))
    assert _placed(blind, _request("c", [3] * 40, arrival_s=0.6)).replica == 1


def test_queue_is_shortest_flops_first(spec):
    policy = _policy(spec, [1.0], capacity=0)
    policy.aging_flops_per_s = 0.0
    in_flight = [_request("busy", [1] * 8), _request("next", [1] * 8)]
    for request in in_flight:
        _placed(policy, request)
    in_flight = [r.request_id for r in in_flight]
    lengths = {"long": 200, "short": 20, "mid": 60}
    for name, length in lengths.items():
        assert _placed(policy, _request(name, [2] * length, arrival_s=0.0)) is None
    order = []
    while in_flight:
        dispatched = policy.complete(in_flight.pop(0))  # forwards end in order
        in_flight += [r.request_id for r, _ in dispatched]
        order += [r.request_id for r, _ in dispatched]
    assert order == ["short", "mid", "long"]


def test_aging_prevents_starvation(spec):
    """A long request keeps losing to short ones without aging, and wins with it."""

    def served_before_long(aging: float) -> int:
        policy = _policy(spec, [1.0], capacity=0)
        policy.aging_flops_per_s = aging
        in_flight = ["busy", "next"]
        _placed(policy, _request("busy", [1] * 8))
        _placed(policy, _request("next", [1] * 8))
        _placed(policy, _request("long", [3] * 400, arrival_s=0.0))
        served = 0
        for step in range(1, 200):
            _placed(policy, _request(f"s{step}", [4] * 10, arrival_s=float(step)))
            dispatched = [r.request_id for r, _ in policy.complete(in_flight.pop(0))]
            if "long" in dispatched:
                return served
            in_flight += dispatched
            served += len(dispatched)
        return served

    cost_long = request_flops(spec, 400)
    assert served_before_long(0.0) == 199  # starves for the whole run
    # With aging one "long" cost per 10 s, it is served within about 10 arrivals.
    assert served_before_long(cost_long / 10.0) <= 11


def test_outstanding_flops_bookkeeping_on_complete_and_fail(spec):
    policy = _policy(spec, [math.inf, math.inf])
    placements = {}
    for i in range(6):
        placements[f"r{i}"] = _placed(policy, _request(f"r{i}", [i] * (10 + 10 * i)))
    total = sum(p.cost_flops for p in placements.values())
    assert sum(r.outstanding_flops for r in policy.replicas) == total
    policy.complete("r0")
    policy.fail("r1")
    assert policy.replicas[placements["r1"].replica].failed_total == 1
    remaining = sum(placements[f"r{i}"].cost_flops for i in range(2, 6))
    assert sum(r.outstanding_flops for r in policy.replicas) == remaining
    for i in range(2, 6):
        policy.complete(f"r{i}")
    assert [r.outstanding_flops for r in policy.replicas] == [0, 0]
    assert [r.in_flight for r in policy.replicas] == [0, 0]
    with pytest.raises(KeyError, match="r0"):
        policy.complete("r0")


def test_failed_request_retried_elsewhere_and_unhealthy_replica_drained(spec):
    policy = _policy(spec, [math.inf, math.inf])
    first = _placed(policy, _request("a", list(range(40))))
    policy.fail("a")
    policy.set_healthy(first.replica, False)
    retry = _placed(policy, _request("a", list(range(40))), excluded=frozenset({first.replica}))
    assert retry.replica != first.replica
    # While drained, nothing goes there even with a prefix hit.
    assert _placed(policy, _request("b", list(range(40)))).replica == retry.replica
    # Nowhere to go: queued until the replica recovers.
    only = _policy(spec, [math.inf])
    only.set_healthy(0, False)
    assert _placed(only, _request("c", list(range(8)))) is None
    dispatched = only.set_healthy(0, True)
    assert [r.request_id for r, _ in dispatched] == ["c"]


def test_invalid_arguments_are_named(spec):
    with pytest.raises(ValueError, match="bound_flops"):
        RouterPolicy(spec, [])
    with pytest.raises(ValueError, match="bound_flops"):
        RouterPolicy(spec, [1.0, 0.0])
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixIndex(2, [1, 2, 3])
    policy = _policy(spec, [math.inf])
    _placed(policy, _request("a", [1] * 8))
    with pytest.raises(ValueError, match="already in flight"):
        _placed(policy, _request("a", [1] * 8))


def _fill_two_replicas(spec):
    """Replica 0 holds prefix P, replica 1 prefix Q; each has a running and a next forward."""
    policy = _policy(spec, [1.0, 1.0])  # every next forward takes exactly one request
    p_prefix, q_prefix = list(range(64)), list(range(1000, 1064))
    prompt = {"P": lambda i: p_prefix + [5000 + 16 * i + j for j in range(16)],
              "Q": lambda i: q_prefix + [9000 + 16 * i + j for j in range(16)]}
    assert _placed(policy, _request("a", prompt["P"](0))).replica == 0
    assert _placed(policy, _request("b", prompt["Q"](0))).replica == 1
    assert _placed(policy, _request("c", prompt["P"](1))).replica == 0  # its hit is cheaper there
    assert _placed(policy, _request("d", prompt["Q"](1))).replica == 1
    return policy, prompt


def test_backlog_waits_at_the_replica_holding_its_prefix(spec):
    policy, prompt = _fill_two_replicas(spec)
    for arrival, (name, group) in enumerate([("e", "P"), ("f", "Q"), ("g", "P"), ("h", "Q")], start=1):
        assert _placed(policy, _request(name, prompt[group](arrival + 1), arrival_s=float(arrival))) is None
    assert policy.queued_per_replica == [2, 2]
    # Replica 1 frees room first: it serves its own prefix's backlog (f), although e is older.
    assert [(r.request_id, p.replica, p.cached_tokens) for r, p in policy.complete("b")] == [("f", 1, 64)]
    assert [(r.request_id, p.replica) for r, p in policy.complete("a")] == [("e", 0)]
    assert policy.cancel("h") and not policy.cancel("h")
    # Nothing of its own left at replica 1: rather than idle, it takes replica 0's backlog.
    assert [(r.request_id, p.replica, p.cached_tokens) for r, p in policy.complete("d")] == [("g", 1, 0)]
    assert policy.queue_depth == 0


def test_idle_replica_takes_the_largest_backlog_and_a_new_prefix_gathers_at_one_home(spec):
    policy, prompt = _fill_two_replicas(spec)
    for i in range(3):  # a burst of a prefix nobody holds yet: all wait at one home
        assert _placed(policy, _request(f"n{i}", list(range(2000, 2064)) + [7000 + i] * 16, float(i))) is None
    (home,) = [replica for replica, waiting in enumerate(policy.queued_per_replica) if waiting]
    assert policy.queued_per_replica[home] == 3
    for i in range(2):
        assert _placed(policy, _request(f"p{i}", prompt["P"](10 + i), arrival_s=10.0 + i)) is None
    assert policy.queued_per_replica[0] >= 2
    # A replica whose own home is empty does not idle: it takes the largest backlog's head.
    other = 1 - home
    assert policy.queued_per_replica[other] == (2 if other == 0 else 0)
    finished = {0: "a", 1: "b"}[other]
    dispatched = policy.complete(finished)
    assert len(dispatched) == 1 and dispatched[0][1].replica == other
    assert policy.queue_depth == 4


def test_drained_replica_waiting_requests_move_to_a_new_home(spec):
    policy, prompt = _fill_two_replicas(spec)
    assert _placed(policy, _request("e", prompt["P"](5), arrival_s=1.0)) is None
    assert policy.queued_per_replica == [1, 0]
    assert policy.set_healthy(0, False) == []
    assert policy.queued_per_replica == [0, 1]
    assert [(r.request_id, p.replica) for r, p in policy.complete("b")] == [("e", 1)]


def test_shallow_backlog_serves_homes_first_then_steals_from_any_home(spec):
    """Below the sum of the bounds, a replica with room still serves its own home first; one
    whose home is empty draws on every home (not only the largest backlog, as with a deep
    one): the request costing it least extra, ties going to the highest priority."""
    full = request_flops(spec, 80)
    policy = _policy(spec, [0.9 * full] * 3)  # a next forward holds one 40-token request
    unique = iter(range(10_000, 1_000_000, 100))

    def tokens(length: int) -> list[int]:
        start = next(unique)
        return list(range(start, start + length))

    p_prefix, q_prefix = tokens(64), tokens(64)
    assert _placed(policy, _request("a", p_prefix + tokens(16))).replica == 0
    assert _placed(policy, _request("b", tokens(80))).replica == 1
    assert _placed(policy, _request("c", q_prefix + tokens(16))).replica == 2
    assert [_placed(policy, _request(n, tokens(40))).replica for n in "def"] == [0, 1, 2]
    # y (Q-prefixed, older, cheaper) waits at replica 2; x (P-prefixed, larger) at replica 0.
    assert _placed(policy, _request("y", q_prefix + tokens(40), arrival_s=1.0)) is None
    assert _placed(policy, _request("x", p_prefix + tokens(56), arrival_s=2.0)) is None
    assert policy.queued_per_replica == [1, 0, 1]
    # Replica 1 frees room with nothing of its own waiting: it holds neither prefix, and y (the
    # older, smaller one, in the smaller backlog) costs it least extra.
    assert [(r.request_id, p.replica) for r, p in policy.complete("b")] == [("y", 1)]


def _both_prefixes_at_replica_0(spec, waiting: list[str]) -> RouterPolicy:
    """Replica 0 caches prefixes P and Q, replica 1 neither; every next forward takes one
    request and holds one; then ``waiting`` (names starting with p or q: their prefix) queue,
    in arrival order. Completing b or d frees replica 1."""
    policy = _policy(spec, [1.0, 1.0])
    prefixes = {"p": list(range(64)), "q": list(range(1000, 1064))}

    def prompt(prefix: str, tail: int) -> list[int]:
        return prefixes[prefix] + [5000 + 16 * tail + j for j in range(16)]

    assert _placed(policy, _request("a", prompt("p", 0))).replica == 0
    assert _placed(policy, _request("b", list(range(9000, 9080)))).replica == 1
    assert _placed(policy, _request("c", prompt("q", 1))).replica == 0
    assert _placed(policy, _request("d", list(range(9100, 9180)))).replica == 1
    for arrival, name in enumerate(waiting, start=1):
        assert _placed(policy, _request(name, prompt(name[0], 10 + arrival), arrival_s=float(arrival))) is None
    return policy


def test_a_replica_stealing_follows_the_prefix_it_just_took(spec):
    policy = _both_prefixes_at_replica_0(spec, ["p1", "q1", "p2"])
    assert policy.queued_per_replica == [3, 0]  # both prefixes are cached at replica 0
    # Replica 1 has nothing of its own: it takes the oldest (all cost it the same miss)...
    assert [(r.request_id, p.replica, p.cached_tokens) for r, p in policy.complete("b")] == [("p1", 1, 0)]
    # ...then p2, which now hits the prefix p1 brought, ahead of the older q1 (a second miss).
    assert [(r.request_id, p.replica, p.cached_tokens) for r, p in policy.complete("d")] == [("p2", 1, 64)]


def test_requests_waiting_with_a_prefix_are_charged_one_miss_between_them(spec):
    """A burst with a prefix nobody holds waits at one home; only the first is charged the
    prefix (one of them computes it, the rest hit it), so the home's backlog is not inflated."""
    policy, _ = _fill_two_replicas(spec)
    prefix = list(range(2000, 2064))
    for i in range(3):
        assert _placed(policy, _request(f"n{i}", prefix + [7000 + 16 * i + j for j in range(16)], float(i))) is None
    (home,) = [replica for replica, waiting in enumerate(policy.queued_per_replica) if waiting]
    assert policy.queued_flops_per_replica[home] == request_flops(spec, 80) + 2 * request_flops(spec, 80, 64)
    assert policy.queued_flops_per_replica[1 - home] == 0


def test_a_steal_takes_the_requests_sharing_its_prefix_along_until_homes_balance(spec):
    """The requests of the stolen prefix that wait at the victim move to the thief's home (hits
    there now), but only while the thief's home stays below the victim's."""
    policy = _both_prefixes_at_replica_0(spec, [f"p{i}" for i in range(6)] + [f"q{i}" for i in range(2)])
    assert policy.queued_per_replica == [8, 0]
    # Replica 1 steals p0 (the oldest; every candidate costs it the same miss)...
    assert [(r.request_id, p.replica, p.cached_tokens) for r, p in policy.complete("b")] == [("p0", 1, 0)]
    # ...and the P requests follow it home, three of the five: a fourth would leave replica
    # 1's home above replica 0's (two P, two Q).
    hit = request_flops(spec, 80, 64)
    assert policy.queued_per_replica == [4, 3]
    assert policy.queued_flops_per_replica == [4 * hit, 3 * hit]
    assert [(r.request_id, p.replica, p.cached_tokens) for r, p in policy.complete("d")] == [("p1", 1, 64)]


def test_a_thief_copies_the_prefix_most_requests_wait_for(spec):
    """Among misses of the same size, a steal takes the prefix with the most requests waiting
    for it (its copy serves them all), not the oldest request's, which only it needs."""
    policy = _both_prefixes_at_replica_0(spec, ["q0", "p0", "p1", "p2"])
    assert [r.request_id for r, _ in policy.complete("b")] == ["p0"]


def _staggered_backlog(spec, max_batch_tokens=None, late_arrival=False):
    """Two replicas, one 80-token request per next forward; e, f (80 tokens) and g (8) wait.
    Replica 0's forward ends at t1, replica 1's half a forward later, at t2. Returns the policy
    and what t2's completion dispatched."""
    cost = request_flops(spec, 80)
    rate = cost / 10.0  # a forward of one request: 10 s
    policy = RouterPolicy(spec, [cost, cost], [0.0, 0.0], block_size=BLOCK, cache_capacity_blocks=1000,
                          flops_per_s=[rate, rate], max_batch_tokens=max_batch_tokens)
    tokens = iter(range(0, 1_000_000, 80))

    def request(name: str, arrival_s: float = 0.0, length: int = 80) -> RoutedRequest:
        start = next(tokens)
        return _request(name, list(range(start, start + length)), arrival_s)

    assert [_placed(policy, request(n)).replica for n in "abcd"] == [0, 1, 0, 1]
    for name, length, arrival_s in (("e", 80, 0.0), ("f", 80, 0.0), ("g", 8, 1.0)):  # g aged behind e, f
        assert _placed(policy, request(name, arrival_s, length)) is None
    t1 = cost / rate
    assert [(r.request_id, p.replica) for r, p in policy.complete("a", t1)] == [("e", 0)]
    if late_arrival:  # a small request arrives while replica 0's new forward runs
        assert _placed(policy, request("h", t1 + 1.0, length=8)) is None
    t2 = t1 * 1.5
    return policy, {r.request_id: p.replica for r, p in policy.complete("b", t2)}


def test_the_tail_of_a_backlog_is_split_past_the_bounds_when_nothing_more_arrives(spec):
    """With less waiting than one more round of next forwards and no arrivals since the running
    forwards started, holding the rest back would cost a forward more on one replica: the
    replica whose queued work ends first (0) takes it past its bound."""
    policy, dispatched = _staggered_backlog(spec)
    assert dispatched == {"f": 1, "g": 0}
    assert policy.queue_depth == 0


def test_a_shallow_queue_that_arrivals_refill_stays_within_the_bounds(spec):
    policy, dispatched = _staggered_backlog(spec, late_arrival=True)
    assert dispatched == {"f": 1}
    assert policy.queue_depth == 2


def test_a_next_forward_stays_within_the_engines_token_budget(spec):
    """The engine computes at most ``max_batch_tokens`` uncached tokens per forward: the tail
    is not split into a next forward that would exceed it (the engine would defer the rest)."""
    policy, dispatched = _staggered_backlog(spec, max_batch_tokens=85)
    assert dispatched == {"f": 1}
    assert policy.queue_depth == 1
    with pytest.raises(ValueError, match="max_batch_tokens"):
        RouterPolicy(spec, [1.0], max_batch_tokens=0)


def test_home_queues_move_leaves_no_live_copy_behind():
    from zeroprefill.common.home_queue import HomeQueues, QueuedRequest

    queues = HomeQueues(2)
    entries = [QueuedRequest(name, ((i, 100 + i),), frozenset(), 0, 10) for i, name in enumerate("abc")]
    for key, entry in enumerate(entries):
        queues.push(entry, float(key))
    queues.move(entries[0], 1, 4, 0.0)
    assert queues.head(0) is entries[1] and queues.head(1) is entries[0]
    assert sorted(entry.request for entry in queues) == ["a", "b", "c"]
    assert [queues.size(0), queues.size(1)] == [2, 1]
    assert [queues.backlog_flops(0), queues.backlog_flops(1)] == [20, 4]
    assert queues.shared_depth((0, 100), 0) == 0 and queues.shared_depth((0, 100), 1) == 2
    assert [entry.request for entry in queues.near_head(0, 5)] == ["b", "c"]
    assert [entry.request for entry in queues.drain_home(0)] == ["b", "c"]
    assert [entry.request for entry in queues] == ["a"]


def test_the_first_completion_of_a_forward_starts_the_next(spec):
    """A forward's requests finish together: after the first of them reports, the engine is
    on its next forward (here: none, so it is idle), whatever the others' reports' order."""
    policy = _policy(spec, [math.inf])
    for name, offset in (("a", 0), ("b", 100), ("c", 200)):
        _placed(policy, _request(name, list(range(offset, offset + 40))))
    load = policy.replicas[0]
    assert load.running == {"a"} and load.next_step == {"b", "c"}
    policy.complete("a")
    assert load.running == {"b", "c"} and not load.next_step
    policy.complete("b")
    assert not load.running and load.finishing == {"c"}
    _placed(policy, _request("d", list(range(300, 340))))
    assert load.running == {"d"}  # it starts a forward now, not after c's
    policy.complete("c")
    assert load.running == {"d"} and not load.finishing and load.in_flight == 1
