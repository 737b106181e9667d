"""The prefill-only scheduler's batching decisions, against the true-FLOPs cost model.

The policy (:func:`plan_prefill_step`) is a pure function; the candidates here carry the
FLOPs our cost model gives Qwen3-235B-A22B requests, so every expectation below follows
from the cost model, not from numbers typed into the test.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from zeroprefill.common.cost_model import lm_head_tokens, matmul_params_per_token, request_flops  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
from zeroprefill.common.saturation import Deployment, forward_flops_at_threshold, step_flops_budget  # noqa: E402
from vllm_zeroprefill import scheduler as scheduler_module  # noqa: E402
from vllm_zeroprefill.scheduler import (  # noqa: E402
    BUDGET_ENV,
    PrefillCandidate,
    PrefillOnlySchedulerMixin,
    plan_prefill_step,
    resolve_step_flops_budget,
)

CONFIG = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-235b-a22b.json"
SPEC = MoEModelSpec.from_pretrained(CONFIG)


def candidate(request_id: str, prompt_tokens: int, cached_tokens: int = 0, prefix: str | None = None) -> PrefillCandidate:
    flops = request_flops(SPEC, prompt_tokens, cached_tokens, head_tokens=0)
    return PrefillCandidate(request_id, prefix, cached_tokens, flops, prompt_tokens - cached_tokens)


def test_budget_counts_flops_not_tokens():
    # Same budget, same 32K tokens offered: 16 x 2K-token prompts fit where 4 x 8K ones do not,
    # because each 8K prompt carries 4x the tokens and a longer causal attention triangle.
    budget = 16 * request_flops(SPEC, 2048, 0, head_tokens=0)
    short = [candidate(f"s{i}", 2048) for i in range(16)]
    long = [candidate(f"l{i}", 8192) for i in range(4)]
    assert len(plan_prefill_step(short, budget).admitted) == 16
    admitted_long = plan_prefill_step(long, budget).admitted
    assert len(admitted_long) == 3  # 4 x 8K costs more than 16 x 2K: attention is quadratic
    assert 4 * request_flops(SPEC, 8192, 0, 0) > budget >= 3 * request_flops(SPEC, 8192, 0, 0)


def test_prefix_hit_makes_room():
    # A cached 7K-token prefix removes most of an 8K request's cost, so more fit in the step.
    budget = 2.5 * request_flops(SPEC, 8192, 0, head_tokens=0)
    cold = [candidate(f"c{i}", 8192, prefix=f"p{i}") for i in range(6)]
    warm = [candidate(f"w{i}", 8192, cached_tokens=7168, prefix=f"p{i}") for i in range(6)]
    assert len(plan_prefill_step(cold, budget).admitted) == 2
    assert len(plan_prefill_step(warm, budget).admitted) == 6


def test_warm_prefix_group_is_pulled_into_the_same_step():
    queue = [
        candidate("a", 1024, cached_tokens=512, prefix="doc"),
        candidate("b", 1024, prefix="other"),
        candidate("c", 1024, cached_tokens=512, prefix="doc"),
    ]
    plan = plan_prefill_step(queue, 1e18)
    assert plan.admitted == ("a", "c", "b")
    assert plan.deferred == ()


def test_cold_prefix_group_sends_only_its_leader():
    # Nothing cached yet: computing the shared prefix twice in one step is waste; the second
    # request waits one step and then hits the blocks the first one cached.
    queue = [
        candidate("a", 1024, prefix="doc"),
        candidate("b", 1024, prefix="other"),
        candidate("c", 1024, prefix="doc"),
    ]
    plan = plan_prefill_step(queue, 1e18)
    assert plan.admitted == ("a", "b")
    assert plan.deferred == ("c",)


def test_requests_without_a_full_block_are_their_own_group():
    queue = [candidate("a", 10), candidate("b", 10), candidate("c", 10)]
    assert plan_prefill_step(queue, 1e18).admitted == ("a", "b", "c")


def test_oversized_request_runs_alone_but_not_beside_other_work():
    huge = candidate("huge", 32768)
    small_budget = request_flops(SPEC, 1024, 0, 0)
    assert plan_prefill_step([huge], small_budget).admitted == ("huge",)
    plan = plan_prefill_step([huge], small_budget, in_flight_flops=1)
    assert plan.admitted == () and plan.deferred == ("huge",)


def test_in_flight_work_counts_against_the_budget():
    one = request_flops(SPEC, 2048, 0, 0)
    queue = [candidate(f"r{i}", 2048) for i in range(4)]
    assert len(plan_prefill_step(queue, 4 * one).admitted) == 4
    plan = plan_prefill_step(queue, 4 * one, in_flight_flops=2 * one)
    assert len(plan.admitted) == 2
    assert plan.admitted_flops == 2 * one


def test_admission_is_head_of_line_fair():
    # A small request behind one that does not fit waits too (no starving the large one).
    budget = request_flops(SPEC, 4096, 0, 0)
    queue = [candidate("first", 2048), candidate("big", 4096), candidate("small", 512)]
    plan = plan_prefill_step(queue, budget)
    assert plan.admitted == ("first",)
    assert plan.deferred == ("big", "small")


def test_offering_stops_once_the_engines_token_budget_is_covered_and_the_rest_is_not_priced():
    class Unpriced:  # a waiting request the policy must not price: past the token budget
        def __init__(self, request_id: str) -> None:
            self.request_id, self.prefix_key = request_id, None

        def __getattr__(self, name: str):
            raise AssertionError(f"{self.request_id} was priced ({name})")

    queue = [candidate(f"r{i}", 1024) for i in range(3)] + [Unpriced("r3"), Unpriced("r4")]
    plan = plan_prefill_step(queue, 1e18, token_budget=3000)
    assert plan.admitted == ("r0", "r1", "r2")  # the third crosses 3,000 tokens: the engine may chunk it
    assert plan.deferred == ("r3", "r4")
    cached = [candidate(f"c{i}", 1024, cached_tokens=512, prefix="doc") for i in range(4)]
    assert len(plan_prefill_step(cached, 1e18, token_budget=1024).admitted) == 2  # only uncached tokens count
    in_flight = plan_prefill_step([candidate("a", 1024)], 1e18, in_flight_flops=1, token_budget=0)
    assert in_flight.admitted == ()  # running work took the whole budget
    assert plan_prefill_step([candidate("a", 1024)], 1e18, token_budget=0).admitted == ("a",)  # an empty step


def test_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="flops_budget must be positive"):
        plan_prefill_step([candidate("a", 10)], 0)


def _config(additional_config=None, max_num_batched_tokens=8192, moe_backend="asyncep", data_parallel_size=4,
            runner_type="pooling", quantization=None):
    hf_config = json.loads(CONFIG.read_text())
    return SimpleNamespace(
        additional_config=additional_config or {},
        scheduler_config=SimpleNamespace(max_num_batched_tokens=max_num_batched_tokens),
        kernel_config=SimpleNamespace(moe_backend=moe_backend),
        parallel_config=SimpleNamespace(data_parallel_size=data_parallel_size),
        model_config=SimpleNamespace(max_model_len=32768, runner_type=runner_type, quantization=quantization,
                                     hf_text_config=SimpleNamespace(to_dict=lambda: hf_config)),
    )


@pytest.fixture
def on_gpu(monkeypatch):
    """vLLM's platform reports a CUDA GPU of the given name (as NVML would)."""
    from vllm.platforms import current_platform

    def use(device_name: str) -> None:
        monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
        monkeypatch.setattr(current_platform, "get_device_name", lambda device_id=0: device_name)

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    return use


