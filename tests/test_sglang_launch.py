"""The launch flags through SGLang's real parser and resolution, up to the hand-over.

Resolution runs where the installed release runs it: inside ``prepare_server_args`` on SGLang
0.5.17 - 0.5.18, in ``ServerArgs.resolve_once`` later (``compat.resolve`` does the latter).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import import_sglang  # noqa: E402

import_sglang()

from sglang.srt.arg_groups.overrides import resolved_view  # noqa: E402
from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402

import sglang_zeroprefill  # noqa: E402
from sglang_zeroprefill import args, compat, launch_server  # noqa: E402
from sglang_zeroprefill.args import ASYNCEP_ENV, LOAD_BALANCE_ENV  # noqa: E402
from zeroprefill.common.asyncep_model import AsyncEPConfigError  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-30b-a3b.json"
ISSUE_COMMAND = "--is-embedding --dp-size 4 --enable-dp-attention --tp-size 4 --ep-size 4 --moe-a2a-backend asyncep"


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(CONFIG.read_text())
    return str(tmp_path)


@pytest.fixture(autouse=True)
def clean_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution marks the process environment; restore it after each test."""
    monkeypatch.setenv(ASYNCEP_ENV, "0")
    monkeypatch.setenv(LOAD_BALANCE_ENV, "0")


def _argv(model_dir: str, flags: str) -> list[str]:
    return ["--model-path", model_dir, "--device", "cpu", *flags.split()]


def _resolved(argv: list[str]):
    server_args = launch_server.prepare(argv)
    compat.resolve(server_args)
    return resolved_view(server_args)


