"""``benchmarks/_serving.py``'s GPU telemetry against a stand-in nvidia-smi (:mod:`tests.fake_nvidia_smi`).

What a timed window records of each GPU (clocks, power, temperature, the clock-event reasons
decoded), the older drivers' name for the reasons' field, CUDA_VISIBLE_DEVICES, and that a
missing or failing nvidia-smi leaves a reason instead of stopping the benchmark.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.fake_nvidia_smi import calls, install

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _serving import GpuTelemetry, lowest_over_gpus, telemetry_line  # noqa: E402

EVENT, THROTTLE = "clocks_event_reasons.active", "clocks_throttle_reasons.active"


def reading(sm: int, power: str, temperature: int, utilization: int, reasons: str) -> dict[str, str | int]:
    return {"clocks.sm": sm, "clocks.max.sm": 1980, "power.draw": power, "power.limit": "700.00",
            "enforced.power.limit": "700.00", "temperature.gpu": temperature, "utilization.gpu": utilization,
            "memory.used": 70000 + sm, EVENT: reasons, THROTTLE: reasons}


# Four samples of two GPUs. GPU 0 is power-capped in three (one also idle); GPU 1 is at full
# clock, one of its power readings and one of its masks unreadable, one mask with hardware and
# thermal slowdown and a bit NVML has no name for here.
READINGS = [
    {"0": reading(1980, "650.50", 60, 100, "0x0000000000000000"),
     "1": reading(1980, "400.00", 50, 80, "0x0000000000000000")},
    {"0": reading(1755, "699.00", 70, 100, "0x0000000000000004"),
     "1": reading(1980, "[N/A]", 52, 90, "0x0000000000000228")},
    {"0": reading(1600, "700.00", 75, 90, "0x0000000000000004"),
     "1": reading(1980, "420.00", 51, 100, "0x0000000000000000")},
    {"0": reading(1980, "600.50", 65, 100, "0x0000000000000005"),
     "1": reading(1980, "410.00", 49, 90, "[N/A]")},
]


def measure(folder: Path, telemetry_calls: int) -> dict:
    """A window that lasts until the stand-in has had ``telemetry_calls`` telemetry queries."""
    deadline = time.monotonic() + 3
    with GpuTelemetry(interval_s=0.01) as telemetry:
        while sum("clocks.sm" in call for call in calls(folder)) < telemetry_calls and time.monotonic() < deadline:
            time.sleep(0.01)
    return telemetry.summary


@pytest.mark.parametrize("rejects", [(), (EVENT,), (EVENT, THROTTLE)], ids=["new-driver", "old-driver", "neither"])
def test_summary_per_gpu_with_the_reasons_field_the_driver_accepts(tmp_path, monkeypatch, rejects):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    folder = install(tmp_path / "bin", monkeypatch, READINGS, rejects=rejects)
    # The four readings, after the refused queries; then one failed reading, which is skipped.
    summary = measure(folder, len(READINGS) + len(rejects) + 1)

    assert list(summary) == ["0", "1"]
    gpu0, gpu1 = summary["0"], summary["1"]
    assert gpu0["samples"] == gpu1["samples"] == 4
    assert gpu0["sm_clock_mhz_median"] == 1867.5 and gpu0["sm_clock_mhz_min"] == 1600
    assert gpu0["max_sm_clock_mhz"] == 1980 and gpu1["sm_clock_mhz_median"] == 1980
    assert gpu0["power_w_mean"] == 662.5 and gpu0["power_w_max"] == 700.0
    assert gpu1["power_w_mean"] == 410.0  # the unreadable one left out
    assert gpu0["power_limit_w"] == gpu0["enforced_power_limit_w"] == 700.0
    assert gpu0["temperature_c_max"] == 75 and gpu0["utilization_pct_mean"] == 97.5
    assert gpu0["memory_used_mib_max"] == 71980
    if rejects == (EVENT, THROTTLE):
        assert gpu0["clock_event_reasons"] is None and gpu1["clock_event_reasons"] is None
    else:
        assert gpu0["clock_event_reasons"] == {"gpu_idle": 0.25, "sw_power_cap": 0.75}
        assert gpu1["clock_event_reasons"] == {"hw_slowdown": 0.333, "sw_thermal_slowdown": 0.333, "0x200": 0.333}

    # Each refused field is asked for once, at the first reading; every later one uses what answered.
    queries = [call for call in calls(folder) if "clocks.sm" in call]
    refused, answered = queries[:len(rejects)], queries[len(rejects):]
    assert all(field in query for field, query in zip(rejects, refused, strict=True))
    accepted = {(): EVENT, (EVENT,): THROTTLE}.get(rejects)  # None: read without the reasons
    assert len(answered) >= 5  # the four readings and the failed one (or more: the window closes late)
    for query in answered:
        assert [field for field in (EVENT, THROTTLE) if field in query] == ([accepted] if accepted else [])


def test_cuda_visible_devices_by_index_limits_the_gpus_read(tmp_path, monkeypatch):
    four = [{str(i): reading(1980 - i, "500", 50, 100, "0x0") for i in range(4)}]
    folder = install(tmp_path / "bin", monkeypatch, four, repeat=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    summary = measure(folder, 2)
    assert list(summary) == ["0", "2"] and summary["2"]["sm_clock_mhz_median"] == 1978
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f2c3a1e-0000-0000-0000-000000000000")  # not indices: all
    assert list(measure(folder, 4)) == ["0", "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert measure(folder, 6) == {"unavailable": "nvidia-smi lists none of CUDA_VISIBLE_DEVICES ['7']"}


def test_without_nvidia_smi_the_summary_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    with GpuTelemetry(interval_s=0.01) as telemetry:
        time.sleep(0.03)
    assert telemetry.summary == {"unavailable": "nvidia-smi not found"}
    assert telemetry_line(telemetry.summary) == "GPU telemetry unavailable: nvidia-smi not found"
    assert lowest_over_gpus(telemetry.summary, "sm_clock_mhz_median") is None


def test_a_failing_nvidia_smi_leaves_its_words(tmp_path, monkeypatch):
    folder = install(tmp_path / "bin", monkeypatch, [])  # every reading fails
    summary = measure(folder, 3)
    assert summary == {"unavailable": "nvidia-smi exited with 15: Unable to determine the device handle for "
                                      "GPU0000:00:00.0: Unknown Error"}


def test_one_line_per_window_and_the_slowest_gpus_clock():
    summary = {"0": {"sm_clock_mhz_median": 1755, "max_sm_clock_mhz": 1980, "power_w_mean": 699.6,
                     "power_limit_w": 700.0, "utilization_pct_mean": 97.5,
                     "clock_event_reasons": {"gpu_idle": 0.1, "sw_power_cap": 0.9}},
               "1": {"sm_clock_mhz_median": 1980, "max_sm_clock_mhz": 1980, "power_w_mean": None,
                     "power_limit_w": 700.0, "utilization_pct_mean": 61.0, "clock_event_reasons": None}}
    assert telemetry_line(summary) == ("GPU0 busy 98%, SM 1755/1980 MHz, 700/700 W, sw_power_cap 90%; "
                                       "GPU1 busy 61%, SM 1980/1980 MHz, ?/700 W")
    assert lowest_over_gpus(summary, "sm_clock_mhz_median") == 1755
    assert lowest_over_gpus(summary, "utilization_pct_mean") == 61.0
    assert lowest_over_gpus(None, "sm_clock_mhz_median") is None
