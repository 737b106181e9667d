"""The one-GPU shell scripts parse, and the sequence script reports every step it ran.

The steps themselves need a GPU (``benchmarks/GPU_RUNBOOK.md``); here only what runs anywhere:
bash's syntax check of both scripts, and ``gpu_1x_all.sh`` on a step name it does not know,
which must still log the step's start, its exit status with the reason, and the end, and
record the machine it ran on.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["vllm_gpu_1x.sh", "gpu_1x_all.sh"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], check=True)


def test_sequence_logs_every_step_with_its_status(tmp_path: Path) -> None:
    env = {**os.environ, "STEPS": "no-such-step"}
    subprocess.run(["bash", "benchmarks/gpu_1x_all.sh", str(tmp_path)], cwd=REPO, env=env, check=True)
    lines = [line.split("] ", 1)[1] for line in (tmp_path / "progress.log").read_text().splitlines()]
    assert lines == ["steps: no-such-step", "no-such-step: start",
                     "no-such-step: exit 2 (unknown step no-such-step: checks, bf16, fp8, kernels, sglang-tiny "
                     "or sglang-30b)", "done"]
    machine = (tmp_path / "machine.txt").read_text()  # what the machine is, nvidia-smi or not
    assert "CPU: " in machine and f"{len(os.sched_getaffinity(0))} cores" in machine and "date: " in machine
