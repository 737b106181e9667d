"""``benchmarks/off_gpu_time.py``: a served step's time off the GPU, per profiled server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import off_gpu_time  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def test_off_gpu_time_of_the_committed_one_gpu_servers(tmp_path, capsys):
    """The eighteenth session's two bf16 runs: AsyncEP and stock spend the same time off the GPU
    (within 0.7 ms), where the fifteenth's AsyncEP spent 6.7 ms more."""
    out = tmp_path / "off_gpu.json"
    files = [RESULTS / name for name in ("vllm_serve-h100x1-persistent.json", "vllm_serve-h100x1-persistent-repeat.json",
                                         "vllm_serve-h100x1-discriminated.json")]
    assert off_gpu_time.main([*map(str, files), "--out", str(out)]) == 0
    rows = {(row["file"], row["layout"]): row for row in json.loads(out.read_text())["rows"]}
    for name in ("vllm_serve-h100x1-persistent.json", "vllm_serve-h100x1-persistent-repeat.json"):
        gap = rows[name, "asyncep"]["off_gpu_ms_per_step"] - rows[name, "stock"]["off_gpu_ms_per_step"]
        assert abs(gap) < 0.7
        assert rows[name, "asyncep"]["host_bound_largest"]["op"] == "(no op)"
    earlier = rows["vllm_serve-h100x1-discriminated.json", "asyncep"]["off_gpu_ms_per_step"] - \
        rows["vllm_serve-h100x1-discriminated.json", "stock"]["off_gpu_ms_per_step"]
    assert 4 < earlier < 8
    run = json.loads(files[0].read_text())["runs"][0]  # the definition: engine step less GPU busy time per step
    row = rows[files[0].name, run["layout"]]
    trace = run["profile"]["traces"][0]
    assert abs(row["off_gpu_ms_per_step"] - (row["step_ms_served"] - trace["busy_s"] / run["profile"]["steps"] * 1e3)) < 0.01
    assert "off GPU" in capsys.readouterr().out


def test_off_gpu_time_rejects_files_without_profiles(tmp_path, capsys):
    unprofiled = tmp_path / "unprofiled.json"
    unprofiled.write_text(json.dumps({"runs": [{"model": "m", "layout": "stock", "measurements": []}]}))
    assert off_gpu_time.main([str(unprofiled)]) == 2
    assert "no profiled run with engine metrics" in capsys.readouterr().err
    assert off_gpu_time.main([str(ROOT / "README.md")]) == 2
    assert "off_gpu_time: error: JSONDecodeError" in capsys.readouterr().err
