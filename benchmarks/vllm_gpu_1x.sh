#!/usr/bin/env bash
# AsyncEP against stock vLLM on ONE GPU (H100 or H200), in three calls.
#
#   bash benchmarks/vllm_gpu_1x.sh checks OUT_DIR # call 1: the tiny checks against fp32 (bf16 and
#                                                 # block FP8, stock and AsyncEP, both test files at
#                                                 # once; ~5 min)
#   bash benchmarks/vllm_gpu_1x.sh bf16 OUT_DIR   # call 2: stock vLLM's MoE tile tuned for the 30B
#                                                 # shape, then Qwen3-30B-A3B bf16, stock (tuned) then
#                                                 # AsyncEP (~8 min)
#   bash benchmarks/vllm_gpu_1x.sh fp8 OUT_DIR    # call 3: stock vLLM's block-FP8 Triton tile tuned
#                                                 # (--dtype fp8_w8a8), then Qwen3-30B-A3B block FP8,
#                                                 # stock (tuned Triton, vLLM's own backend choice),
#                                                 # stock forced onto DeepGEMM (--moe-backend
#                                                 # deep_gemm: its fastest FP8 layout on one H100),
#                                                 # then AsyncEP; bf16 AsyncEP again, so that FP8
#                                                 # against bf16 is measured on one machine; every
#                                                 # server profiled (~13 min on a fresh machine: run
#                                                 # it detached with BUDGET_S=1200, as gpu_1x_all.sh
#                                                 # does)
#
# Call 3's timings on a fresh H100 (2026-12-07): the first stock FP8 server's start JIT-builds
# ~1,849 DeepGEMM kernels for the dense layers (5.3 min); the DeepGEMM-forced stock then starts in
# 1.7 min, AsyncEP FP8 in 1.5 min, bf16 AsyncEP in 1.4 min; each measurement with its profile
# ~50 s. Tuning, where no table tuned earlier is found, adds up to ~3 min (TUNE_BUDGET_S of tile
# trials, its start-up, Triton compiles).
#
# Writes into OUT_DIR (the GPU is h100 or h200, from nvidia-smi):
#   vllm_gpu_check-<gpu>x1.json  tiny bf16 checks (tests/test_vllm_gpu.py -k tiny)
#   vllm_fp8-<gpu>x1.json        tiny FP8 checks (call 1), then the FP8 throughput runs (call 3)
#   vllm_serve-<gpu>x1.json      bf16 throughput runs (call 2)
#   vllm_moe_configs/            stock vLLM's tuned tile tables for the 30B shape (bf16: call 2;
#                                block FP8: call 3) under vLLM's file names, and their tuning records
#   tune_vllm_moe*.log           the tuning runs' output (-fp8 for call 3's)
#   *-logs/, tiny-*.log          server logs and the pytest output
# Call 3 adds to OUT_DIR/vllm_fp8-<gpu>x1.json (call 1's tiny FP8 record, or the committed one);
# summary.asyncep_fp8_vs_asyncep_bf16 compares its two AsyncEP runs, both of this call;
# summary.asyncep_fp8_vs_stock_fp8 compares AsyncEP FP8 with the fastest stock FP8 layout that
# ran (summary.best_stock_layout_fp8 names it); summary.asyncep_fp8_vs_asyncep_fp8_psum the
# two FP8 row layouts of DeepGEMM's GEMMs inside AsyncEP (m_indices, the default, against layout
# asyncep-fp8-psum).
#
# Settings (environment): LAYERS (48: all of Qwen3-30B-A3B; the same count for every run),
# BATCHED (--max-num-batched-tokens, 32768, all layouts), CONTEXT (2048 tokens per request),
# DURATION_S (15), WARMUP_S (5), DRAIN_S (10), OPEN_LOOP (empty: none; e.g. "0.8" adds Poisson
# arrivals at 0.8 x stock's peak, ~17 s per server), CONCURRENCY (96: 6 token budgets of requests
# in flight; at 48 the FP8 servers' GPU idled 19-47% of the timed windows, at 96 12-18%),
# PROFILE (1: profiles every server after its timed window, ~10 s each, for the GPU time per
# layer that the throughput ratios are set against; empty: none), TINY_TIMEOUT_S (420: the FP8 servers' start-up
# alone took 150 s on an H100, their graph capture 83 s of it), TUNE_BUDGET_S (150: how long
# tuning may try tiles; 0 skips it and stock runs vLLM's default tile), STOCK_MOE_CONFIGS (empty:
# tune; a folder of tables tuned earlier, e.g. benchmarks/results/vllm_moe_configs, is used instead
# of tuning where it holds one for this GPU model), FP8_FORCED_STOCK
# (stock-deepgemm: the stock layouts of call 3 with a MoE backend forced, e.g. "stock-deepgemm
# stock-flashinfer-cutlass"; empty: none), BF16_FORCED_STOCK (empty: none; the same for call 2,
# e.g. stock-flashinfer-cutlass: vLLM 0.26-0.32 rank FlashInfer's bf16 MoE behind Triton on Hopper
# as slower there, fused_moe/oracle/unquantized.py), FP8_ASYNCEP_VARIANTS (empty: none; asyncep-fp8-psum
# serves DeepGEMM's psum row layout, 15-18% below the default m_indices in both runs so far),
# FP8_STOCK (1; 0: call 3 serves no stock layout and tunes nothing, only AsyncEP's FP8 against its
# bf16, for a kernel change on our side when stock's FP8 runs stand and device time is short),
# API_SERVERS (empty: vLLM's default, one API server per data-parallel rank; e.g. 2: every server
# runs two: with one and vLLM's own request validation, the one-GPU closed loops of the faster
# FP8 servers levelled off at 32 requests of 2,048 tokens per second with the engine's queue
# empty, H100, 2026-12-07; with the plugin's validation one kept every queue full),
# METRICS_INTERVAL_S (empty: 0.5 s between readings of the server's /metrics; 0: only at the
# load's start and the window's ends),
# BUDGET_S (560: the call's whole budget; the
# throughput runs get what tuning leaves), PYTHON (python3).
set -uo pipefail

