"""Knee detection and the predicted-vs-measured threshold comparison (issue 6's GPU proof)."""

import math

import pytest

from benchmarks.threshold_validation import measured_knee, validate
from zeroprefill.common.hardware import shipped_profile
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.saturation import Deployment, saturation_threshold_tokens


def test_knee_interpolates_the_last_crossing_in_log_tokens():
    # 10% at 4K, 2% at 16K: the 5% crossing is 5/8 of the way from log 4K to log 16K.
    knee = measured_knee([(16384, 0.02), (4096, 0.10), (1024, 0.40)], 0.05)
    assert knee == pytest.approx(math.exp(math.log(4096) + 0.625 * math.log(4)))
    # A dip below the target that rises again does not count: the knee is the last crossing.
    assert measured_knee([(1024, 0.04), (2048, 0.08), (4096, 0.03), (8192, 0.01)], 0.05) == pytest.approx(
        math.exp(math.log(2048) + 0.6 * math.log(2)))


def test_knee_edge_cases():
    assert measured_knee([(1024, 0.2), (2048, 0.06)], 0.05) is None  # never crosses
    assert measured_knee([(2048, 0.01), (4096, 0.0)], 0.05) == 2048  # below from the start
    assert measured_knee([], 0.05) is None


def _point(tokens, exposed, context=512, transport="nccl"):
    return {"model": "qwen3-235b-a22b", "dtype": "bf16", "family": "asyncep", "transport": transport,
            "prefetch_depth": 1, "context": context, "routing": "balanced", "tokens_per_gpu": tokens,
            "exposed_comm": exposed}


def test_validate_compares_with_the_planner():
    e2e = {"meta": {"world_size": 2, "gpu": "NVIDIA H200"},
           "points": [_point(4096, 0.30), _point(8192, 0.12), _point(16384, 0.04), _point(32768, 0.01),
                      {**_point(8192, 0.5), "routing": "skewed"}, {**_point(8192, None), "family": "dp"}]}
    result = validate(e2e, None, 0.05)
    (row,) = result["rows"]
    spec = MoEModelSpec.from_pretrained("common/model_configs/qwen3-235b-a22b.json")
    predicted = saturation_threshold_tokens(Deployment(spec, shipped_profile("h200", 2), 2, "bf16", "nccl"), 512)
    knee = math.exp(math.log(8192) + (0.12 - 0.05) / (0.12 - 0.04) * math.log(2))
    assert row["predicted_tokens_per_gpu"] == predicted
    assert row["measured_knee_tokens_per_gpu"] == pytest.approx(knee)
    assert result["summary"]["max_relative_error"] == pytest.approx(abs(predicted - knee) / knee)
    assert result["summary"]["timing"] is None  # a sweep from before the timing field: passes timed one by one
    e2e["meta"]["timing"] = "back-to-back"
    assert validate(e2e, None, 0.05)["summary"]["timing"] == "back-to-back"


def test_validate_refuses_sweeps_without_a_gpu_link():
    with pytest.raises(SystemExit, match="ran on 1 GPU"):
        validate({"meta": {"world_size": 1, "gpu": "NVIDIA H200"}, "points": []}, None, 0.05)
    with pytest.raises(SystemExit, match="ran on CPU"):
        validate({"meta": {"world_size": 2, "gpu": "cpu", "device": "cpu"}, "points": []}, None, 0.05)