def test_issue_command_resolves_to_asyncep_layout(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(args, "launched_by_our_launcher", lambda: True)
    view = _resolved(_argv(model_dir, ISSUE_COMMAND + " --load-balance-method zeroprefill"))
    assert (compat.attention_dp_size(view), compat.dp_rank_count(view), view.tp_size, view.ep_size) == (4, 4, 4, 4)
    assert view.moe_a2a_backend == "none"  # SGLang's own dispatcher choice: StandardDispatcher
    assert view.moe_dense_tp_size == 1 and view.enable_dp_lm_head
    assert not view.disable_cuda_graph  # graph launches wait for the weight stream instead
    assert LoadBalanceMethod.from_str(view.load_balance_method) == LoadBalanceMethod.ROUND_ROBIN
    assert os.environ[ASYNCEP_ENV] == "1" and os.environ[LOAD_BALANCE_ENV] == "1"


def test_one_gpu_command_resolves_to_local_experts(model_dir: str, capfd: pytest.CaptureFixture) -> None:
    logging.getLogger("sglang_zeroprefill").setLevel(logging.INFO)  # SGLang's log handler writes to stderr
    view = _resolved(_argv(model_dir, "--is-embedding --moe-a2a-backend asyncep --load-balance-method zeroprefill"))
    log = capfd.readouterr().err
    assert (compat.attention_dp_size(view), view.tp_size, view.ep_size) == (1, 1, 1)
    assert view.moe_a2a_backend == "none" and not view.disable_cuda_graph
    assert not view.enable_dp_lm_head  # nothing is data-parallel on one GPU
    assert os.environ[ASYNCEP_ENV] == "1" and os.environ[LOAD_BALANCE_ENV] == "1"
    assert "AsyncEP on one GPU" in log
    # One DP rank: SGLang starts no DP controller, and the log says the policy is idle.
    assert "zeroprefill with one DP rank: SGLang starts no DP controller" in log


def test_plain_sglang_parser_accepts_flags_once_plugin_loaded(model_dir: str) -> None:
    launch_server.prepare(_argv(model_dir, ""))  # loads plugins, applies and checks hooks
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert {hook.target for hook in sglang_zeroprefill._registered_hooks} <= HookRegistry._patched
    server_args = prepare_server_args(_argv(model_dir, "--moe-a2a-backend asyncep --load-balance-method zeroprefill"))
    compat.resolve(server_args)
    assert resolved_view(server_args).moe_a2a_backend == "none"
    assert os.environ[ASYNCEP_ENV] == "1" and os.environ[LOAD_BALANCE_ENV] == "1"
    with pytest.raises(SystemExit):  # argparse still rejects what nobody registered
        prepare_server_args(_argv(model_dir, "--moe-a2a-backend asyncep2"))


def test_quantization_fp8_resolves_and_the_layers_decide(model_dir: str) -> None:
    # A block-FP8 checkpoint needs no flag; with --quantization fp8 its FusedMoE layers are checked
    # at construction, where a bf16 checkpoint quantized online is refused (tests/test_sglang_moe.py).
    view = _resolved(_argv(model_dir, f"{compat.attention_dp_flags(2)} --tp-size 2 --ep-size 2 "
                                      "--quantization fp8 --moe-a2a-backend asyncep"))
    assert view.quantization == "fp8" and view.moe_a2a_backend == "none"


def test_other_backends_resolve_unchanged(model_dir: str) -> None:
    view = _resolved(_argv(model_dir, "--tp-size 2 --ep-size 2"))
    assert view.moe_a2a_backend == "none" and view.load_balance_method == "round_robin"
    assert os.environ[ASYNCEP_ENV] == "0" and os.environ[LOAD_BALANCE_ENV] == "0"


def test_main_hands_resolved_args_to_sglang_run_server(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sglang.launch_server
    import sglang.srt.utils

    handed_over = []

    def run_server(server_args) -> None:  # what SGLang's run_server does first
        compat.resolve(server_args)
        handed_over.append(server_args)

    monkeypatch.setattr(sglang.launch_server, "run_server", run_server)
    monkeypatch.setattr(sglang.srt.utils, "kill_process_tree", lambda *args, **kwargs: None)
    assert launch_server.main(_argv(model_dir, ISSUE_COMMAND)) == 0
    (server_args,) = handed_over
    assert resolved_view(server_args).ep_size == 4 and resolved_view(server_args).moe_a2a_backend == "none"


# "{dp2}": two attention-DP ranks as the installed release spells them.
UNSUPPORTED = [
    ("--tp-size 2", "--tp-size 2 must equal the attention-DP size 1 (for 2 GPUs pass {dp2})"),
    ("{dp2} --tp-size 4 --ep-size 4", "--tp-size 4 must equal the attention-DP size 2"),
    ("{dp2} --tp-size 2", "pass --ep-size 2"),
    ("{dp2} --tp-size 2 --ep-size 2 --quantization w8a8_fp8",
     "--quantization w8a8_fp8: AsyncEP serves unquantized experts and block-FP8 ones"),
    ("{dp2} --tp-size 2 --ep-size 2 --enable-eplb", "--enable-eplb"),
    ("{dp2} --tp-size 2 --ep-size 2 --enable-two-batch-overlap", "--enable-two-batch-overlap"),
    ("{dp2} --tp-size 2 --ep-size 2 --moe-runner-backend flashinfer_cutlass", "--moe-runner-backend"),
]


def _in_release_terms(text: str) -> str:
    return text.replace("{dp2}", compat.attention_dp_flags(2))


@pytest.mark.parametrize(("flags", "message"), UNSUPPORTED)
def test_unsupported_combinations_fail_with_one_line(
    flags: str, message: str, model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = _argv(model_dir, _in_release_terms(flags) + " --moe-a2a-backend asyncep")
    with pytest.raises(AsyncEPConfigError) as raised:
        compat.resolve(launch_server.prepare(argv))
    assert _in_release_terms(message) in str(raised.value)

    import sglang.srt.utils

    monkeypatch.setattr(sglang.srt.utils, "kill_process_tree", lambda *args, **kwargs: None)
    assert launch_server.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sglang_zeroprefill: --moe-a2a-backend asyncep") and "Traceback" not in err[-1]


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH", "two", "ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH='two' is not a whole number"),
    ("ZEROPREFILL_EXPERTS_KERNEL", "cutlass", "ZEROPREFILL_EXPERTS_KERNEL='cutlass' is not one of auto"),
    ("ZEROPREFILL_DEEPGEMM_FP8_LAYOUT", "rows", "ZEROPREFILL_DEEPGEMM_FP8_LAYOUT='rows' is not one of m_indices"),
])
def test_a_bad_setting_fails_at_start_up_with_one_line(
    setting: str, value: str, message: str, model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting, value)
    with pytest.raises(AsyncEPConfigError, match=message):
        compat.resolve(launch_server.prepare(_argv(model_dir, "--moe-a2a-backend asyncep")))


def test_zeroprefill_load_balance_rejects_pd_prefill(model_dir: str) -> None:
    with pytest.raises(AsyncEPConfigError, match="disaggregation-mode prefill"):
        compat.resolve(launch_server.prepare(
            _argv(model_dir, "--load-balance-method zeroprefill --disaggregation-mode prefill")
        ))


def test_zeroprefill_load_balance_needs_our_launcher_where_the_dp_controller_loads_no_plugins(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _argv(model_dir, "--dp-size 2 --load-balance-method zeroprefill")  # two replicas, one DP controller
    monkeypatch.setattr(compat, "dp_controller_loads_plugins", lambda: False)  # SGLang before 0.5.22
    with pytest.raises(AsyncEPConfigError, match="python -m sglang_zeroprefill.launch_server"):
        compat.resolve(launch_server.prepare(argv))
    monkeypatch.setattr(args, "launched_by_our_launcher", lambda: True)  # it loads them in its children
    assert LoadBalanceMethod.from_str(_resolved(argv).load_balance_method) == LoadBalanceMethod.ROUND_ROBIN
    assert os.environ[LOAD_BALANCE_ENV] == "1"


def test_a_release_outside_the_supported_range_fails_with_one_line(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "installed_sglang_version", lambda: "0.5.16")
    with pytest.raises(AsyncEPConfigError, match=r"supports SGLang >= 0\.5\.17, < 0\.5\.24, found 0\.5\.16"):
        compat.resolve(launch_server.prepare(_argv(model_dir, "--moe-a2a-backend asyncep")))
