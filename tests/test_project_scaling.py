"""benchmarks/project_scaling.py: the projection table, JSON and plot from the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_projection_compares_asyncep_with_the_best_fitting_baseline(tmp_path):
    out = tmp_path / "projection.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "project_scaling.py"), "--gpus", "2,8", "--dtypes", "fp8",
         "--contexts", "4096", "--tokens", "8192,32768", "--skews", "1.0", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alltoall_ep_tbo" in proc.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["summary"]["kind"].startswith("model prediction")
    assert len(result["points"]) == 4
    for point in result["points"]:
        layouts = point["layouts"]
        assert set(layouts) == {"asyncep", "alltoall_ep", "alltoall_ep_tbo", "tp"}
        assert point["ep_rank_imbalance"] == 1.0
        if point["speedup"] is None:
            assert not layouts["asyncep"]["fits"] or not any(
                v["fits"] for k, v in layouts.items() if k != "asyncep")
            continue
        best = point["best_baseline"]
        assert layouts[best]["fits"] and layouts["asyncep"]["fits"]
        assert all(layouts[best]["tokens_per_s_per_gpu"] >= v["tokens_per_s_per_gpu"]
                   for k, v in layouts.items() if k != "asyncep" and v["fits"])
        assert point["speedup"] == pytest.approx(
            layouts["asyncep"]["tokens_per_s_per_gpu"] / layouts[best]["tokens_per_s_per_gpu"])
    # Below the 8-GPU threshold AsyncEP waits for its gathers; above it, it catches up.
    eight = {p["tokens_per_gpu"]: p for p in result["points"] if p["gpus"] == 8}
    assert eight[8192]["threshold_tokens"] > 8192 and eight[8192]["speedup"] < eight[32768]["speedup"]


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "3"], "no shipped h200 profile for 3 GPUs"),
    (["--skews", "0.5"], "at least 1.0"),
    (["--tokens", "abc"], "--tokens 'abc' is not a comma-separated list of int values"),
])
def test_bad_settings_are_one_line_errors(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "project_scaling.py"), *argv,
                           "--out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
