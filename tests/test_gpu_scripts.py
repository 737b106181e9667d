"""The one-GPU shell scripts parse, and the sequence script reports every step it ran.

The steps themselves need a GPU (``benchmarks/GPU_RUNBOOK.md``); here only what runs anywhere:
bash's syntax check of both scripts; ``gpu_1x_all.sh`` on a step name it does not know,
which must still log the step's start, its exit status with the reason, and the end, and
record the machine it ran on; and ``vllm_gpu_1x.sh fp8`` with a stand-in Python that only
records its calls, for which stock tile tables it serves with and what it passes on.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.fake_nvidia_smi import install as install_nvidia_smi

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["vllm_gpu_1x.sh", "gpu_1x_all.sh"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], check=True)


def test_sequence_logs_every_step_with_its_status(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".triton" / "cache").mkdir(parents=True)
    (home / ".triton" / "cache" / "kernel.cubin").write_bytes(b"\0" * 4096)
    env = {**os.environ, "STEPS": "no-such-step", "HOME": str(home)}
    for cache in ("DG_JIT_CACHE_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        env.pop(cache, None)
    subprocess.run(["bash", "benchmarks/gpu_1x_all.sh", str(tmp_path / "out")], cwd=REPO, env=env, check=True)
    lines = [line.split("] ", 1)[1] for line in (tmp_path / "out" / "progress.log").read_text().splitlines()]
    assert lines[:3] == ["steps: no-such-step", "no-such-step: start",
                         "no-such-step: exit 2 (unknown step no-such-step: checks, bf16, fp8, kernels, tiles, "
                         "sglang-tiny or sglang-30b)"]
    # The JIT caches that exist, by size, with the home folder written as ~ (no machine path)
    assert re.fullmatch(r"JIT caches: \S+ ~/\.triton; ", lines[3]) and lines[4:] == ["done"]
    machine = (tmp_path / "out" / "machine.txt").read_text()  # what the machine is, nvidia-smi or not
    assert "CPU: " in machine and f"{len(os.sched_getaffinity(0))} cores" in machine and "date: " in machine


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/python-calls.log"
case "$1" in
-c) echo "128 2048 768 8 --dtype fp8_w8a8 --block-shape 128 128" ;;  # the version and the model's shape
esac
"""


#: The script's settings: removed from the caller's environment, so that only a test's own count.
SCRIPT_SETTINGS = ("CONCURRENCY", "PROFILE", "FP8_FORCED_STOCK", "BF16_FORCED_STOCK", "FP8_ASYNCEP_VARIANTS",
                   "STOCK_MOE_CONFIGS", "FP8_STOCK")