phase=${1:?usage: vllm_gpu_1x.sh bf16|fp8|checks OUT_DIR}
out=${2:?usage: vllm_gpu_1x.sh bf16|fp8|checks OUT_DIR}
python=${PYTHON:-python3}
layers=${LAYERS:-48}
budget_s=${BUDGET_S:-560}
profile=${PROFILE-1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | head -1 | tr 'A-Z' 'a-z')
gpu=${gpu:-unknown}
echo "[$SECONDS s] $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) -> $gpu; vLLM $($python -c 'from importlib.metadata import version; print(version("vllm"))' 2>/dev/null)"

serve() {  # serve MODEL OUT_JSON LAYOUTS [extra vllm_serve.py flags]: each layout in turn, within what the budget leaves
    local model=$1 json=$2 layouts=$3
    shift 3
    local left=$((budget_s - SECONDS))
    if [ "$left" -le 0 ]; then  # timeout 0 would mean no limit at all
        echo "[$SECONDS s] vllm_serve.py $model: $layouts skipped, BUDGET_S ($budget_s s) spent"
        return 1
    fi
    echo "[$SECONDS s] vllm_serve.py $model: $layouts (${left} s left)"
    # shellcheck disable=SC2086  # LAYOUTS and OPEN_LOOP: one or more names, zero or more fractions
    timeout -s TERM -k 30 "$left" "$python" benchmarks/vllm_serve.py --models "$model:$layers" \
        --layouts $layouts --reference-layout stock --batched-tokens "${BATCHED:-32768}" \
        --contexts "${CONTEXT:-2048}" --duration-s "${DURATION_S:-15}" --warmup-s "${WARMUP_S:-5}" \
        --drain-s "${DRAIN_S:-10}" --open-loop-fractions ${OPEN_LOOP:-} \
        --concurrency "${CONCURRENCY:-96}" ${profile:+--profile-context "${CONTEXT:-2048}"} \
        ${API_SERVERS:+--api-servers "$API_SERVERS"} ${METRICS_INTERVAL_S:+--metrics-interval-s "$METRICS_INTERVAL_S"} \
        --out "$json" "$@"
    echo "[$SECONDS s] vllm_serve.py exited with $?"
}

tiny() {  # tiny FILE CHECK_ENV JSON NAME: one GPU test file's tiny checks, logs kept
    local file=$1 env=$2 json=$3 name=$4
    env "$env=$json" timeout -s INT -k 30 "${TINY_TIMEOUT_S:-420}" "$python" -m pytest -m gpu "$file" -k tiny -q \
        -p no:cacheprovider --basetemp "/tmp/zp-$name" > "$out/$name.log" 2>&1
    echo "[$SECONDS s] $file: $(tail -1 "$out/$name.log")"
    mkdir -p "$out/$name-logs"
    if [ -d "/tmp/zp-$name" ]; then
        find "/tmp/zp-$name" -maxdepth 2 -name '*.log' -exec cp {} "$out/$name-logs/" \;
    fi
}

checks() {  # both tiny test files at once (small servers: they share the GPU)
    tiny tests/test_vllm_gpu.py ZEROPREFILL_GPU_CHECK_JSON "$out/vllm_gpu_check-${gpu}x1.json" tiny-bf16 &
    tiny tests/test_vllm_fp8_gpu.py ZEROPREFILL_FP8_CHECK_JSON "$out/vllm_fp8-${gpu}x1.json" tiny-fp8 &
    wait
}

