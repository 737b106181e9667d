"""Token->expert alignment: sort the (token, slot) pairs by expert, pad each expert to block_m.

    topk_ids [T, K] --flatten--> row r = t*K + k, expert topk_ids[t, k]
        --stable sort by expert, pad every expert's rows to a multiple of block_m-->
    sorted_row_ids [max_padded_rows]   row r, or the sentinel T*K in padding slots
    block_expert_ids [max_blocks]      the expert of each block of block_m padded rows
                                       (E for the blocks past the used rows)
    num_padded_rows [1]                rows actually used (device tensor: no host sync)
    expert_ends [E]                    padded end of each expert's segment (the ``offs`` of
                                       ``torch._grouped_mm``)
    rows_per_expert [E]                rows each expert receives, padding excluded
    position_of_row [T*K]              where row r sits in the padded order (inverse of the sort);
                                       ``>= max_padded_rows`` for a skipped row

Within an expert's segment the rows come first, in ascending row order (stable), then the
padding. A row whose expert id is negative (``-1``: the expert is not here, as vLLM's expert
maps mark experts of other EP ranks) is *skipped*: it gets no padded position, no GEMM row,
and contributes nothing to its token's output. Every consumer tells a skipped row by
``position_of_row[r] >= max_padded_rows`` (skipped rows are numbered on from
``max_padded_rows`` in row order).

The grouped GEMMs launch one program row per block of ``block_m`` padded rows, read the
block's expert from ``block_expert_ids``, and return at once when the block lies past
``num_padded_rows``. The launch size uses the host-known bound
``max_padded_rows = T*K + min(T*K, E) * (block_m - 1)``, so nothing waits on the GPU.
Experts that receive no token get no block.

Three Triton kernels do it (:func:`moe_align_block_size_triton`, the default on CUDA), a
counting sort over chunks of ``ROWS_PER_PROGRAM`` consecutive rows; every value is an exact
integer, so the result equals the plain-torch definition (:func:`moe_align_block_size_torch`,
~20 small torch ops) bit for bit. Each row has a bin: its expert, E if skipped, E + 1 past the
last row.

    [count]  program p, chunk p: a histogram of its rows' bins -> counts[b, p], b <= E
    [scan]   program b: row b of counts -> its exclusive prefix sum over the chunks (the rows
             of bin b in the chunks before p), in place, and totals[b]
    [place]  program p: from the totals, each expert's padded segment (a prefix sum over E);
             with its column of the scan, where the chunk's first row of each bin goes (skipped
             rows: numbered on from max_padded_rows). The chunk's rows sorted by (bin, row)
             (``tl.sort``): the i-th goes to that first position + i - (rows of lower bins in
             the chunk) -> position_of_row[r], sorted_row_ids[position] = r. The programs
             share out the rest: the sentinel in each expert's padding slots and in the unused
             tail, and each block's expert. Program 0 writes expert_ends and rows_per_expert.

No program loops over rows, and none re-reads the whole counts table: the work per row is a
histogram, a sort of 128 keys and a gather, not a pass over every expert.
vLLM's and SGLang's CUDA kernels place rows with atomics (any order within an expert); their
Triton versions (``moe_align_block_size_stage1..4``) are stable but place one row per loop
iteration. ``benchmarks/moe_align.py`` times ours beside vLLM's CUDA kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROWS_PER_PROGRAM = 128  # a chunk: the rows one count and one place program take (a power of two)
TILE_ELEMENTS = 4096    # a [bins, slots] tile of the padding pass: slots per step = TILE_ELEMENTS / bins
SCAN_TILE = 1024        # chunks per step of the scan


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
    """Sort (token, slot) rows by expert and pad every expert's segment to ``block_m``.

    The Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1``), plain torch otherwise
    and for zero rows; both give identical tensors.
    """
    if topk_ids.numel() and (topk_ids.is_cuda or INTERPRETING):
        return moe_align_block_size_triton(topk_ids, num_experts, block_m)
    return moe_align_block_size_torch(topk_ids, num_experts, block_m)


@triton.jit
def _bin_of_rows(topk_ids_ptr, rows, num_rows, NUM_EXPERTS: tl.constexpr):
    """Each row's bin (int32): its expert, NUM_EXPERTS if skipped (negative id), NUM_EXPERTS + 1
    past num_rows."""
    expert = tl.load(topk_ids_ptr + rows, mask=rows < num_rows, other=NUM_EXPERTS + 1).to(tl.int32)
    return tl.where(expert < 0, NUM_EXPERTS, expert)


# The sizes change with every token count: no specialisation on them, so no compile per count.
@triton.jit(do_not_specialize=["num_rows", "num_programs"])
def _count_rows_kernel(
    topk_ids_ptr, counts_ptr, num_rows, num_programs,
    NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr,
):
    """counts[e, p] = rows of expert e in chunk p; counts[E, p] = skipped rows there."""
    pid = tl.program_id(0)
    rows = pid * CHUNK + tl.arange(0, CHUNK)
    counts = tl.histogram(_bin_of_rows(topk_ids_ptr, rows, num_rows, NUM_EXPERTS), NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(counts_ptr + bins * num_programs + pid, counts, mask=bins <= NUM_EXPERTS)


@triton.jit(do_not_specialize=["num_programs"])
def _scan_counts_kernel(counts_ptr, totals_ptr, num_programs, TILE: tl.constexpr):
    """Row e of counts (expert e's rows per chunk; row E: skipped rows) -> its exclusive prefix
    sum over the chunks, in place; totals[e] = the row's sum."""
    row_ptr = counts_ptr + tl.program_id(0) * num_programs
    carry = tl.zeros([], dtype=tl.int32)  # rows of this bin in the tiles before
    for first in range(0, num_programs, TILE):
        programs = first + tl.arange(0, TILE)
        counts = tl.load(row_ptr + programs, mask=programs < num_programs, other=0)
        inclusive = tl.cumsum(counts, axis=0)
        tl.store(row_ptr + programs, carry + inclusive - counts, mask=programs < num_programs)
        carry += tl.sum(counts, axis=0)
    tl.store(totals_ptr + tl.program_id(0), carry)


@triton.jit(do_not_specialize=["num_rows", "num_programs", "max_padded_rows", "block_m"])
def _place_rows_kernel(
    topk_ids_ptr, rows_before_ptr, totals_ptr, sorted_row_ids_ptr, position_of_row_ptr, block_expert_ids_ptr,
    expert_ends_ptr, rows_per_expert_ptr, num_rows, num_programs, max_padded_rows, block_m,
    NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr, PIECE: tl.constexpr,
):
    """Place chunk p's rows (stable within each expert); share out the padding sentinels and the
    block experts among the programs; program 0 writes the segment ends."""
    pid = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    is_expert = bins < NUM_EXPERTS
    total = tl.load(totals_ptr + bins, mask=is_expert, other=0)
    padded = (total + block_m - 1) // block_m * block_m
    padded_end = tl.cumsum(padded, axis=0)
    segment_start = padded_end - padded
    if pid == 0:
        tl.store(expert_ends_ptr + bins, padded_end, mask=is_expert)
        tl.store(rows_per_expert_ptr + bins, total.to(tl.int64), mask=is_expert)

    # Where this chunk's first row of each bin goes: its segment (skipped rows: numbered on from
    # max_padded_rows) after the bin's rows in the chunks before.
    first_position = tl.where(is_expert, segment_start, max_padded_rows) + tl.load(
        rows_before_ptr + bins * num_programs + pid, mask=bins <= NUM_EXPERTS, other=0)
    # The chunk's rows sorted by (bin, row): the i-th of them is the (i - first_in_chunk[bin])-th
    # row of its bin in this chunk.
    local = tl.arange(0, CHUNK)
    bin_of_row = _bin_of_rows(topk_ids_ptr, pid * CHUNK + local, num_rows, NUM_EXPERTS)
    rows_in_chunk = tl.histogram(bin_of_row, NUM_BINS)
    first_in_chunk = tl.cumsum(rows_in_chunk, axis=0) - rows_in_chunk
    order = tl.sort(bin_of_row * CHUNK + local)
    sorted_bin = order // CHUNK
    row = pid * CHUNK + order % CHUNK
    position = tl.gather(first_position - first_in_chunk, sorted_bin, 0) + local
    tl.store(position_of_row_ptr + row, position, mask=row < num_rows)
    tl.store(sorted_row_ids_ptr + position, row, mask=sorted_bin < NUM_EXPERTS)

    # The sentinel in every padding slot: each expert's last block past its rows, [rows_end,
    # padded_end) (at most block_m - 1 slots), PIECE slots at a time across the programs; then
    # the unused tail [used_end, max_padded_rows) in PIECEs across the programs.
    rows_end = segment_start + total
    sentinel = tl.zeros([NUM_BINS, PIECE], dtype=tl.int32) + num_rows
    for first in range(pid * PIECE, block_m - 1, num_programs * PIECE):
        slots = first + tl.arange(0, PIECE)
        tl.store(sorted_row_ids_ptr + rows_end[:, None] + slots[None, :], sentinel,
                 mask=slots[None, :] < (padded_end - rows_end)[:, None])
    used_end = tl.sum(padded, axis=0)
    for first in range(used_end + pid * PIECE, max_padded_rows, num_programs * PIECE):
        positions = first + tl.arange(0, PIECE)
        tl.store(sorted_row_ids_ptr + positions, tl.zeros([PIECE], dtype=tl.int32) + num_rows,
                 mask=positions < max_padded_rows)

    # Each block's expert: the experts whose segment ends at or before its start (E past the used rows).
    ends = tl.where(is_expert, padded_end, max_padded_rows)  # non-experts end at no position
    num_blocks = max_padded_rows // block_m
    for first in range(pid * PIECE, num_blocks, num_programs * PIECE):
        blocks = first + tl.arange(0, PIECE)
        expert = tl.sum((ends[:, None] <= blocks[None, :] * block_m).to(tl.int32), axis=0)
        tl.store(block_expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)


def launch_shape(num_rows: int, num_experts: int) -> tuple[int, int, int]:
    """``(NUM_BINS, PIECE, programs)``: the experts plus the skipped and past-the-end bins,
    rounded up to a power of two; the padding pass's piece, so that a ``[NUM_BINS, PIECE]`` tile
    has ``TILE_ELEMENTS``; one program per ``ROWS_PER_PROGRAM`` rows."""
    num_bins = max(16, triton.next_power_of_2(num_experts + 2))
    return num_bins, max(16, TILE_ELEMENTS // num_bins), triton.cdiv(num_rows, ROWS_PER_PROGRAM)


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """:func:`moe_align_block_size` in three Triton launches (count, scan, place); needs ``T*K >= 1``."""
    device = topk_ids.device
    num_rows = topk_ids.numel()
    padded_total = max_padded_rows(num_rows, num_experts, block_m)
    num_bins, piece, programs = launch_shape(num_rows, num_experts)
    # One int32 buffer: the [E + 1, P] counts (scanned in place into rows before each chunk), then E + 1 totals.
    scratch = torch.empty((num_experts + 1) * (programs + 1), dtype=torch.int32, device=device)
    counts, totals = scratch[:(num_experts + 1) * programs], scratch[(num_experts + 1) * programs:]
    sorted_row_ids = torch.empty(padded_total, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(padded_total // block_m, dtype=torch.int32, device=device)
    expert_ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    position_of_row = torch.empty(num_rows, dtype=torch.int32, device=device)
    rows_per_expert = torch.empty(num_experts, dtype=torch.int64, device=device)
    ids = topk_ids.reshape(-1)
    _count_rows_kernel[(programs,)](ids, counts, num_rows, programs, NUM_EXPERTS=num_experts, NUM_BINS=num_bins,
                                    CHUNK=ROWS_PER_PROGRAM, num_warps=4)
    _scan_counts_kernel[(num_experts + 1,)](counts, totals, programs,
                                            TILE=max(16, min(triton.next_power_of_2(programs), SCAN_TILE)),
                                            num_warps=4)
    _place_rows_kernel[(programs,)](
        ids, counts, totals, sorted_row_ids, position_of_row, block_expert_ids, expert_ends, rows_per_expert,
        num_rows, programs, padded_total, block_m,
        NUM_EXPERTS=num_experts, NUM_BINS=num_bins, CHUNK=ROWS_PER_PROGRAM, PIECE=piece, num_warps=4,
    )
    return ExpertAlignment(sorted_row_ids, block_expert_ids, expert_ends[-1:], expert_ends,
                           position_of_row, rows_per_expert, num_rows, block_m)


def moe_align_block_size_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """:func:`moe_align_block_size` in plain torch device ops (the definition the kernels match)."""
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
