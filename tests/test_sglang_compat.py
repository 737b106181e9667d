"""``sglang_zeroprefill.compat`` against the installed SGLang release (0.5.23 in CI; 0.5.17 by
``make test-sglang-cpu``): each detection agrees with an independent reading of the release."""

from __future__ import annotations

import argparse
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from sglang_cpu import import_sglang  # noqa: E402

import_sglang()

import sglang_zeroprefill  # noqa: E402
from sglang_zeroprefill import args, compat, launch_server  # noqa: E402

launch_server.load_plugins_with_ours()


@pytest.mark.parametrize(("version", "supported"), [
    ("0.5.17", True), ("0.5.23", True), ("0.5.20.post1", True), ("0.5.19+cpu", True),
    ("0.5.16", False), ("0.5.24", False), ("0.6.0", False),
])
def test_supported_range(version: str, supported: bool) -> None:
    message = compat.unsupported_sglang_message(version)
    assert (message is None) == supported
    if not supported:
        assert message == (
            f"sglang_zeroprefill supports SGLang >= 0.5.17, < 0.5.24, found {version}: install a release in that "
            "range or serve without --moe-a2a-backend asyncep / --load-balance-method zeroprefill"
        )


def test_info_says_whether_the_installed_release_is_supported(monkeypatch) -> None:
    import sglang

    from zeroprefill.environment import collect_environment

    assert collect_environment()["backends"]["sglang plugin"] == (
        f"sglang {sglang.__version__} supported (>= 0.5.17, < 0.5.24)")
    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    assert collect_environment()["backends"]["sglang plugin"] == (
        "sglang 0.5.24 outside the supported >= 0.5.17, < 0.5.24: "
        "--moe-a2a-backend asyncep and --load-balance-method zeroprefill refuse to start")


def test_an_unreadable_version_is_one_line() -> None:
    assert compat.unsupported_sglang_message("dev") == (
        "sglang_zeroprefill cannot read the SGLang version 'dev'; it supports SGLang >= 0.5.17, < 0.5.24"
    )


def test_the_installed_release_is_supported() -> None:
    assert compat.unsupported_sglang_message(compat.installed_sglang_version()) is None


def test_every_hook_target_exists_in_this_release() -> None:
    for hook in sglang_zeroprefill._registered_hooks:
        pkgutil.resolve_name(hook.target)  # raises where a release lacks the name


def test_resolution_steps_sit_where_this_release_runs_them() -> None:
    hooked = {hook.target for hook in sglang_zeroprefill._registered_hooks}
    try:
        from sglang.srt.arg_groups.resolution_hooks import _HOOKS
    except ImportError:
        from sglang.srt.server_args import ServerArgs

        in_post_init = "_handle_dwdp" in inspect.getsource(ServerArgs.__post_init__)
        steps = (["sglang.srt.server_args.ServerArgs._handle_dwdp",
                  "sglang.srt.server_args.ServerArgs._handle_load_balance_method"] if in_post_init else
                 ["sglang.srt.arg_groups.parallel_hook.handle_dwdp",
                  "sglang.srt.arg_groups.serving_hook.handle_load_balance_method"])
        assert set(steps) <= hooked
    else:
        assert args.handle_asyncep in _HOOKS["handle_dwdp"]
        assert args.handle_zeroprefill_load_balance in _HOOKS["handle_load_balance_method"]


def test_attention_dp_spelling_matches_the_parser() -> None:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    assert compat.has_attn_dp_size_flag() == ("--attn-dp-size" in options)
    assert set(compat.attention_dp_flags(2).split()) - {"2"} <= options


def test_the_experts_output_seam_is_the_one_the_release_defers_to() -> None:
    from sglang.srt.layers.moe import utils

    target = compat.experts_output_complete_target()
    if hasattr(utils, "post_experts_output_is_complete"):
        assert target.endswith(".post_experts_output_is_complete")
        assert "post_experts_output_is_complete" in inspect.getsource(utils.should_skip_post_experts_all_reduce)
    else:
        assert target.endswith(".should_skip_post_experts_all_reduce")
    assert compat.moe_input_stays_local_targets()  # at least one decision point for the DP gather


def test_dp_controller_plugin_loading_matches_its_process_entry() -> None:
    from sglang.srt.managers.data_parallel_controller import run_data_parallel_controller_process

    loads = "load_plugins()" in inspect.getsource(run_data_parallel_controller_process)
    assert compat.dp_controller_loads_plugins() == loads


def test_children_spawned_from_our_launcher_load_the_plugins() -> None:
    """multiprocessing's spawn runs the parent's main module as ``__mp_main__`` in each child
    (``runpy.run_module``) before the child's target, e.g. SGLang's DP controller process."""
    child = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from sglang_cpu import import_sglang\n"
        "import_sglang()\n"
        "runpy.run_module('sglang_zeroprefill.launch_server', run_name='__mp_main__', alter_sys=True)\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "print('PATCHED', sorted(HookRegistry._patched))\n"
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    patched = result.stdout.split("PATCHED", 1)[1]
    assert "sglang.srt.managers.data_parallel_controller.DataParallelController.__init__" in patched
    assert "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.run_moe_core" in patched


def test_pyproject_states_the_range_compat_defines():
    # compat.SUPPORTED_SGLANG is what the plugin reads; the sglang extra must install the same releases.
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    from sglang_zeroprefill import compat

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (sglang,) = [Requirement(r) for r in project["optional-dependencies"]["sglang"]]
    bounds = {spec.operator: Version(spec.version) for spec in sglang.specifier}
    assert bounds == {">=": compat.SUPPORTED_SGLANG[0], "<": compat.SUPPORTED_SGLANG[1]}
