"""How one MoE layer's experts are split over the ranks of an AsyncEP group.

Each rank *stores* a shard of every MoE layer's routed experts (ZeRO-3 style). Shards are
padded to one capacity ``ceil(E / N)`` so that an AllGather of equal-sized shards assembles
a gather buffer of ``N * capacity`` expert slots; padded slots hold zeros and are never
routed to. Which experts a rank owns follows vLLM's expert-parallel placement so that a
checkpoint loaded by vLLM's EP weight loader is already our shard:

- ``linear``: rank r owns a contiguous run; the first ``E % N`` ranks own one extra expert.
- ``round_robin``: rank r owns experts r, r + N, r + 2N, ...

:meth:`ExpertShardLayout.home_of_expert` says where each expert lives: its rank and its row in
that rank's shard (the streamer maps routing ids to rows of the resident shard and of the
gather buffer with it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

PLACEMENTS = ("linear", "round_robin")


@dataclass(frozen=True)
class ExpertShardLayout:
    """Assignment of ``num_experts`` experts to ``world_size`` ranks, padded to equal shards."""

    num_experts: int
    world_size: int
    placement: str = "linear"
    _owned: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if self.world_size <= 0:
            raise ValueError(f"world_size must be positive, got {self.world_size}")
        if self.world_size > self.num_experts:
            raise ValueError(
                f"world_size={self.world_size} exceeds num_experts={self.num_experts}: "
                "some rank would own no expert; use at most as many ranks as experts"
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
        object.__setattr__(self, "_owned", tuple(self._compute_owned(r) for r in range(self.world_size)))

    def _compute_owned(self, rank: int) -> tuple[int, ...]:
        e, n = self.num_experts, self.world_size
        if self.placement == "round_robin":
            return tuple(range(rank, e, n))
        base, remainder = divmod(e, n)
        count = base + (1 if rank < remainder else 0)
        start = rank * base + min(rank, remainder)
        return tuple(range(start, start + count))

    @property
    def capacity(self) -> int:
        """Expert slots per shard (``ceil(E / N)``); shorter shards are zero-padded."""
        return -(-self.num_experts // self.world_size)

    @property
    def num_slots(self) -> int:
        """Expert slots of a gathered layer: ``N * capacity`` (``>= E``)."""
        return self.world_size * self.capacity

    def experts_of_rank(self, rank: int) -> tuple[int, ...]:
        self._check_rank(rank)
        return self._owned[rank]

    def describe_experts_of_rank(self, rank: int) -> str:
        """The experts ``rank`` stores, as runs: ``"0-63 (64 experts)"``, ``"1, 3, 5 (3 experts)"``."""
        experts = self.experts_of_rank(rank)
        runs: list[list[int]] = []
        for expert in experts:
            if runs and expert == runs[-1][1] + 1:
                runs[-1][1] = expert
            else:
                runs.append([expert, expert])
        spans = ", ".join(f"{first}-{last}" if last > first else str(first) for first, last in runs)
        return f"{spans} ({len(experts)} expert{'s' if len(experts) != 1 else ''})"

    def home_of_expert(self) -> list[tuple[int, int]]:
        """``(rank, row in that rank's shard)`` of every expert id ``0..E-1``."""
        homes = [(0, 0)] * self.num_experts
        for rank, experts in enumerate(self._owned):
            for row, expert in enumerate(experts):
                homes[expert] = (rank, row)
        return homes

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's padded shard ``[capacity, ...]`` of a full ``[E, ...]`` expert tensor."""
        self._check_rank(rank)
        if full.shape[0] != self.num_experts:
            raise ValueError(
                f"expected a tensor with num_experts={self.num_experts} rows, got shape {tuple(full.shape)}"
            )
        return self.pad_shard(full[list(self._owned[rank])])

    def pad_shard(self, owned: torch.Tensor) -> torch.Tensor:
        """Zero-pad a rank's own experts ``[n <= capacity, ...]`` to ``[capacity, ...]``."""
        missing = self.capacity - owned.shape[0]
        if missing < 0:
            raise ValueError(f"a shard holds at most capacity={self.capacity} experts, got {owned.shape[0]}")
        if missing == 0:
            return owned.contiguous()
        return torch.cat([owned, owned.new_zeros((missing, *owned.shape[1:]))])

    def shard_all(self, full: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        return {name: self.shard(tensor, rank) for name, tensor in full.items()}

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the group of {self.world_size}")
