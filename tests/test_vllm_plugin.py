"""``--moe-backend asyncep`` reaches vLLM through its plugin entry points; bad deployments
fail while the engine config is built (in the API server, before any worker starts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe  # noqa: E402

# A fresh interpreter: nothing of ours is imported by hand, so the value can only come from
# the vllm.platform_plugins entry point, run while vLLM builds its parser.
_PARSE_CLI = """
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
print("moe_backend=" + parser.parse_args(["--moe-backend", "asyncep"]).moe_backend)
"""


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return generate_tiny_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"), TinyMoEConfig())


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, tiny_moe):
    """A dense Qwen3 config beside the MoE one (only the config is read)."""
    out = tmp_path_factory.mktemp("tiny-qwen3-dense")
    config = json.loads((tiny_moe / "config.json").read_text())
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef",
                "output_router_logits"):
        config.pop(key, None)
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_moe / name, out / name)
    return out


def test_cli_accepts_asyncep_through_the_platform_plugin():
    result = subprocess.run([sys.executable, "-c", _PARSE_CLI], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "moe_backend=asyncep" in result.stdout


def test_serve_parser_accepts_asyncep_when_vllm_skips_platform_plugins():
    # VLLM_TARGET_DEVICE=cpu makes vLLM pick its CPU platform without loading platform plugins;
    # `vllm serve` builds its parser through AsyncEngineArgs, which loads the general plugin first.
    code = _PARSE_CLI.replace("EngineArgs", "AsyncEngineArgs")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "moe_backend=asyncep" in result.stdout


def test_cli_still_rejects_unknown_backends():
    code = _PARSE_CLI.replace('"asyncep"', '"asyncepp"')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "invalid choice: 'asyncepp'" in result.stderr


def _engine_config(model, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_zeroprefill.plugin import register

    register()
    kwargs = dict(
        model=str(model), runner="pooling", convert="embed", dtype="float32", enforce_eager=True,
        max_model_len=256, moe_backend="asyncep", data_parallel_size=2, enable_expert_parallel=True,
    )
    kwargs.update(overrides)
    return EngineArgs(**kwargs).create_engine_config()


def test_asyncep_pooling_gets_the_prefill_only_scheduler(tiny_moe):
    config = _engine_config(tiny_moe)
    assert config.kernel_config.moe_backend == "asyncep"
    assert config.scheduler_config.scheduler_cls == "vllm_zeroprefill.scheduler.PrefillOnlyScheduler"


def test_explicit_scheduler_cls_is_kept(tiny_moe):
    config = _engine_config(tiny_moe, scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    assert config.scheduler_config.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(enable_expert_parallel=False), "add --enable-expert-parallel"),
        (dict(tensor_parallel_size=2, data_parallel_size=1), "use --tensor-parallel-size 1 and --data-parallel-size 2"),
        (dict(data_parallel_size=16), "--data-parallel-size 16 exceeds the model's 8 experts"),
    ],
)
def test_unsupported_deployments_fail_with_what_to_change(tiny_moe, overrides, message):
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    with pytest.raises(AsyncEPConfigError, match=message.replace("-", r"\-")):
        _engine_config(tiny_moe, **overrides)


def test_non_moe_model_fails_with_what_to_change(tiny_dense):
    # (With --enable-expert-parallel vLLM itself already rejects a model without experts.)
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    with pytest.raises(AsyncEPConfigError, match="needs a Mixture-of-Experts model.*drop --moe-backend asyncep"):
        _engine_config(tiny_dense, enable_expert_parallel=False, data_parallel_size=1)


def test_other_backends_are_left_alone(tiny_moe):
    config = _engine_config(tiny_moe, moe_backend="auto", enable_expert_parallel=False, data_parallel_size=1)
    assert config.kernel_config.moe_backend == "auto"
    assert config.scheduler_config.scheduler_cls is None


def _start_up(code: str, env_overrides: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, where vLLM loads our entry points by itself."""
    import os

    env = dict(os.environ)
    env.update(env_overrides or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


# As ``vllm serve`` does: build the parser (vLLM detects its platform there, running the
# platform plugins), parse the flags, create the engine config.
_BUILD_CONFIG = """
import vllm
{patch}
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
args = parser.parse_args(["--model", {model!r}, "--runner", "pooling", "--convert", "embed",
                          "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
                          "--moe-backend", {backend!r}, "--data-parallel-size", "2",
                          "--enable-expert-parallel"])
EngineArgs.from_cli_args(args).create_engine_config()
print("config built")
"""


def test_vllm_plugins_leaving_the_general_plugin_out_fails_in_one_line(tiny_moe):
    code = _BUILD_CONFIG.format(patch="", model=str(tiny_moe), backend="asyncep")
    result = _start_up(code, {"VLLM_PLUGINS": "zeroprefill_moe_backend"})
    assert result.returncode != 0 and "config built" not in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --moe-backend asyncep needs vLLM to load the 'zeroprefill' plugin, but "
        "VLLM_PLUGINS='zeroprefill_moe_backend' leaves it out: add zeroprefill to VLLM_PLUGINS"
    )


