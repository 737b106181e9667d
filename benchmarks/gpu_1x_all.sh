#!/usr/bin/env bash
# The one-GPU runs of benchmarks/GPU_RUNBOOK.md ("One GPU" rows 1-5) as one sequence, for a
# machine with vLLM and SGLang installed side by side (docs/gpu.md). Meant to run detached, so
# that no single shell session has to last the whole sequence:
#
#   setsid nohup bash benchmarks/gpu_1x_all.sh OUT_DIR > /dev/null 2>&1 < /dev/null &
#   cat OUT_DIR/progress.log        # one line per step: its start, its end and exit status
#
# Steps, in this order (STEPS picks a subset, e.g. STEPS="fp8 kernels sglang-tiny"):
#   checks       vllm_gpu_1x.sh checks: tiny bf16 and block-FP8 checks against fp32 (~5 min)
#   bf16         vllm_gpu_1x.sh bf16: stock's MoE tile tuned, then Qwen3-30B-A3B stock vs AsyncEP (~8 min)
#   fp8          vllm_gpu_1x.sh fp8: stock's block-FP8 tile tuned, then Qwen3-30B-A3B block FP8, stock
#                as vLLM chooses and forced onto DeepGEMM against AsyncEP, then bf16 AsyncEP, every
#                server profiled (~13 min: the first stock FP8 start's DeepGEMM warm-up JIT-builds
#                1,849 kernels on a fresh machine)
#   kernels      tests/test_kernels_gpu.py -k "deepgemm or alignment or weight_tiles" (both FP8 row layouts
#                against the reference; the alignment against its torch definition; TMA weight tiles against
#                pointer loads), moe_align.py --sweep (ours beside vLLM's CUDA alignment), moe_gemm_tma.py
#                (our GEMMs with TMA or pointer weight loads, beside CUTLASS's; it changes no tile: the
#                tiles step does), then moe_kernels.py with --select-backends (each shape's bf16 backend),
#                each but moe_gemm_tma in a process that imported vLLM (~5 min); the rewritten
#                kernels/configs/<arch>.json is copied to OUT_DIR/kernels-configs/
#   tiles        no vLLM: tests/test_kernels.py -k "tma or persistent or validation" and
#                tests/test_kernels_gpu.py -k "turns or tma or layer_shapes" on the GPU, the bf16 layer
#                twice on the shipped table (moe_kernels.py, bf16 sides: layer_vs_gemm_only and the same
#                ratio timed in turns), both GEMMs against BEFORE (an earlier kernels/fused_moe.py; this
#                checkout's own when unset: the noise, and the shipped tiles launched persistent) twice
#                with gemm_before_after.py, --write-table on the two runs, and the layer twice more on the
#                rewritten table if it changed (~6 min); the table goes to OUT_DIR/kernels-configs/
#   sglang-tiny  sglang_gpu_check.py --parts tiny (~2.5 min)
#   sglang-30b   sglang_gpu_check.py --parts 30b, all 48 layers (~5 min)
#
# OUT_DIR/machine.txt (written once) records the machine: the GPU's power limits and clocks as
# nvidia-smi reports them, the CPU model and core count, the memory. The last lines of
# progress.log give the size of the JIT caches the steps filled (DeepGEMM's, vLLM's compile
# cache, Triton's): the first block-FP8 server's start spends minutes JIT-building DeepGEMM
# kernels on a fresh machine, which a carried cache would save if it is small enough to travel.
#
# Settings (environment): STEPS (all but tiles), VLLM_SITE (/tmp/site) and SGLANG_SITE (/tmp/sgsite):
# the folders each engine was installed into, put on PYTHONPATH for its steps; each step's own
# settings (vllm_gpu_1x.sh's LAYERS, ...) pass through, BUDGET_S with a default of 1200 s
# (no 10-minute call bounds a detached step), BEFORE for tiles. Results: OUT_DIR/vllm,
# OUT_DIR/kernels, OUT_DIR/tiles, OUT_DIR/sglang, each step's output in OUT_DIR/<step>.log.
set -uo pipefail

out=${1:?usage: gpu_1x_all.sh OUT_DIR}
steps=${STEPS:-checks bf16 fp8 kernels sglang-tiny sglang-30b}
vllm_site=${VLLM_SITE:-/tmp/site}
sglang_site=${SGLANG_SITE:-/tmp/sgsite}
mkdir -p "$out/vllm" "$out/kernels" "$out/sglang"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1

progress() { echo "[$(date +%T)] $*" >> "$out/progress.log"; }

layer_runs() {  # layer_runs NAME: the bf16 layer twice on the table as it stands, OUT_DIR/tiles/moe_kernels-NAME-{1,2}.json
    local run status=0
    for run in 1 2; do
        python3 benchmarks/moe_kernels.py --shapes qwen3-235b-a22b qwen3-30b-a3b --tokens 8192 16384 32768 \
            --sides bf16_triton bf16_gmm_ours --out "$out/tiles/moe_kernels-$1-$run.json" || status=1
    done
    return $status
}

