"""Tile configurations for the grouped expert GEMMs, and the shipped table that holds them.

A run looks its configuration up here instead of autotuning from scratch. The table lives in
``kernels/configs/<arch>.json`` (one file per GPU architecture, e.g. ``sm90.json`` for
H100/H200) and is written by ``benchmarks/moe_kernels.py --tune``. Keys are the problem class
(``bf16`` or ``fp8``, E, H, I) and, inside it, token counts; a lookup takes the tuned token
count nearest to the actual one (in log space). Untuned shapes fall back to a heuristic.

Both GEMMs of one call share ``block_m``: the token→expert alignment pads every expert's rows
to that size, and both kernels walk the same padded row blocks.

An entry may instead name another backend (bf16 only): ``{"backend": "grouped_mm"}``, torch's
CUTLASS grouped GEMMs with our permutation and combine around them (``grouped_mm_moe.py``); or
``{"backend": "triton_grouped_mm", "gemm1": {...}}``, our Triton first GEMM (the token gather in
its A-load, SiLU*mul in its epilogue: no scatter and no SiLU pass) followed by torch's CUTLASS
second GEMM and our combine. The benchmark writes, per tuned token count, whichever it measured
fastest. A tile's ``"weight_tma": true`` loads its weight tiles through TMA
and a tile's ``"persistent": true`` launches as many programs as the SMs hold, each walking
tiles; ``benchmarks/gemm_before_after.py --write-table`` sets both where that measured faster.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class GemmConfig:
    """One Triton launch configuration of a grouped expert GEMM."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    weight_tma: bool = False  # weight tiles through TMA where they can be (fused_moe.weight_tiles), else pointer loads
    persistent: bool = False  # the programs the SMs hold walk the tiles (fused_moe._launch)

    def to_json(self) -> dict:
        """The tile as a table entry writes it: every field, ``persistent`` only where set."""
        return {field: value for field, value in asdict(self).items() if field != "persistent" or value}

    @property
    def label(self) -> str:
        """The tile in one word, as the benchmarks print it: ``128x128x64 g8 w8 s3`` (loads aside)."""
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"


TRITON = "triton"          # our two grouped Triton GEMMs (fused_moe.py)
GROUPED_MM = "grouped_mm"  # torch._grouped_mm GEMMs with our Triton permutation/combine (bf16)
TRITON_GROUPED_MM = "triton_grouped_mm"  # our Triton GEMM 1 (gather + SiLU*mul fused), then torch's GEMM 2 (bf16)
BACKENDS = (TRITON, GROUPED_MM, TRITON_GROUPED_MM)


@dataclass(frozen=True)
class MoEConfig:
    """How one ``fused_experts`` call runs: the backend, and for Triton both GEMMs' tiles."""

    gemm1: GemmConfig | None = None  # up/gate projection with SiLU*mul epilogue
    gemm2: GemmConfig | None = None  # down projection with routing weight and scatter to token order
    backend: str = TRITON

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.backend == GROUPED_MM:
            if self.gemm1 is not None or self.gemm2 is not None:
                raise ValueError("backend='grouped_mm' takes no Triton tile configs; leave gemm1/gemm2 unset")
            return
        if self.backend == TRITON_GROUPED_MM:
            if self.gemm1 is None or self.gemm2 is not None:
                raise ValueError("backend='triton_grouped_mm' takes the first GEMM's tile config only (gemm1)")
            return
        if self.gemm1 is None or self.gemm2 is None:
            raise ValueError("backend='triton' needs both gemm1 and gemm2 tile configs")
        if self.gemm1.block_m != self.gemm2.block_m:
            raise ValueError(
                f"gemm1.block_m={self.gemm1.block_m} != gemm2.block_m={self.gemm2.block_m}; "
                "both GEMMs walk the same padded row blocks, use one block_m"
            )

    @property
    def block_m(self) -> int:
        return self.gemm1.block_m

    def to_json(self) -> dict:
        if self.backend == GROUPED_MM:
            return {"backend": GROUPED_MM}
        if self.backend == TRITON_GROUPED_MM:
            return {"backend": TRITON_GROUPED_MM, "gemm1": self.gemm1.to_json()}
        return {"gemm1": self.gemm1.to_json(), "gemm2": self.gemm2.to_json()}

    @staticmethod
    def from_json(entry: dict) -> "MoEConfig":
        backend = entry.get("backend", TRITON)
        if backend == GROUPED_MM:
            return MoEConfig(backend=GROUPED_MM)
        if backend == TRITON_GROUPED_MM:
            return MoEConfig(GemmConfig(**entry["gemm1"]), backend=TRITON_GROUPED_MM)
        return MoEConfig(GemmConfig(**entry["gemm1"]), GemmConfig(**entry["gemm2"]))