def test_vllm_outside_the_supported_range_refuses_asyncep_only(tiny_moe):
    patch = 'vllm.__version__ = "0.25.0"'
    refused = _start_up(_BUILD_CONFIG.format(patch=patch, model=str(tiny_moe), backend="asyncep"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error: --moe-backend asyncep supports vLLM >= 0.26.0, < 0.35.0, found 0.25.0"
    )
    other = _start_up(_BUILD_CONFIG.format(patch=patch, model=str(tiny_moe), backend="auto")
                      .replace(', "--data-parallel-size", "2",\n                          "--enable-expert-parallel"', ""))
    assert other.returncode == 0, other.stderr[-2000:]
    assert "config built" in other.stdout


def test_dual_batch_overlap_is_refused(tiny_moe):
    # vLLM on CPU switches --enable-dbo off itself; the check sees a GPU config's flag.
    from vllm_zeroprefill.validation import check_asyncep_config
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    config = _engine_config(tiny_moe)
    config.parallel_config.enable_dbo = True
    with pytest.raises(AsyncEPConfigError, match="drop --enable-dbo"):
        check_asyncep_config(config)


def test_bad_streaming_setting_fails_before_any_worker(tiny_moe, monkeypatch):
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    monkeypatch.setenv("ZEROPREFILL_ASYNCEP_TRANSPORT", "pigeon")
    with pytest.raises(AsyncEPConfigError, match="ZEROPREFILL_ASYNCEP_TRANSPORT='pigeon' is not a transport"):
        _engine_config(tiny_moe)
    monkeypatch.delenv("ZEROPREFILL_ASYNCEP_TRANSPORT")
    monkeypatch.setenv("ZEROPREFILL_EXPERTS_KERNEL", "cutlass")
    with pytest.raises(AsyncEPConfigError, match="ZEROPREFILL_EXPERTS_KERNEL='cutlass' is not one of auto"):
        _engine_config(tiny_moe)
    monkeypatch.delenv("ZEROPREFILL_EXPERTS_KERNEL")
    monkeypatch.setenv("ZEROPREFILL_DEEPGEMM_FP8_LAYOUT", "rows")
    with pytest.raises(AsyncEPConfigError, match="ZEROPREFILL_DEEPGEMM_FP8_LAYOUT='rows' is not one of m_indices, psum"):
        _engine_config(tiny_moe)


def test_registration_waits_for_vllm_config_when_vllm_detects_its_platform_mid_import(tmp_path):
    # vLLM 0.26 detects its platform while vllm.utils.torch_utils is half-imported, so the
    # platform plugin cannot import vllm.config yet: it registers once vllm.config is imported.
    package = tmp_path / "late_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("VALUE = 1\n")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from vllm_zeroprefill.moe_backend import run_after_import
calls = []
run_after_import("late_pkg.config", lambda: calls.append(sys.modules["late_pkg.config"].VALUE))
assert calls == []
import late_pkg.config
assert calls == [1], calls
run_after_import("late_pkg.config", lambda: calls.append("now"))  # already imported: at once
assert calls == [1, "now"], calls
import importlib.util
assert importlib.util.find_spec("late_pkg.config") is not None  # no finder left behind
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