@pytest.fixture
def one_gpu_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``call(phase, gpu, **settings)`` runs ``vllm_gpu_1x.sh PHASE`` on a stand-in GPU named
    ``gpu`` with a stand-in Python (tuning off) and returns its ``vllm_serve.py`` calls and its
    output."""
    fake_python = tmp_path / "python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    calls = tmp_path / "python-calls.log"

    def call(phase: str, gpu: str = "NVIDIA H100 80GB HBM3", **settings: str) -> tuple[list[str], str]:
        install_nvidia_smi(tmp_path / "smi", monkeypatch, [{"0": {"name": gpu}}])
        calls.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
        env |= {"PYTHON": str(fake_python), "TUNE_BUDGET_S": "0", **settings}
        out = subprocess.run(["bash", "benchmarks/vllm_gpu_1x.sh", phase, str(tmp_path / "out")], cwd=REPO, env=env,
                             check=True, capture_output=True, text=True).stdout
        return [c for c in calls.read_text().splitlines() if "vllm_serve.py" in c], out

    return call


@pytest.mark.parametrize("gpu_name,uses_tables", [("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", False)])
def test_fp8_call_serves_stock_with_tables_tuned_earlier_for_this_gpu(
        one_gpu_call, tmp_path: Path, gpu_name: str, uses_tables: bool) -> None:
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json").write_text("{}")
    serves, out = one_gpu_call("fp8", gpu_name, STOCK_MOE_CONFIGS=str(tables), FP8_FORCED_STOCK="")
    assert len(serves) == 2  # stock and AsyncEP FP8, then bf16 AsyncEP; no tuning run
    assert ("--layouts stock asyncep" in serves[0]) and ("--stock-moe-configs " + str(tables) in serves[0]) == uses_tables
    assert "--stock-moe-configs" not in serves[1]
    assert ("tables tuned earlier" in out) == uses_tables


def test_fp8_call_defaults_serve_stock_on_deepgemm_beside_vllms_choice_deep_and_profiled(one_gpu_call) -> None:
    (fp8, bf16), _ = one_gpu_call("fp8")  # no psum variant unless named
    assert "--layouts stock stock-deepgemm asyncep " in fp8 and "--layouts asyncep " in bf16
    assert all("--concurrency 96 --profile-context 2048 " in serve for serve in (fp8, bf16))
    # The committed file's tiny record starts the new one, not its runs (measured with idle-start windows).
    assert "--merge --tiny-record benchmarks/results/vllm_fp8-h100x1.json" in fp8 and "--tiny-record" not in bf16
    unprofiled, _ = one_gpu_call("fp8", PROFILE="", CONCURRENCY="48", FP8_ASYNCEP_VARIANTS="asyncep-fp8-psum")
    assert len(unprofiled) == 3 and "--layouts asyncep-fp8-psum " in unprofiled[2]
    assert all("--concurrency 48 --out " in serve for serve in unprofiled)
    (asyncep_fp8, asyncep_bf16), out = one_gpu_call("fp8", FP8_STOCK="0")  # no stock, no tuning
    assert "--models qwen3-30b-a3b-fp8:48 --layouts asyncep " in asyncep_fp8 and "stock's tile" not in out
    assert "--models qwen3-30b-a3b:48 --layouts asyncep " in asyncep_bf16


def test_bf16_call_serves_stock_forced_onto_another_backend_only_when_named(one_gpu_call) -> None:
    for forced, layouts in (("", "stock asyncep"), ("stock-flashinfer-cutlass", "stock stock-flashinfer-cutlass asyncep")):
        (serve,), _ = one_gpu_call("bf16", BF16_FORCED_STOCK=forced)
        assert f"--layouts {layouts} " in serve


FAKE_PYTHON3 = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/python3-calls.log"
case "$*" in *"$FAIL_ON"*) exit 1 ;; esac
"""


@pytest.mark.parametrize("fail_on", ["", "moe_kernels.py"])
def test_tiles_step_runs_tests_layer_and_both_gemms_and_fails_if_any_did(tmp_path: Path, fail_on: str) -> None:
    """The tiles step with a stand-in ``python3``: the GPU tests, the layer twice, both GEMMs
    twice against this checkout's module, the table rule on those two runs; no layer runs on a
    rewritten table when the table did not change; a failing benchmark fails the step, after
    the rest ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON3)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "STEPS": "tiles", "HOME": str(tmp_path), "FAIL_ON": fail_on or "no-such-call",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("BEFORE", None)
    subprocess.run(["bash", "benchmarks/gpu_1x_all.sh", str(tmp_path / "out")], cwd=REPO, env=env, check=True)
    calls = (bin_dir / "python3-calls.log").read_text().splitlines()
    assert [c.split()[1 if c.startswith("-m") else 0] for c in calls] == [
        "pytest", "pytest", "benchmarks/moe_kernels.py", "benchmarks/moe_kernels.py",
        "benchmarks/gemm_before_after.py", "benchmarks/gemm_before_after.py", "benchmarks/gemm_before_after.py"]
    assert "-k tma or persistent or validation" in calls[0] and "tests/test_kernels_gpu.py" in calls[1]
    assert all("--before kernels/fused_moe.py --dtypes bf16 fp8" in c for c in calls[4:6])
    out = tmp_path / "out"
    assert calls[6].endswith(f"--from-results {out}/tiles/gemm_before_after-1.json {out}/tiles/gemm_before_after-2.json")
    assert (out / "kernels-configs" / "sm90.json").read_text() == (REPO / "kernels/configs/sm90.json").read_text()
    status = (out / "progress.log").read_text().splitlines()[2]
    assert status.split("] ", 1)[1].startswith(f"tiles: exit {1 if fail_on else 0}")
