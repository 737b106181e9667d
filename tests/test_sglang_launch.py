"""The launch flags through SGLang's real parser and resolution pipeline, up to the hand-over."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import import_sglang  # noqa: E402

import_sglang()

from sglang.srt.arg_groups.overrides import resolved_view  # noqa: E402
from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402

from sglang_zeroprefill import HOOK_TARGETS, launch_server  # noqa: E402
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


def test_issue_command_resolves_to_asyncep_layout(model_dir: str) -> None:
    server_args = launch_server.prepare(_argv(model_dir, ISSUE_COMMAND + " --load-balance-method zeroprefill"))
    assert server_args.moe_a2a_backend == "asyncep"
    server_args.resolve_once()
    view = resolved_view(server_args)
    assert (view.attn_dp_size, view.dp_size, view.tp_size, view.ep_size) == (4, 1, 4, 4)
    assert view.moe_a2a_backend == "none"  # SGLang's own dispatcher choice: StandardDispatcher
    assert view.moe_dense_tp_size == 1 and view.enable_dp_lm_head and view.disable_cuda_graph
    assert LoadBalanceMethod.from_str(view.load_balance_method) == LoadBalanceMethod.ROUND_ROBIN
    import os

    assert os.environ[ASYNCEP_ENV] == "1" and os.environ[LOAD_BALANCE_ENV] == "1"


def test_plain_sglang_parser_accepts_flags_once_plugin_loaded(model_dir: str) -> None:
    launch_server.prepare(_argv(model_dir, ""))  # loads plugins, applies and checks hooks
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert set(HOOK_TARGETS) <= HookRegistry._patched
    server_args = prepare_server_args(_argv(model_dir, "--moe-a2a-backend asyncep --load-balance-method zeroprefill"))
    assert (server_args.moe_a2a_backend, server_args.load_balance_method) == ("asyncep", "zeroprefill")
    with pytest.raises(SystemExit):  # argparse still rejects what nobody registered
        prepare_server_args(_argv(model_dir, "--moe-a2a-backend asyncep2"))


def test_other_backends_resolve_unchanged(model_dir: str) -> None:
    server_args = launch_server.prepare(_argv(model_dir, "--tp-size 2 --ep-size 2"))
    server_args.resolve_once()
    assert resolved_view(server_args).moe_a2a_backend == "none"
    assert resolved_view(server_args).load_balance_method == "round_robin"
    import os

    assert os.environ[ASYNCEP_ENV] == "0" and os.environ[LOAD_BALANCE_ENV] == "0"


def test_main_hands_resolved_args_to_sglang_run_server(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sglang.launch_server
    import sglang.srt.utils

    handed_over = []

    def run_server(server_args) -> None:  # what SGLang's run_server does first
        server_args.resolve_once()
        handed_over.append(server_args)

    monkeypatch.setattr(sglang.launch_server, "run_server", run_server)
    monkeypatch.setattr(sglang.srt.utils, "kill_process_tree", lambda *args, **kwargs: None)
    assert launch_server.main(_argv(model_dir, ISSUE_COMMAND)) == 0
    (server_args,) = handed_over
    assert resolved_view(server_args).ep_size == 4 and resolved_view(server_args).moe_a2a_backend == "none"


UNSUPPORTED = [
    ("", "--attn-dp-size 1"),
    ("--attn-dp-size 2 --tp-size 4 --ep-size 4", "--tp-size 4 must equal --attn-dp-size 2"),
    ("--attn-dp-size 2 --tp-size 2", "pass --ep-size 2"),
    ("--attn-dp-size 2 --tp-size 2 --ep-size 2 --quantization fp8", "--quantization fp8"),
    ("--attn-dp-size 2 --tp-size 2 --ep-size 2 --enable-eplb", "--enable-eplb"),
    ("--attn-dp-size 2 --tp-size 2 --ep-size 2 --enable-two-batch-overlap", "--enable-two-batch-overlap"),
    ("--attn-dp-size 2 --tp-size 2 --ep-size 2 --moe-runner-backend flashinfer_cutlass", "--moe-runner-backend"),
]


@pytest.mark.parametrize(("flags", "message"), UNSUPPORTED)
def test_unsupported_combinations_fail_with_one_line(
    flags: str, message: str, model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    server_args = launch_server.prepare(_argv(model_dir, flags + " --moe-a2a-backend asyncep"))
    with pytest.raises(AsyncEPConfigError, match=message.replace("+", r"\+")):
        server_args.resolve_once()

    import sglang.srt.utils

    monkeypatch.setattr(sglang.srt.utils, "kill_process_tree", lambda *args, **kwargs: None)
    assert launch_server.main(_argv(model_dir, flags + " --moe-a2a-backend asyncep")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sglang_zeroprefill: --moe-a2a-backend asyncep") and "Traceback" not in err[-1]


def test_zeroprefill_load_balance_rejects_pd_prefill(model_dir: str) -> None:
    server_args = launch_server.prepare(
        _argv(model_dir, "--load-balance-method zeroprefill --disaggregation-mode prefill")
    )
    with pytest.raises(AsyncEPConfigError, match="disaggregation-mode prefill"):
        server_args.resolve_once()
