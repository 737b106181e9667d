"""Token->expert alignment: sort the (token, slot) pairs by expert, pad each expert to block_m.

    topk_ids [T, K] --flatten--> row r = t*K + k, expert topk_ids[t, k]
        --stable sort by expert, pad every expert's rows to a multiple of block_m-->
    sorted_row_ids [max_padded_rows]   row r, or the sentinel T*K in padding slots
    block_expert_ids [max_blocks]      the expert of each block of block_m padded rows
    num_padded_rows [1]                rows actually used (device tensor: no host sync)
    expert_ends [E]                    padded end of each expert's segment (the ``offs`` of
                                       ``torch._grouped_mm``)
    rows_per_expert [E]                rows each expert receives, padding excluded
    position_of_row [T*K]              where row r sits in the padded order (inverse of the sort);
                                       ``>= max_padded_rows`` for a skipped row

A row whose expert id is negative (``-1``: the expert is not here, as vLLM's expert maps mark
experts of other EP ranks) is *skipped*: it gets no padded position, no GEMM row, and
contributes nothing to its token's output. Every consumer tells a skipped row by
``position_of_row[r] >= max_padded_rows``.

The grouped GEMMs launch one program row per block of ``block_m`` padded rows, read the
block's expert from ``block_expert_ids``, and return at once when the block lies past
``num_padded_rows``. The launch size uses the host-known bound
``max_padded_rows = T*K + min(T*K, E) * (block_m - 1)``, so nothing waits on the GPU.
Experts that receive no token get no block. Everything here is a handful of torch device
ops (counting scatter, cumsum, one stable sort, searchsorted), a few tens of microseconds
at 128K rows: no host round trip and no data-dependent shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertAlignment:
    """The output of :func:`moe_align_block_size`."""

    sorted_row_ids: torch.Tensor    # int32 [max_padded_rows]; row t*K+k, or num_rows as padding
    block_expert_ids: torch.Tensor  # int32 [max_padded_rows // block_m]
    num_padded_rows: torch.Tensor   # int32 [1], on the device
    expert_ends: torch.Tensor       # int32 [E]; cumulative padded rows, expert e ends at [e]
    position_of_row: torch.Tensor   # int32 [T*K]; padded position of row t*K+k
    rows_per_expert: torch.Tensor   # int64 [E]; rows each expert receives (padding excluded)
    num_rows: int                   # T*K (also the padding sentinel)
    block_m: int

    @property
    def max_padded_rows(self) -> int:
        return self.sorted_row_ids.numel()


def max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded row count, rounded up to a whole block."""
    bound = num_rows + min(num_rows, num_experts) * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Sort (token, slot) rows by expert and pad every expert's segment to ``block_m``."""
    device = topk_ids.device
    num_rows = topk_ids.numel()
    padded_total = max_padded_rows(num_rows, num_experts, block_m)
    # Skipped rows (negative ids) go to an extra bin after the last expert; it gets no padded rows.
    expert_of_row = topk_ids.reshape(-1).long()
    expert_of_row = torch.where(expert_of_row < 0, num_experts, expert_of_row)

    rows_per_bin = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    rows_per_bin.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row))
    rows_per_expert = rows_per_bin[:num_experts]
    padded_per_expert = (rows_per_expert + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded_per_expert, 0)
    # The skip bin starts past every padded row, so its rows land outside the padded order.
    padded_start = torch.cat([padded_end - padded_per_expert, padded_end.new_full((1,), padded_total)])
    unpadded_start = torch.cumsum(rows_per_bin, 0) - rows_per_bin

    experts_sorted, rows_sorted = torch.sort(expert_of_row, stable=True)
    rank_in_expert = torch.arange(num_rows, device=device) - unpadded_start[experts_sorted]
    destination = padded_start[experts_sorted] + rank_in_expert

    # num_rows extra entries take the skipped rows' writes; only the padded order is kept.
    sorted_row_ids = torch.full((padded_total + num_rows,), num_rows, dtype=torch.int32, device=device)
    sorted_row_ids[destination] = rows_sorted.to(torch.int32)
    sorted_row_ids = sorted_row_ids[:padded_total]
    block_starts = torch.arange(0, padded_total, block_m, device=device)
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    expert_ends = padded_end.to(torch.int32)
    position_of_row = torch.empty(num_rows, dtype=torch.int32, device=device)
    position_of_row[rows_sorted] = destination.to(torch.int32)
    return ExpertAlignment(sorted_row_ids, block_expert_ids, expert_ends[-1:], expert_ends,
                           position_of_row, rows_per_expert, num_rows, block_m)


def moe_align_block_size_reference(topk_ids: torch.Tensor, num_experts: int,
                                   block_m: int) -> list[list[int]]:
    """Per expert, the rows it receives in ascending order (what the alignment must encode);
    rows with a negative id are in no expert's list."""
    flat = topk_ids.reshape(-1).tolist()
    return [[r for r, e in enumerate(flat) if e == expert] for expert in range(num_experts)]
