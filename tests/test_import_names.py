"""``kernels/`` is ``zeroprefill.kernels``, never the top-level name ``kernels``.

With a checkout's root on ``sys.path`` (``python -m`` or pytest started there) the folder is
found first under its own name, where it would shadow an installed ``kernels`` package
(Hugging Face's kernel hub, which transformers imports when that package's metadata is
present, and then fails on ours). Imported that way it steps aside for the installed one, or stays
empty (what transformers' availability probe, which imports the name, reads as absent).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_from_checkout(code: str, *flags: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_an_installed_kernels_package_is_the_one_imported_from_a_checkout(tmp_path):
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("WHO = 'the installed kernels package'\n")
    done = run_from_checkout("import sys, kernels; assert sys.path[0] == ''; print(kernels.WHO)",
                             pythonpath=tmp_path / "site")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the installed kernels package"


def test_without_one_the_top_level_name_is_empty_and_zeroprefill_kernels_stays():
    # -S: no site-packages, so nothing is installed (nor torch, which our kernels would import).
    done = run_from_checkout("import kernels; print(getattr(kernels, '__version__', 'N/A'), "
                             "hasattr(kernels, 'fused_experts'), kernels.__file__ is not None)", "-S")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["N/A", "False", "True"]  # what transformers reads as "not installed"
    done = run_from_checkout("import zeroprefill.kernels as k; print(k.fused_experts.__module__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "zeroprefill.kernels.fused_moe"
