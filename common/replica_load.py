"""What the router policy tracks per replica, and its model of the replica's forwards.

A prefill-only engine runs one forward at a time over the requests it holds; what arrives while
a forward runs waits for the next one. :class:`ReplicaLoad` mirrors that from the policy's own
dispatch and completion events: the *running* forward and the *next* one (their requests and
FLOPs), when the running one started, outstanding work, health and counters. A forward of
``F`` FLOPs takes ``max(F, saturation_flops) / flops_per_s`` (below the saturation threshold it
waits on the expert-weight stream); without a rate, lengths are compared in FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReplicaLoad:
    """What the policy tracks per replica (``outstanding = running + next forward``)."""

    bound_flops: float
    saturation_flops: float = 0.0
    flops_per_s: float = 0.0
    outstanding_flops: int = 0
    in_flight: int = 0
    running_flops: int = 0
    next_flops: int = 0
    next_tokens: int = 0
    step_start_s: float = 0.0
    running: set[str] = field(default_factory=set)
    next_step: set[str] = field(default_factory=set)
    finishing: set[str] = field(default_factory=set)  # of the forward that ended, not yet reported
    healthy: bool = True
    dispatched_total: int = 0
    completed_total: int = 0
    failed_total: int = 0

    def forward_time(self, flops: int) -> float:
        """A forward's length: seconds with a rate, else FLOPs (the floor counts as saturation)."""
        length = max(flops, self.saturation_flops)
        return length / self.flops_per_s if self.flops_per_s else length

    def running_left(self, now_s: float) -> float:
        """How long until the running forward ends (its whole length without a rate)."""
        total = self.forward_time(self.running_flops)
        if not self.flops_per_s:
            return total
        return max(self.step_start_s + total - now_s, 0.0)

    def finish_time(self, cost: int, joins_running: bool, now_s: float) -> float:
        """When work of ``cost`` FLOPs added now would finish: with the forward it starts (the
        replica is idle), else at the end of the next forward, after the running one."""
        if joins_running:
            return self.forward_time(self.running_flops + cost)
        return self.running_left(now_s) + self.forward_time(self.next_flops + cost)