tune_stock() {  # tune_stock MODEL: stock vLLM's Triton MoE tile for MODEL's expert shape (one GPU: all experts local)
    # A block-FP8 checkpoint (quantization_config.weight_block_size) tunes the block-FP8 kernel.
    local shape log
    shape=$("$python" -c 'import json, sys
c = json.load(open(f"common/model_configs/{sys.argv[1]}.json"))
block = (c.get("quantization_config") or {}).get("weight_block_size")
print(c["num_experts"], c["hidden_size"], c["moe_intermediate_size"], c["num_experts_per_tok"],
      *(["--dtype", "fp8_w8a8", "--block-shape", *block] if block else []))' "$1") || return 1
    set -- $shape
    log="$out/tune_vllm_moe$([ $# -gt 4 ] && echo -fp8).log"
    echo "[$SECONDS s] tune_vllm_moe.py: E=$1 H=$2 I=$3 top-$4 ${*:5}, ${TUNE_BUDGET_S:-150} s"
    "$python" benchmarks/tune_vllm_moe.py --experts "$1" --ep-size 1 --hidden "$2" --intermediate "$3" --top-k "$4" \
        "${@:5}" --tokens 1 16 64 256 1024 2048 4096 8192 16384 32768 --budget-s "${TUNE_BUDGET_S:-150}" \
        --out-dir "$out/vllm_moe_configs" > "$log" 2>&1
    local status=$?
    tail -13 "$log"
    return $status
}

tuned_stock=()  # --stock-moe-configs for the stock layouts, once tune_stock has written a table
tune_or_default() {  # tune_or_default MODEL
    local gpu_name
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' _)
    if [ -n "${STOCK_MOE_CONFIGS:-}" ] && [ -n "$gpu_name" ] &&
            compgen -G "$STOCK_MOE_CONFIGS/*device_name=${gpu_name}[,.]*" > /dev/null; then
        echo "[$SECONDS s] stock's tile: the tables tuned earlier for $gpu_name in $STOCK_MOE_CONFIGS"
        tuned_stock=(--stock-moe-configs "$STOCK_MOE_CONFIGS")
    elif [ "${TUNE_BUDGET_S:-150}" != 0 ]; then
        if tune_stock "$1"; then
            tuned_stock=(--stock-moe-configs "$out/vllm_moe_configs")
        else
            echo "[$SECONDS s] tuning failed ($out/tune_vllm_moe*.log): stock runs vLLM's default tile"
        fi
    fi
}

case $phase in
checks)
    checks
    ;;
bf16)
    tune_or_default qwen3-30b-a3b
    serve qwen3-30b-a3b "$out/vllm_serve-${gpu}x1.json" "stock ${BF16_FORCED_STOCK:-} asyncep" "${tuned_stock[@]}"
    ;;
fp8)  # the tiny FP8 record: OUT_DIR's (call 1 into the same folder), else the committed file's, not its runs
    record=()
    if [ ! -f "$out/vllm_fp8-${gpu}x1.json" ] && [ -f "benchmarks/results/vllm_fp8-${gpu}x1.json" ]; then
        record=(--tiny-record "benchmarks/results/vllm_fp8-${gpu}x1.json")
    fi
    if [ "${FP8_STOCK:-1}" = 0 ]; then
        serve qwen3-30b-a3b-fp8 "$out/vllm_fp8-${gpu}x1.json" asyncep --merge "${record[@]}"
    else
        tune_or_default qwen3-30b-a3b-fp8
        # Stock as vLLM chooses (Triton for block FP8 at one rank on Hopper) and forced onto other MoE
        # backends; the summary compares AsyncEP with the fastest of them.
        serve qwen3-30b-a3b-fp8 "$out/vllm_fp8-${gpu}x1.json" "stock ${FP8_FORCED_STOCK-stock-deepgemm} asyncep" \
            --merge "${record[@]}" "${tuned_stock[@]}"
    fi
    # bf16 AsyncEP again on this machine: FP8 against bf16 from one machine, not from call 2's
    serve qwen3-30b-a3b "$out/vllm_fp8-${gpu}x1.json" asyncep --merge
    # AsyncEP variants on the FP8 checkpoint, e.g. DeepGEMM's FP8 GEMMs on the psum row layout
    if [ -n "${FP8_ASYNCEP_VARIANTS:-}" ]; then
        serve qwen3-30b-a3b-fp8 "$out/vllm_fp8-${gpu}x1.json" "$FP8_ASYNCEP_VARIANTS" --merge
    fi
    ;;
*)
    echo "unknown phase $phase: bf16, fp8 or checks" >&2
    exit 2
    ;;
esac

for json in "$out"/*.json; do  # each file's summary, its per-context comparison tables left out
    "$python" -c 'import json, sys
summary = json.load(open(sys.argv[1])).get("summary", {})
print(sys.argv[1], json.dumps({k: v for k, v in summary.items() if k != "comparisons"}, indent=1))' "$json"
done
