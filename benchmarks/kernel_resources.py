"""What our grouped GEMMs compile to on sm90, without a GPU: registers, spills, shared memory, copies.

Triton ships ``ptxas`` and ``cuobjdump``, so each kernel can be compiled for an H100/H200
(sm90) on any machine. For every tile configuration of the shipped table
(``kernels/configs/sm90.json``), both GEMMs (``kernels/fused_moe.py``), in bf16 and block FP8,
with the weight tiles by pointer loads and through TMA (``GemmConfig.weight_tma``), this
reports what decides whether a tile can run well before it is timed:

    registers    per thread (cuobjdump -res-usage REG); 255 is the ceiling
    spill_bytes  the thread's stack frame (STACK): registers that did not fit, kept in local memory
    shared_kib   shared memory of the pipeline's stages
    tma_copies   cp.async.bulk.tensor instructions in the PTX (TMA tile copies, static count)
    async_copies cp.async instructions of pointer loads (per-thread 16-byte copies, static count)
    wgmma        wgmma.mma_async instructions (static count)

The kernels are compiled as the JIT would specialise them at the Qwen3 shapes (pointers and
strides 16-aligned). Results depend on the Triton version, which the JSON records.

    python benchmarks/kernel_resources.py    # table + benchmarks/results/kernel_resources-sm90-triton<version>.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import triton

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_resources: error: TRITON_INTERPRET=1 is set; compiling needs the real compiler, unset it")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from zeroprefill.kernels import fused_moe  # noqa: E402
from zeroprefill.kernels.moe_config import CONFIG_DIR, GemmConfig  # noqa: E402

ARCH = 90
KERNELS = {"gemm1": fused_moe._gemm1_gate_up_silu_kernel, "gemm2": fused_moe._gemm2_down_scatter_kernel}
# Argument types as the JIT sees them at serving shapes; everything else is an int.
SCALE_AND_INDEX_POINTERS = {"x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "act_scale_ptr": "*fp32",
                            "topk_weights_ptr": "*fp32", "sorted_row_ids_ptr": "*i32",
                            "block_expert_ids_ptr": "*i32", "num_padded_rows_ptr": "*i32"}
NOT_16_DIVISIBLE = ("top_k", "max_blocks_m")  # the JIT marks the other ints (strides, sizes) as 16-divisible
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def table_tiles() -> list[tuple[str, str, GemmConfig]]:
    """Every distinct (dtype, gemm, tile) in the shipped sm90 table, in table order."""
    table = json.loads((CONFIG_DIR / f"sm{ARCH}.json").read_text())["configs"]
    tiles: list[tuple[str, str, GemmConfig]] = []
    for problem, entries in table.items():
        dtype = problem.split("_")[0]
        for entry in entries.values():
            for gemm in ("gemm1", "gemm2"):
                if gemm in entry:
                    tile = (dtype, gemm, replace(GemmConfig(**entry[gemm]), weight_tma=False))
                    if tile not in tiles:
                        tiles.append(tile)
    return tiles


def compile_tile(dtype: str, gemm: str, cfg: GemmConfig, workdir: Path) -> dict:
    """Compile one GEMM for sm90 and read its resources from the cubin and the PTX."""
    fn = KERNELS[gemm]
    operand = "*fp8e4nv" if dtype == "fp8" else "*bf16"
    constexprs = dict(USE_FP8=dtype == "fp8", UP_SCALE_UNIFORM=True, EVEN_K=True, WEIGHT_TMA=cfg.weight_tma,
                      ACT_TMA=cfg.weight_tma, PERSISTENT=cfg.persistent, DOT_IN_FP32=False, ROUND_IN_FP32=False,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "w_desc":  # GEMM 1's bf16 pair tile is a 4-D box (fused_moe.gate_up_tiles)
            pair_tile = gemm == "gemm1" and dtype == "bf16"
            box = f"1, {cfg.block_n}, 2, {cfg.block_k}" if pair_tile else f"{cfg.block_n}, {cfg.block_k}"
            signature[name] = f"tensordesc<{operand[1:]}[{box}]>" if cfg.weight_tma else operand
        elif name == "act_desc":  # GEMM 2's activation rows ride with its weight tiles (fused_moe.activation_tiles)
            signature[name] = f"tensordesc<{operand[1:]}[{cfg.block_m}, {cfg.block_k}]>" if cfg.weight_tma else operand
        elif name.endswith("_ptr"):
            signature[name] = SCALE_AND_INDEX_POINTERS.get(name, operand)
        else:
            signature[name] = "i32"
    if gemm == "gemm2" or dtype == "bf16":  # outputs: GEMM 2's slots and bf16 act are bf16
        signature["out_ptr" if gemm == "gemm2" else "act_ptr"] = "*bf16"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name][0] in "*i" and name not in NOT_16_DIVISIBLE}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, aligned), target=GPUTarget("cuda", ARCH, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    cubin = workdir / f"{gemm}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    ptx = compiled.asm["ptx"]
    return {
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "spill_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "shared_kib": round(compiled.metadata.shared / 1024, 1),
        "tma_copies": ptx.count("cp.async.bulk.tensor"),
        "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "wgmma": ptx.count("wgmma.mma_async"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/kernel_resources-sm90-triton<version>.json)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"kernel_resources-sm{ARCH}-triton{triton.__version__}.json")
    rows = []
    print(f"{'gemm':5s} {'dtype':5s} {'tile':33s} {'loads':5s} {'regs':>4s} {'spill B':>7s} {'smem KiB':>8s} "
          f"{'TMA':>4s} {'cp.async':>8s} {'wgmma':>5s}")
    with tempfile.TemporaryDirectory() as workdir:
        for dtype, gemm, cfg in table_tiles():
            for weight_tma in (False, True):
                tile = replace(cfg, weight_tma=weight_tma)
                label = tile.label + (" persistent" if tile.persistent else "")
                row = {"gemm": gemm, "dtype": dtype, "tile": label, "loads": "tma" if weight_tma else "ptr",
                       **compile_tile(dtype, gemm, tile, Path(workdir))}
                rows.append(row)
                print(f"{gemm:5s} {dtype:5s} {row['tile']:33s} {row['loads']:5s} {row['registers']:4d} "
                      f"{row['spill_bytes']:7d} {row['shared_kib']:8.1f} {row['tma_copies']:4d} "
                      f"{row['async_copies']:8d} {row['wgmma']:5d}", flush=True)
    meta = {"command": " ".join(["python benchmarks/kernel_resources.py", *sys.argv[1:]]), "arch": f"sm{ARCH}",
            "triton": triton.__version__, "tiles": f"kernels/configs/sm{ARCH}.json, each with both weight loads",
            "columns": {"registers": "per thread", "spill_bytes": "stack frame per thread",
                        "tma_copies, async_copies, wgmma": "static instruction counts in the PTX"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
