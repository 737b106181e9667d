"""Expert parallelism for small passes: move tokens to the resident experts, not weights to tokens.

Below the switch point (``AsyncEPMoE``) a pass carries too few tokens to hide a layer's weight
gather; then every MoE layer sends each token once to every rank that holds one of its
experts, each rank runs only its own resident shard on what it received, applying the routing
weights on the expert side, and one partial row per (token, rank) comes back to be summed::

    x [T, H], topk_ids/topk_weights [T, K] (global expert ids; -1: a skipped slot)
        -> owner[topk_ids]                rank of each chosen expert
        -> dispatch                       peer p gets the tokens with an expert on p, compacted
                                          into rows [p*C, p*C + count_p) of a [N*C, H] buffer;
                                          the K routing slots (global ids, weights) ride along;
                                          rows past count_p carry id -1 (nothing to compute)
        -> experts(recv_x, ids on this rank's shard or -1, weights)     resident shard only
        -> combine                        the [N*C, H] partial rows go back the same way
        -> out[t] = sum over ranks p of its row from p    (fp32 sum of at most N rows)

Every buffer has a static shape: ``C`` (the capacity per peer) is the largest token count of
any rank in this pass, which every rank knows (the engine already agrees on it for its dummy
batches), so the exchange is two fixed-split ``all_to_all_single`` calls out (tokens, routing
slots) and one back, with no host sync and nothing that depends on the data: the same code
runs eager and inside a CUDA-graph capture. The price of static shapes is that the wire
carries ``C`` rows per peer, used or not; at two ranks a token needs the other rank with
probability 1 - (1/2)^K (0.996 for top-8), so nothing is lost there.

Skipped work costs nothing: the experts kernel gives rows whose slots are all ``-1`` no GEMM
row and a zero output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from zeroprefill.common.expert_sharding import ExpertShardLayout

#: ``experts(x [R, H], topk_weights [R, K], row_ids [R, K]) -> [R, H]``: this rank's resident
#: experts, ``row_ids`` rows of its shard (``-1``: skip the slot).
ResidentExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TokenExchange:
    """Deduplicated dispatch and combine of one MoE layer over ``group`` (static shapes).

    Args:
        layout: how the experts are split over the group's ranks.
        resident_row_of_expert: ``[E]`` int64 on the compute device, this rank's row of each
            expert it holds, ``-1`` for the others.
        group: the process group of the AsyncEP ranks (the weight transport's group).
    """

    def __init__(self, layout: ExpertShardLayout, resident_row_of_expert: torch.Tensor,
                 group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        if self.world_size != layout.world_size:
            raise ValueError(f"layout has world_size={layout.world_size}, the group {self.world_size} ranks")
        device = resident_row_of_expert.device
        self._owner = torch.tensor([rank for rank, _ in layout.home_of_expert()], dtype=torch.int64, device=device)
        self._resident_row = resident_row_of_expert

    def run(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            capacity: int, experts: ResidentExperts) -> torch.Tensor:
        """The layer's output ``[T, H]`` for this rank's ``T <= capacity`` tokens (``T`` may be 0).

        Collective: every rank of the group calls it for the same layer with the same
        ``capacity``.
        """
        num_tokens, hidden = hidden_states.shape
        if num_tokens > capacity:
            raise ValueError(f"{num_tokens} tokens on this rank exceed the pass's capacity of {capacity} per rank: "
                             "the capacity must be the largest token count of any rank in this pass")
        top_k = topk_ids.shape[1]
        n, rows = self.world_size, self.world_size * capacity
        device = hidden_states.device

        # Which peers each token needs, and where it lands in each peer's part of the buffer; a
        # skipped slot (id -1, e.g. an engine's padding row) needs no one (an extra row takes it).
        ids = topk_ids.long()
        owners = torch.where(ids >= 0, self._owner[ids.clamp(min=0)], n)
        needs = torch.zeros(n + 1, num_tokens, dtype=torch.bool, device=device)
        needs = needs.scatter_(0, owners.t(), True)[:n]  # [N, T]
        part_start = torch.arange(n, device=device)[:, None] * capacity
        row_of_need = torch.where(needs, part_start + needs.cumsum(1) - 1, rows).reshape(-1)  # [N*T]; rows: unused

        # One extra row takes the writes of (peer, token) pairs that are not sent.
        send_x = hidden_states.new_empty(rows + 1, hidden)
        send_x[row_of_need] = hidden_states.repeat(n, 1)
        routing = torch.cat([topk_ids.to(torch.float32), topk_weights.to(torch.float32)], dim=1)  # ids exact < 2^24
        send_routing = routing.new_full((rows + 1, 2 * top_k), -1.0)
        send_routing[row_of_need] = routing.repeat(n, 1)

        recv_x = hidden_states.new_empty(rows, hidden)
        recv_routing = routing.new_empty(rows, 2 * top_k)
        dist.all_to_all_single(recv_x, send_x[:rows], group=self.group)
        dist.all_to_all_single(recv_routing, send_routing[:rows], group=self.group)

        recv_ids = recv_routing[:, :top_k].long()
        local_rows = torch.where(recv_ids >= 0, self._resident_row[recv_ids.clamp(min=0)], -1)
        partial = experts(recv_x, recv_routing[:, top_k:].contiguous(), local_rows.contiguous())

        back = hidden_states.new_empty(rows + 1, hidden)
        back[rows].zero_()
        dist.all_to_all_single(back[:rows], partial, group=self.group)
        return back[row_of_need].view(n, num_tokens, hidden).sum(dim=0, dtype=torch.float32).to(hidden_states.dtype)