def test_budget_off_gpu_is_a_full_token_budget_of_linear_flops(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)  # no GPU a profile describes
    assert resolve_step_flops_budget(_config(), SPEC) == 2 * 8192 * matmul_params_per_token(SPEC)


def test_budget_on_a_known_gpu_is_the_planners_saturation_budget(on_gpu):
    on_gpu("NVIDIA H200")
    planned = resolve_step_flops_budget(_config(), SPEC)
    # 4 DP ranks of H200, the runtime's transport (the copy engine), 2048-token prompts.
    deployment = Deployment.on_shipped_gpu(SPEC, "h200", 4)
    assert deployment.transport == "copy_engine"
    assert planned == step_flops_budget(deployment, 2048)
    assert planned == pytest.approx(1.1 * forward_flops_at_threshold(deployment, 2048))
    assert planned != 2 * 8192 * matmul_params_per_token(SPEC)


def test_budget_of_a_block_fp8_checkpoint_is_the_planners_fp8_budget(on_gpu):
    # FP8 experts gather half the bytes per layer: less work per step hides the gather.
    on_gpu("NVIDIA H200")
    planned = resolve_step_flops_budget(_config(quantization="fp8"), SPEC)
    fp8 = Deployment.on_shipped_gpu(SPEC, "h200", 4, dtype="fp8")
    assert planned == step_flops_budget(fp8, 2048)
    assert planned < resolve_step_flops_budget(_config(), SPEC)


