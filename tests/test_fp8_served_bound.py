"""``benchmarks/fp8_served_bound.py``: the Amdahl bound on a served FP8-over-bf16 step, from a
profiled server's GPU time per category and the kernel benchmark's layer ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fp8_served_bound  # noqa: E402
import trace_breakdown  # noqa: E402

GROUPED = "void deep_gemm::sm90_fp8_gemm_1d2d_impl<(cute::UMMA::Major)0, 0u, 1536u, 2048u, 128u, 128u, 192u"
DENSE = "void deep_gemm::sm90_fp8_gemm_1d2d_impl<(cute::UMMA::Major)0, 0u, 5120u, 2048u, 1u, 256u, 128u"
QUANT = "void per_token_group_quant_8bit_kernel<c10::BFloat16, c10::Float8_e4m3fn, true, true, float>"


def profiled_run(rules: int | None) -> dict:
    """10 layer calls; per call: grouped GEMM 2 ms, dense 0.5 ms, quant 0.25 ms, attention 1 ms,
    over a 4 ms window. ``rules`` None: as version 1 recorded it (no marker, dense GEMMs under
    moe_experts, the quantiser under other)."""
    top = [{"name": GROUPED, "seconds": 0.020, "count": 10}, {"name": DENSE, "seconds": 0.005, "count": 10},
           {"name": QUANT, "seconds": 0.0025, "count": 30}, {"name": "flash_fwd_kernel", "seconds": 0.010, "count": 10}]
    if rules is None:
        categories = {"moe_experts": 0.025, "attention": 0.010, "other": 0.0025}
        trace = {}
    else:
        categories = {"moe_experts": 0.020, "gemm": 0.005, "quant": 0.0025, "attention": 0.010}
        trace = {"category_rules": rules}
    trace |= {"window_s": 0.040, "seconds_by_category": categories, "top_kernels": top}
    return {"model": "qwen3-30b-a3b-fp8:48", "layout": "asyncep", "profile": {"traces": [trace]}}


@pytest.mark.parametrize("rules", [None, trace_breakdown.CATEGORY_RULES], ids=["version-1", "current"])
def test_layer_parts_sort_dense_deepgemm_and_quant_out_of_the_experts(rules):
    parts = fp8_served_bound.layer_parts(profiled_run(rules))
    assert parts["layer_calls"] == 10
    assert parts == pytest.approx({"moe": 2.0, "dense": 0.5, "quant": 0.25, "step": 4.0, "rest": 1.25, "layer_calls": 10})


@pytest.mark.parametrize("rules", [1, 2])
def test_earlier_rules_move_the_experts_glue_out_of_other(rules):
    # Our combine (0.4 ms a call) recorded under other before version 3, DeepGEMM's dense GEMM
    # under moe_experts before version 2: both land where today's rules put them.
    run = profiled_run(trace_breakdown.CATEGORY_RULES)
    trace = run["profile"]["traces"][0]
    trace["top_kernels"].append({"name": "_sum_slots_kernel", "seconds": 0.004, "count": 10})
    trace["seconds_by_category"] = {"moe_experts": 0.020 + (0.005 if rules == 1 else 0.0), "attention": 0.010,
                                    "other": 0.004 + (0.0025 if rules == 1 else 0.0)} \
        | ({} if rules == 1 else {"gemm": 0.005, "quant": 0.0025})
    trace["category_rules"] = rules
    parts = fp8_served_bound.layer_parts(run)
    assert (parts["moe"], parts["dense"], parts["quant"]) == pytest.approx((2.4, 0.5, 0.25))
    assert trace_breakdown.upgrade(trace)["seconds_by_category"]["other"] == pytest.approx(0.0)


def test_a_profiled_bf16_run_beside_the_fp8_one_is_set_against_it_as_measured(tmp_path, capsys):
    def closed_loop(tokens_per_s: float, clock: float) -> list[dict]:
        telemetry = {"0": {"sm_clock_mhz_median": clock}}
        return [{"context": 2048, "closed_loop": {"input_tokens_per_s_per_gpu": tokens_per_s, "gpu_telemetry": telemetry}}]

    fp8 = profiled_run(trace_breakdown.CATEGORY_RULES) | {"measurements": closed_loop(1200.0, 1935.0)}
    bf16 = profiled_run(trace_breakdown.CATEGORY_RULES) | {"model": "qwen3-30b-a3b:48",
                                                            "measurements": closed_loop(1000.0, 1650.0)}
    for run in (fp8, bf16):
        run["profile"]["context"] = 2048
    bf16["profile"]["traces"][0]["window_s"] = 0.056  # 5.6 ms a layer against FP8's 4.0
    profile, kernels, out = tmp_path / "profile.json", tmp_path / "kernels.json", tmp_path / "bound.json"
    profile.write_text(json.dumps({"runs": [bf16, fp8]}))
    kernels.write_text(json.dumps({"points": [{"shape": "qwen3-30b-a3b", "tokens": 16384, "fp8_selected_vs_bf16": 1.5}]}))
    assert fp8_served_bound.main(["--profile", str(profile), "--kernels", str(kernels), "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]  # the bf16 run is not bounded itself
    assert result["measured"] == {"bf16_model": "qwen3-30b-a3b:48", "bf16_step_ms_measured": 5.6,
                                  "gpu_step_fp8_vs_bf16_measured": 1.4, "served_fp8_vs_bf16_measured": 1.2,
                                  "input_tokens_per_s_per_gpu": {"fp8": 1200, "bf16": 1000},
                                  "sm_clock_mhz": {"fp8": 1935.0, "bf16": 1650.0}}
    assert "GPU FP8/bf16 1.400, served 1.200" in capsys.readouterr().out
    assert "served_step" not in result  # no engine metrics in these closed loops


def served_bound(tmp_path, run: dict, steps: int, step_ms: float) -> dict:
    """``run`` served at ``step_ms`` per engine step, its profile over ``steps`` steps, through
    ``fp8_served_bound.main``: the result."""
    run["profile"] |= {"context": 2048, "steps": steps}
    engine = {"steps": 30, "tokens_per_step": 32768.0, "step_ms": step_ms}
    run["measurements"] = [{"context": 2048, "closed_loop": {"input_tokens_per_s_per_gpu": 1.0, "engine_metrics": engine}}]
    profile, kernels, out = tmp_path / "profile.json", tmp_path / "kernels.json", tmp_path / "bound.json"
    profile.write_text(json.dumps({"runs": [run]}))
    kernels.write_text(json.dumps({"points": [{"shape": "qwen3-30b-a3b", "tokens": 16384, "fp8_selected_vs_bf16": 1.5}]}))
    assert fp8_served_bound.main(["--profile", str(profile), "--kernels", str(kernels), "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    return result


def test_engine_metrics_set_the_served_step_against_the_profiles_gpu_step(tmp_path, capsys):
    run = profiled_run(trace_breakdown.CATEGORY_RULES)  # 10 layer calls in one step: a 40-ms window,
    run["profile"]["traces"][0]["busy_s"] = 0.036  # a kernel running in 36 ms of it
    result = served_bound(tmp_path, run, steps=1, step_ms=50.0)
    assert result["served_step"] == {"step_ms_served": 50.0, "step_ms_gpu": 36.0, "step_ms_profiled": 40.0,
                                     "off_gpu_ms_per_step": 14.0, "tokens_per_step": 32768.0}
    assert "served: 50.0 ms per step of 32,768 tokens against 36.0 ms of GPU time: 14.0 ms off the GPU" in \
        capsys.readouterr().out


def test_a_profile_that_says_where_the_gpu_idled_names_the_hosts_part_per_step(tmp_path, capsys):
    run = profiled_run(trace_breakdown.CATEGORY_RULES)
    run["profile"]["traces"][0] |= {
        "busy_s": 0.036, "host": {"host_bound_s": 0.004, "device_wait_s": 0.0, "unlinked_s": 0.0, "idle_gaps": 9,
                                  "host_bound_by_op": [{"op": "execute_model > aten::item", "seconds": 0.003}],
                                  "sync_calls": {}}}
    served = served_bound(tmp_path, run, steps=2, step_ms=25.0)["served_step"]
    assert served["host_bound_ms_per_step"] == 2.0
    assert served["host_bound_largest"] == {"op": "execute_model > aten::item", "ms_per_step": 1.5}
    assert ("profiled steps: the GPU waited 2.0 ms a step for the host, most under execute_model > aten::item "
            "(1.5 ms)") in capsys.readouterr().out


def test_bound_scales_experts_by_the_kernel_ratio_and_dense_by_the_peaks():
    parts = {"moe": 2.0, "dense": 0.5, "quant": 0.25, "step": 4.0, "rest": 1.25}
    result = fp8_served_bound.bound(parts, moe_ratio=1.5, target=1.4)
    assert result["bf16_step_ms_at_most"] == pytest.approx(1.5 * 2.0 + 2 * 0.5 + 1.25)
    assert result["served_fp8_vs_bf16_at_most"] == pytest.approx(5.25 / 4.0, abs=1e-3)
    assert result["moe_speedup_needed"] == pytest.approx((1.4 * 4.0 - 1.0 - 1.25) / 2.0, abs=1e-3)


def test_command_prints_the_bound_and_writes_it(tmp_path, capsys):
    profile, kernels, out = tmp_path / "profile.json", tmp_path / "kernels.json", tmp_path / "bound.json"
    profile.write_text(json.dumps({"runs": [profiled_run(2), {"model": "x", "layout": "stock"}]}))
    kernels.write_text(json.dumps({"points": [
        {"shape": "qwen3-30b-a3b", "tokens": 4096, "fp8_selected_vs_bf16": 3.0},  # below 8K tokens: not used
        {"shape": "qwen3-30b-a3b", "tokens": 16384, "fp8_selected_vs_bf16": 1.5},
        {"shape": "qwen3-235b-a22b", "tokens": 16384, "fp8_selected_vs_bf16": 2.0}]}))  # another shape
    assert fp8_served_bound.main(["--profile", str(profile), "--kernels", str(kernels), "--out", str(out)]) == 0
    assert "served FP8/bf16 <= 1.312" in capsys.readouterr().out
    result = json.loads(out.read_text())["results"][0]
    assert (result["moe_ratio"], result["served_fp8_vs_bf16_at_most"]) == (1.5, 1.312)


def test_a_profile_without_profiled_runs_is_a_one_line_error(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"runs": [{"model": "x", "layout": "stock"}]}))
    assert fp8_served_bound.main(["--profile", str(profile)]) == 2
    assert capsys.readouterr().err.strip() == f"fp8_served_bound: error: {profile} holds no profiled FP8 run " \
                                              "(vllm_serve.py --profile-context)"


def test_the_committed_bound_is_what_the_command_computes_from_the_committed_files(tmp_path):
    committed = fp8_served_bound.RESULTS / "fp8_served_bound-h100x1.json"
    out = tmp_path / "bound.json"
    assert fp8_served_bound.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"] == json.loads(committed.read_text())["results"]