tiles() {  # the tiles step (see the header); fails if a test or a benchmark did, after running them all
    local status=0 before=${BEFORE:-kernels/fused_moe.py} run
    mkdir -p "$out/tiles" "$out/kernels-configs"
    cp kernels/configs/sm90.json "$out/tiles/sm90-shipped.json"
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "tma or persistent or validation" || status=1
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py -k "turns or tma or layer_shapes" ||
        status=1
    layer_runs shipped || status=1
    for run in 1 2; do
        python3 benchmarks/gemm_before_after.py --before "$before" --dtypes bf16 fp8 \
            --out "$out/tiles/gemm_before_after-$run.json" || status=1
    done
    python3 benchmarks/gemm_before_after.py --write-table \
        --from-results "$out/tiles/gemm_before_after-1.json" "$out/tiles/gemm_before_after-2.json" || status=1
    cp kernels/configs/sm90.json "$out/kernels-configs/sm90.json"
    if ! cmp -s kernels/configs/sm90.json "$out/tiles/sm90-shipped.json"; then
        layer_runs rewritten || status=1
    fi
    return $status
}

run_step() {  # run_step NAME: one step, its output in OUT_DIR/NAME.log, its status in progress.log
    local name=$1 status tests
    progress "$name: start"
    case $name in
    checks | bf16 | fp8)
        PYTHONPATH=$vllm_site BUDGET_S=${BUDGET_S:-1200} bash benchmarks/vllm_gpu_1x.sh "$name" "$out/vllm" ;;
    kernels)  # vLLM imported first in both: DeepGEMM is then the copy vLLM ships
        PYTHONPATH=$vllm_site python3 -c 'import sys, pytest, vllm
sys.exit(pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py",
                      "-k", "deepgemm or alignment or weight_tiles"]))'
        tests=$?  # the benchmarks run either way; the step fails if any did
        PYTHONPATH=$vllm_site python3 benchmarks/moe_align.py --sweep --out "$out/kernels/moe_align.json" ||
            tests=1
        python3 benchmarks/moe_gemm_tma.py --out "$out/kernels/moe_gemm_tma.json" || tests=1
        PYTHONPATH=$vllm_site python3 -c 'import runpy, sys, vllm  # fp8_selected then runs on vLLM'"'"'s DeepGEMM
sys.argv = ["moe_kernels.py", "--shapes", "qwen3-235b-a22b", "qwen3-30b-a3b", "--tokens", "8192", "16384", "32768",
            "--sides", "bf16_triton,bf16_gmm_ours,bf16_triton_gmm,fp8_selected,deepgemm_fp8,deepgemm_fp8_psum",
            "--select-backends",
            "--out", sys.argv[1]]
runpy.run_path("benchmarks/moe_kernels.py", run_name="__main__")' "$out/kernels/moe_kernels.json" &&
            mkdir -p "$out/kernels-configs" && cp kernels/configs/*.json "$out/kernels-configs/" && [ "$tests" = 0 ] ;;
    tiles)
        tiles ;;
    sglang-tiny)
        PYTHONPATH=$sglang_site python3 benchmarks/sglang_gpu_check.py --parts tiny --results-dir "$out/sglang" ;;
    sglang-30b)
        PYTHONPATH=$sglang_site python3 benchmarks/sglang_gpu_check.py --parts 30b --results-dir "$out/sglang" ;;
    *)
        echo "unknown step $name: checks, bf16, fp8, kernels, tiles, sglang-tiny or sglang-30b"; (exit 2) ;;
    esac > "$out/$name.log" 2>&1
    status=$?
    progress "$name: exit $status ($(tail -1 "$out/$name.log" | cut -c1-160))"
}

machine() {  # what the machine is, for comparing runs across machines: GPU limits, CPU, memory
    echo "date: $(date -u +%FT%TZ)"
    local fields=index,name,uuid,driver_version,pstate,temperature.gpu
    fields+=,power.limit,power.default_limit,power.max_limit,clocks.max.sm,clocks.applications.graphics
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --format=csv --query-gpu="$fields"
    else
        echo "nvidia-smi: not found"
    fi
    echo "CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
}
[ -f "$out/machine.txt" ] || machine > "$out/machine.txt" 2>&1

jit_caches() {  # how large the JIT caches grew: whether carrying them to a fresh machine would pay
    local dir
    for dir in "${DG_JIT_CACHE_DIR:-$HOME/.deep_gemm}" "${VLLM_CACHE_ROOT:-$HOME/.cache/vllm}" \
            "${TRITON_CACHE_DIR:-$HOME/.triton}"; do
        [ -d "$dir" ] && printf '%s %s; ' "$(du -sh "$dir" 2>/dev/null | cut -f1)" "${dir/#$HOME/\~}"
    done
}

progress "steps: $steps"
for step in $steps; do
    run_step "$step"
done
progress "JIT caches: $(jit_caches)"
progress "done"