def problem_key(use_fp8: bool, num_experts: int, hidden_size: int, intermediate_size: int) -> str:
    """The table key of one MoE layer shape, e.g. ``bf16_E128_H4096_I1536``."""
    kind = "fp8" if use_fp8 else "bf16"
    return f"{kind}_E{num_experts}_H{hidden_size}_I{intermediate_size}"


@lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    """CUDA device ``index``'s compute capability, asked of the driver once: the experts kernels
    look at it on every call (the table's file, TMA, DeepGEMM)."""
    return torch.cuda.get_device_capability(index)


def arch_name(device: torch.device) -> str:
    """``sm90`` for H100/H200; the config file name for this device."""
    major, minor = device_capability(torch.cuda.current_device() if device.index is None else device.index)
    return f"sm{major}{minor}"


@lru_cache(maxsize=None)
def _load_table(arch: str) -> dict:
    path = CONFIG_DIR / f"{arch}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())["configs"]


def clear_config_cache() -> None:
    """Forget the loaded tables (after the tuner rewrote one)."""
    _load_table.cache_clear()


def heuristic_config(num_tokens: int, top_k: int, num_experts: int, use_fp8: bool,
                     on_gpu: bool) -> MoEConfig:
    """A reasonable configuration when the table has no entry for this shape.

    On CPU (the Triton interpreter) small tiles keep the numpy work small. FP8 needs
    ``block_k == 128`` (one activation scale group per K step) and gemm1 ``block_n == 128``
    (one output scale group per tile, quantised in the epilogue).
    """
    if not on_gpu:
        bm = 16
        if use_fp8:
            return MoEConfig(GemmConfig(bm, 128, 128, 1, 4, 1), GemmConfig(bm, 32, 128, 1, 4, 1))
        return MoEConfig(GemmConfig(bm, 32, 32, 1, 4, 1), GemmConfig(bm, 32, 32, 1, 4, 1))
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    bm = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64 if rows_per_expert <= 96 else 128
    warps = 4 if bm <= 32 else 8
    bk = 128 if use_fp8 else 64
    return MoEConfig(GemmConfig(bm, 128, bk, 8, warps, 3), GemmConfig(bm, 128, bk, 8, warps, 3))


def nearest_token_count(entries: dict[str, dict], num_tokens: int) -> str:
    """The key of the table entry a call with ``num_tokens`` uses: the nearest count in log space."""
    return min(entries, key=lambda t: abs(math.log(int(t)) - math.log(max(num_tokens, 1))))


def get_config(num_tokens: int, top_k: int, num_experts: int, hidden_size: int,
               intermediate_size: int, use_fp8: bool, device: torch.device,
               allow_grouped_mm: bool = True) -> MoEConfig:
    """The shipped configuration for this shape and token count, or the heuristic one.

    With ``allow_grouped_mm=False`` (fp16/fp32 activations: torch's grouped GEMM is bf16-only)
    only Triton entries are considered.
    """
    on_gpu = device.type == "cuda"
    if on_gpu:
        entries = _load_table(arch_name(device)).get(
            problem_key(use_fp8, num_experts, hidden_size, intermediate_size)) or {}
        if not allow_grouped_mm:
            entries = {t: e for t, e in entries.items() if e.get("backend", TRITON) == TRITON}
        if entries:
            return MoEConfig.from_json(entries[nearest_token_count(entries, num_tokens)])
    return heuristic_config(num_tokens, top_k, num_experts, use_fp8, on_gpu)
