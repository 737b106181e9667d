"""Hardware profiles: shipped anchors with provenance, interpolation, JSON round trip, errors,
and the profile `zeroprefill calibrate` builds from its measurements (CPU: no GPU needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zeroprefill.calibrate import build_profile
from zeroprefill.cli import main
from zeroprefill.common.hardware import (
    HardwareProfileError,
    load_profile,
    shipped_profile,
    shipped_profile_names,
)

GiB, MiB = 1 << 30, 1 << 20
PROVENANCE = ("measured:", "estimated:", "extrapolated:", "datasheet:")


def _sources(data):
    if isinstance(data, dict):
        if "source" in data:
            yield data["source"]
        for value in data.values():
            yield from _sources(value)
    elif isinstance(data, list):
        for value in data:
            yield from _sources(value)


def test_every_shipped_profile_loads_and_says_where_each_number_comes_from():
    names = shipped_profile_names()
    assert names == [f"{g}x{n}" for g in ("h100", "h200") for n in (1, 2, 4, 8)]
    for name in names:
        profile = load_profile(name)
        sources = list(_sources(profile.to_dict()))
        assert sources and all(s.startswith(PROVENANCE) for s in sources), name
        assert (profile.num_gpus > 1) == bool(profile.allgather)
    # H100 is not measured here beyond its 8192^3 GEMM: nothing on it claims "measured:".
    assert not any(s.startswith("measured:") for s in _sources(load_profile("h100x4").to_dict()))


def test_h200_anchors_from_design_measurements():
    four, two = shipped_profile("h200", 4), shipped_profile("h200", 2)
    assert four.gather().bus_gbps(GiB) == 339 and four.gather().bus_gbps(256 * MiB) == 326
    assert two.gather().bus_gbps(GiB) == 276
    assert four.gather().gemm_slowdown.value == 0.12 and two.gather().gemm_slowdown.value == 0.06
    assert four.gather("copy_engine").bus_gbps(GiB) == 192
    assert four.gather("copy_engine").gemm_slowdown.value == 0.06
    assert four.compute_tflops("bf16") == 709 and four.hbm_gbps.value == 4270
    assert four.alltoall_bus_gbps.value == 312
    assert four.effective_tflops("bf16") == pytest.approx(709 / 1.12)
    assert four.gather().gemm_slowdown.source.startswith("measured: docs/design.md")
    assert shipped_profile("h200", 8).gather().gemm_slowdown.source.startswith("extrapolated")


def test_allgather_bandwidth_is_interpolated_in_log_size_and_clamped():
    gather = shipped_profile("h200", 4).gather()
    # 512 MiB is halfway between 256 MiB and 1 GiB in log2: 326 + (339 - 326) / 2.
    assert gather.bus_gbps(512 * MiB) == pytest.approx(332.5)
    assert gather.bus_gbps(MiB) == 326 and gather.bus_gbps(8 * GiB) == 339


def test_round_trip_and_errors(tmp_path):
    profile = shipped_profile("h100", 2)
    path = tmp_path / "p.json"
    profile.save(path)
    assert load_profile(path) == profile
    with pytest.raises(HardwareProfileError, match="no profile file"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HardwareProfileError, match="not valid JSON"):
        load_profile(tmp_path / "bad.json")
    data = profile.to_dict()
    del data["hbm_gbps"]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(HardwareProfileError, match="missing field 'hbm_gbps'"):
        load_profile(tmp_path / "partial.json")
    with pytest.raises(HardwareProfileError, match="unknown profile 'a100x4'"):
        load_profile("a100x4")
    with pytest.raises(HardwareProfileError, match="no shipped h200 profile for 3 GPUs"):
        shipped_profile("h200", 3)
    with pytest.raises(HardwareProfileError, match="single-GPU profile"):
        shipped_profile("h200", 1).gather()
    with pytest.raises(HardwareProfileError, match="unknown transport"):
        profile.gather("infiniband")


SINGLE = {"gpu_memory_bytes": 150_000_000_000, "hbm_gbps": 4200.0, "gemm_bf16_tflops": 700.0,
          "gemm_fp8_tflops": 1300.0}


def test_calibrated_single_gpu_profile_keeps_shipped_interconnect_marked_not_measured():
    profile = build_profile("NVIDIA H200", "h200", 1, 1, {"single": SINGLE})
    assert profile.compute_tflops("bf16") == 700 and profile.compute_tflops("fp8") == 1300
    assert profile.gemm_tflops["bf16"].source.startswith("measured: zeroprefill calibrate, 1 x")
    assert profile.gather().bus_gbps(GiB) == 339  # shipped h200x4, kept
    assert profile.gather().gemm_slowdown.source.startswith("not measured here (calibrate ran on 1 GPU)")
    assert profile.alltoall_bus_gbps.source.startswith("not measured")
    assert profile.gpus_per_node == 8  # the machine showed 1 GPU; a node still has 8


def test_calibrated_multi_gpu_profile_uses_its_measurements():
    collectives = {"allgather": [(16 * MiB, 200.0), (GiB, 300.0)], "alltoall_bus_gbps": 250.0,
                   "gemm_slowdown": 0.1}
    single = {**SINGLE}
    del single["gemm_fp8_tflops"]
    single["gemm_fp8_error"] = "no FP8 here"
    profile = build_profile("Some GPU", None, 2, 2, {"single": single, "collectives": collectives})
    assert profile.name == "some-gpux2-calibrated"
    assert profile.gather().bus_gbps(GiB) == 300 and profile.gather().gemm_slowdown.value == 0.1
    assert profile.effective_tflops("bf16") == pytest.approx(700 / 1.1)
    assert "fp8" not in profile.gemm_tflops and profile.alltoall_bus_gbps.value == 250
    assert math.isclose(profile.peak("bf16"), 700)  # unknown datasheet: set to the measured rate


def test_calibrated_copy_engine_replaces_the_shipped_extrapolation():
    collectives = {"allgather": [(GiB, 280.0)], "alltoall_bus_gbps": 250.0, "gemm_slowdown": 0.08,
                   "copy_engine": {"allgather": [(256 * MiB, 150.0), (GiB, 170.0)], "gemm_slowdown": 0.03,
                                   "by_copy_streams": [(1, 170.0), (2, 300.0), (4, 330.0)]}}
    profile = build_profile("NVIDIA H200", "h200", 2, 2, {"single": SINGLE, "collectives": collectives})
    copy_engine = profile.gather("copy_engine")
    assert copy_engine.bus_gbps(GiB) == 170 and copy_engine.gemm_slowdown.value == 0.03
    assert copy_engine.gemm_slowdown.source.startswith("measured: zeroprefill calibrate, 2 x NVIDIA H200")
    assert profile.gather("nccl").bus_gbps(GiB) == 280
    assert any("COPY_STREAMS: 1 stream(s) 170 GB/s, 2 stream(s) 300 GB/s, 4 stream(s) 330 GB/s" in note
               for note in profile.notes)
    # Without a copy-engine measurement (no symmetric memory), the shipped value stays, marked.
    del collectives["copy_engine"]
    kept = build_profile("NVIDIA H200", "h200", 2, 2, {"single": SINGLE, "collectives": collectives})
    assert kept.gather("copy_engine").gemm_slowdown.source.startswith("not measured by calibrate; shipped value:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_calibrate_without_cuda_exits_2_with_one_line(capsys):
    assert main(["calibrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU visible" in err and len(err.splitlines()) == 1