@pytest.mark.parametrize("transport", ["auto", "nccl", "copy_engine"])
@pytest.mark.parametrize("quantization, dtype", [(None, "bf16"), ("fp8", "fp8")])
def test_budget_is_the_engines_common_budget_for_the_transport_in_use(on_gpu, monkeypatch, transport, quantization,
                                                                      dtype):
    # The one engine budget both plugins call (SGLang's balancer at headroom 1): here with the
    # transport AsyncEP gathers with, not auto's, and the checkpoint's format.
    from zeroprefill.common.asyncep_model import TRANSPORT_ENV
    from zeroprefill.common.saturation import DEFAULT_STEP_HEADROOM, step_flops_budget_on_gpus

    on_gpu("NVIDIA H200")
    monkeypatch.setenv(TRANSPORT_ENV, transport)
    planned = resolve_step_flops_budget(_config(quantization=quantization), SPEC)
    assert planned == step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 4, 2048, DEFAULT_STEP_HEADROOM, dtype)
    assert planned == step_flops_budget(Deployment.on_shipped_gpu(SPEC, "h200", 4, dtype, transport), 2048)


@pytest.mark.parametrize("device_name, config", [
    ("NVIDIA A100-SXM4-80GB", _config()),  # no shipped profile for the GPU
    ("NVIDIA H200", _config(moe_backend="auto")),  # nothing gathered: no threshold
    ("NVIDIA H200", _config(data_parallel_size=1)),  # one rank: nothing gathered
    ("NVIDIA H200", _config(data_parallel_size=3)),  # no shipped profile for 3 GPUs
])
def test_budget_falls_back_to_the_token_budget_without_a_profile(on_gpu, scheduler_log, device_name, config):
    on_gpu(device_name)
    assert resolve_step_flops_budget(config, SPEC) == 2 * 8192 * matmul_params_per_token(SPEC)
    if config.parallel_config.data_parallel_size == 3:
        assert "no shipped h200 profile for 3 GPUs" in scheduler_log.text
    assert "step budget" in scheduler_log.text and "(--max-num-batched-tokens; 8192 tokens of linear work)" in scheduler_log.text


@pytest.fixture
def scheduler_log(caplog):
    """What the scheduler logs (vLLM's loggers do not propagate to pytest's root handler)."""
    logger = scheduler_module.logger
    logger.addHandler(caplog.handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(previous)


def test_budget_from_additional_config_wins_over_env(monkeypatch, on_gpu, scheduler_log):
    on_gpu("NVIDIA H200")  # an override wins over the planner too
    monkeypatch.setenv(BUDGET_ENV, "5e12")
    assert resolve_step_flops_budget(_config(), SPEC) == 5e12
    assert "step budget 5e+12 FLOPs per rank (configured;" in scheduler_log.text
    assert resolve_step_flops_budget(_config({"zeroprefill": {"step_flops_budget": 7e12}}), SPEC) == 7e12


@pytest.mark.parametrize("bad", ["lots", "-1", "0"])
def test_budget_rejects_bad_values(monkeypatch, bad):
    monkeypatch.setenv(BUDGET_ENV, bad)
    with pytest.raises(ValueError, match=f"step_flops_budget must be .*{BUDGET_ENV}"):
        resolve_step_flops_budget(_config(), SPEC)


class _BaseScheduler:
    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config


class _Scheduler(PrefillOnlySchedulerMixin, _BaseScheduler):
    """The mixin over a stand-in for vLLM's scheduler (it only needs the config)."""


@pytest.mark.parametrize("runner_type", ["pooling", "generate"])
def test_scheduler_charges_the_lm_head_as_lm_head_tokens_decides(monkeypatch, runner_type):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    scheduler = _Scheduler(_config(runner_type=runner_type))
    assert scheduler.head_tokens == lm_head_tokens(runner_type) == (runner_type == "generate")


def test_scheduler_cost_times_both_schedulers_on_the_same_queue(tmp_path, capsys):
    """``benchmarks/scheduler_cost.py``: a real vLLM Scheduler and the prefill-only one over one
    model config; with the FLOPs budget out of reach both fill the token budget alike."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scheduler_cost

    out = tmp_path / "cost.json"
    budget_before = os.environ.get(BUDGET_ENV)
    assert scheduler_cost.main(["--layers", "2", "--batched-tokens", "1024", "--tokens", "256", "--waiting", "8",
                                "--steps", "5", "--out", str(out)]) == 0
    rows = {row["scheduler"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"vllm", "prefill-only"}
    assert rows["vllm"]["requests_scheduled_per_step"] == rows["prefill-only"]["requests_scheduled_per_step"] == 4
    assert all(row["schedule_ms_median"] > 0 for row in rows.values())
    assert "prefill-only" in capsys.readouterr().out
    assert os.environ.get(BUDGET_ENV) == budget_before  # the budget it set is gone: later servers get their own
    with pytest.raises(SystemExit):
        scheduler_cost.main(["--model", "no-such-model"])
