"""benchmarks/e2e_prefill.py's summary: each measured layout beside the planner's prediction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import e2e_prefill  # noqa: E402
import project_scaling  # noqa: E402
from zeroprefill.common.hardware import shipped_profile  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
from zeroprefill.common.layouts import predict_step  # noqa: E402
from zeroprefill.common.saturation import Deployment  # noqa: E402

MODEL = "qwen3-235b-a22b"
FAMILIES = {"dp": ("dp", None, None), "asyncep-copy_engine-d1": ("asyncep", "copy_engine", 1),
            "a2a_ep": ("a2a_ep", None, None), "a2a_tbo": ("a2a_tbo", None, None), "tp": ("tp", None, None)}


def _record(layout: str, routing: str, ms: float, tokens: int = 16384, context: int = 4096) -> dict:
    family, transport, depth = FAMILIES[layout]
    return {"model": MODEL, "dtype": "bf16", "layout": layout, "family": family, "transport": transport,
            "prefetch_depth": depth, "copy_streams": 1, "context": context, "tokens_per_gpu": tokens,
            "routing": routing, "ms_per_layer": ms, "requests_per_gpu": tokens // context,
            "flops_per_gpu_per_layer": 1e13}


def _predicted_ms(planner_layout: str, gpus: int, imbalance: float = 1.0, transport: str = "nccl",
                  remote_ranks: float | None = 0.5) -> float:
    """Balanced routing by default: half of a rank's tokens have their experts on the other rank."""
    spec = MoEModelSpec.from_pretrained(REPO / "common" / "model_configs" / f"{MODEL}.json")
    deployment = Deployment(spec, shipped_profile("h200", 2), gpus, "bf16", transport)
    step = predict_step(deployment, planner_layout, 16384, 4096, rank_imbalance=imbalance, remote_ranks=remote_ranks)
    return step.step_time_s * 1e3 / 94


def test_every_layout_is_compared_with_the_planner():
    # Measured 25% slower than predicted everywhere, but a2a_ep under skew, which is exact.
    expected = {"dp": _predicted_ms("asyncep", 1), "asyncep-copy_engine-d1": _predicted_ms("asyncep", 2, 1.0, "copy_engine"),
                "a2a_ep": _predicted_ms("alltoall_ep", 2), "a2a_tbo": _predicted_ms("alltoall_ep_tbo", 2),
                "tp": _predicted_ms("tp", 2)}
    records = [_record(layout, "balanced", ms * 1.25) for layout, ms in expected.items()]
    dp_skewed = _record("dp", "skewed", expected["dp"])
    dp_skewed["routing_balance"] = {"expert_max_over_mean": 1.5, "ep_rank_max_over_mean": 1.1}
    # Skewed: uniform routing's remote ranks, the achieved rank imbalance (not the model's).
    skewed_ep = _predicted_ms("alltoall_ep", 2, imbalance=1.1, remote_ranks=None)
    assert skewed_ep > _predicted_ms("alltoall_ep", 2)
    records += [dp_skewed, _record("a2a_ep", "skewed", skewed_ep)]
    raw = {"meta": {"gpu": "NVIDIA H200", "world_size": 2, "layers": 4, "timing": "back-to-back"}, "records": records}
    result = e2e_prefill.summarize(raw, "test")
    rows = {(r["layout"], r["routing"]): r for r in result["points"]}
    for layout, ms in expected.items():
        assert rows[(layout, "balanced")]["predicted_ms_per_layer"] == pytest.approx(ms)
        assert rows[(layout, "balanced")]["planner_error"] == pytest.approx(1 / 1.25 - 1)
    assert rows[("a2a_ep", "skewed")]["planner_error"] == pytest.approx(0.0, abs=1e-12)
    summary = result["summary"]
    assert summary["planner_max_error"] == pytest.approx(0.2)
    # The 8-GPU projection at this sweep's points (4096-token prompts, 16K tokens/GPU).
    projected = project_scaling.project(MODEL, "h200", [8], ["bf16"], [4096], [16384], [1.0, 1.5])
    assert summary["projected_speedup_8gpu"] == {"min": min(p["speedup"] for p in projected),
                                                 "max": max(p["speedup"] for p in projected)}
    assert summary["planner_error_by_layout"]["a2a_ep"] == pytest.approx([-0.2, 0.0])


def test_no_prediction_without_a_profile_says_why():
    raw = {"meta": {"gpu": "cpu", "world_size": 2, "layers": 4}, "records": [_record("a2a_ep", "balanced", 1.0)]}
    summary = e2e_prefill.summarize(raw, "test")["summary"]
    assert summary["planner_max_error"] is None
    assert "no shipped hardware profile for 'cpu'" in summary["planner_error_reason"]
    assert summary["projected_speedup_8gpu"] is None and "cpu" in summary["projected_speedup_8gpu_reason"]
