"""``benchmarks/trace_breakdown.py``'s account of GPU idle time: waiting for the host (and on
what the host was doing), waiting on the device, or launched outside the trace."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import trace_breakdown  # noqa: E402

HOST = {"pid": 1, "tid": 10}
OTHER_THREAD = {"pid": 1, "tid": 11}


def host_event(cat: str, name: str, ts: float, dur: float, correlation: int | None = None, thread=HOST) -> dict:
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args} | thread


def kernel(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7,
            "args": {"correlation": correlation}}


def trace_events() -> list[dict]:
    """Microseconds. Kernel A [60, 100]; B [310, 410], launched at 300 after a host sync inside
    aten::item; C [500, 550], launched at 400 (before the GPU went idle); D [600, 650], its
    launch not traced; E [810, 860], launched at 800 after Python the profiler does not record."""
    return [
        host_event("user_annotation", "execute_model", 0, 700),
        host_event("cuda_driver", "cuLaunchKernel", 50, 5, correlation=1),
        host_event("cpu_op", "aten::item", 100, 200),
        host_event("cuda_runtime", "cudaStreamSynchronize", 110, 180),
        host_event("cuda_runtime", "cudaLaunchKernel", 300, 5, correlation=2),
        host_event("cuda_runtime", "cudaLaunchKernel", 400, 5, correlation=3),
        host_event("cpu_op", "aten::add", 120, 30, thread=OTHER_THREAD),  # another thread: not this gap's
        host_event("cuda_runtime", "cudaLaunchKernel", 800, 5, correlation=5),
        kernel("A", 60, 40, 1), kernel("B", 310, 100, 2), kernel("C", 500, 50, 3),
        kernel("D", 600, 50, 99), kernel("E", 810, 50, 5),
    ]


def test_idle_gaps_are_split_into_host_device_and_untraced_waits():
    result = trace_breakdown.breakdown(trace_events())
    host = result["host"]
    assert host["idle_gaps"] == 4
    assert host["host_bound_s"] == pytest.approx(350e-6)   # [100, 300] and [650, 800]
    assert host["device_wait_s"] == pytest.approx(110e-6)  # launch-to-start of B and E, and all of C's gap
    assert host["unlinked_s"] == pytest.approx(50e-6)      # D's
    assert host["host_bound_s"] + host["device_wait_s"] + host["unlinked_s"] == pytest.approx(result["idle_s"])


def test_host_bound_time_goes_to_the_innermost_op_with_its_parents():
    by_op = {entry["op"]: entry["seconds"] for entry in trace_breakdown.breakdown(trace_events())["host"]["host_bound_by_op"]}
    assert by_op == pytest.approx({
        "execute_model > aten::item > cudaStreamSynchronize": 180e-6,
        "execute_model > aten::item": 20e-6,
        "execute_model": 50e-6,   # [650, 700]: inside the annotation, no op below it
        "(no op)": 100e-6,        # [700, 800]
    })
    assert list(by_op)[0] == "execute_model > aten::item > cudaStreamSynchronize"  # largest first


def test_synchronising_calls_are_counted_over_the_trace():
    calls = trace_breakdown.breakdown(trace_events())["host"]["sync_calls"]
    assert calls == {"cudaStreamSynchronize": {"count": 1, "seconds": pytest.approx(180e-6)}}


def test_paths_keep_the_three_innermost_names():
    spans = [(0.0, 10.0, "a"), (1.0, 9.0, "b"), (2.0, 8.0, "c"), (3.0, 7.0, "d")]
    assert trace_breakdown._innermost_ops(spans, 4.0, 6.0) == {"b > c > d": pytest.approx(2.0)}


def test_long_host_events_are_found_however_far_back_they_start():
    spans = [(0.0, 5.0, "step"), *((t * 1e-4, t * 1e-4 + 5e-5, f"op{t}") for t in range(1000))]
    thread = trace_breakdown._HostThread(spans)
    assert {name for _, _, name in thread.overlapping(0.05, 0.05001)} == {"step", "op500"}


def test_the_command_prints_where_the_gpu_waited(tmp_path, capsys):
    with gzip.open(tmp_path / "worker.pt.trace.json.gz", "wt") as handle:
        json.dump({"traceEvents": trace_events()}, handle)
    assert trace_breakdown.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPU idle in 4 gaps: waiting for the host 0.35 ms, on the device 0.11 ms, launch not traced 0.05 ms" in out
    assert "0.18 ms  execute_model > aten::item > cudaStreamSynchronize" in out
    assert "cudaStreamSynchronize: 1 calls, 0.18 ms" in out
