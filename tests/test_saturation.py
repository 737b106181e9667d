"""One rule for each decision: the transport (runtime and planner), the engines' step budget
(from the transport and weight format in use), and the one budget setting with one parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeroprefill.common.asyncep_model import TRANSPORT_ENV
from zeroprefill.common.layouts import switch_point_on_gpus, switch_point_tokens
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.saturation import (
    DEPRECATED_SATURATION_FLOPS_ENV,
    STEP_FLOPS_BUDGET_ENV,
    Deployment,
    configured_step_flops_budget,
    engine_deployment,
    parse_step_flops_budget,
    step_flops_budget,
    step_flops_budget_on_gpus,
)
from zeroprefill.common.transport_choice import TRANSPORT_SETTINGS, resolve_transport

CONFIG = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-235b-a22b.json"
SPEC = MoEModelSpec.from_pretrained(CONFIG)


@pytest.mark.parametrize("device_type, nodes, symmetric_memory, expected", [
    ("cpu", 1, True, "gloo"),
    ("cuda", 1, True, "copy_engine"),
    ("cuda", 1, False, "nccl"),  # a torch without symmetric memory
    ("cuda", 2, True, "nccl"),  # the copy engine reads peer memory inside one node only
])
def test_auto_is_resolved_by_device_nodes_and_symmetric_memory(device_type, nodes, symmetric_memory, expected):
    assert resolve_transport("auto", device_type, nodes, symmetric_memory) == expected


def test_a_named_transport_is_kept_and_a_bad_one_is_one_line():
    for name in TRANSPORT_SETTINGS[1:]:
        assert resolve_transport(name, "cuda") == name
    with pytest.raises(ValueError, match="unknown transport 'ib'; choose one of auto, gloo, nccl, copy_engine"):
        resolve_transport("ib", "cuda")
    with pytest.raises(ValueError, match="inside one node; use nccl across nodes"):
        resolve_transport("copy_engine", "cuda", nodes=2)


@pytest.mark.parametrize("setting, planned", [(None, "copy_engine"), ("auto", "copy_engine"), ("nccl", "nccl"),
                                              ("copy_engine", "copy_engine")])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_engine_budget_plans_the_transport_and_format_in_use(monkeypatch, setting, planned, dtype):
    if setting is None:
        monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    else:
        monkeypatch.setenv(TRANSPORT_ENV, setting)
    deployment = Deployment.on_shipped_gpu(SPEC, "h200", 4, dtype, planned)
    budget = step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 4, 2048, dtype=dtype)
    assert budget == step_flops_budget(deployment, 2048)
    assert step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 4, 2048, dtype=dtype, transport=setting) == budget


def test_an_nccl_deployment_is_not_budgeted_as_a_copy_engine_one(monkeypatch):
    # Issue 27: Qwen3-235B on 4xH200; NCCL's plan is half the copy engine's.
    monkeypatch.setenv(TRANSPORT_ENV, "nccl")
    assert step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 4) == pytest.approx(7.0e14, rel=0.01)
    monkeypatch.setenv(TRANSPORT_ENV, "copy_engine")
    assert step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 4) == pytest.approx(1.31e15, rel=0.01)


def test_the_engines_budget_and_switch_point_plan_one_deployment(monkeypatch):
    monkeypatch.setenv(TRANSPORT_ENV, "nccl")
    deployment = engine_deployment(SPEC, "NVIDIA H200", 4, "fp8")
    assert deployment == Deployment.on_shipped_gpu(SPEC, "h200", 4, "fp8", "nccl")
    assert step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 4, 2048, dtype="fp8") == step_flops_budget(deployment, 2048)
    assert switch_point_on_gpus(SPEC, "NVIDIA H200", 4, 2048, dtype="fp8") == switch_point_tokens(deployment, 2048)


def test_no_engine_budget_without_a_profile_or_a_gather():
    assert step_flops_budget_on_gpus(SPEC, "NVIDIA A100-SXM4-80GB", 4) is None
    assert step_flops_budget_on_gpus(SPEC, "NVIDIA H200", 1) is None
    assert switch_point_on_gpus(SPEC, "NVIDIA H200", 1, 2048) is None


def test_the_budget_setting_is_read_and_checked_once():
    assert configured_step_flops_budget({}) is None
    assert configured_step_flops_budget({STEP_FLOPS_BUDGET_ENV: "3e14"}) == 3e14
    both = {STEP_FLOPS_BUDGET_ENV: "3e14", DEPRECATED_SATURATION_FLOPS_ENV: "1e12"}
    assert configured_step_flops_budget(both) == 3e14  # the setting wins over the old name
    with pytest.warns(FutureWarning, match=f"{DEPRECATED_SATURATION_FLOPS_ENV} is deprecated: set {STEP_FLOPS_BUDGET_ENV}"):
        assert configured_step_flops_budget({DEPRECATED_SATURATION_FLOPS_ENV: "1e12"}) == 1e12


@pytest.mark.parametrize("value, message", [
    ("lots", "step_flops_budget must be a number of FLOPs, got 'lots' (SOURCE)"),
    ("-1", "step_flops_budget must be positive, got '-1' (SOURCE)"),
    ("0", "step_flops_budget must be positive, got '0' (SOURCE)"),
    ("nan", "step_flops_budget must be positive, got 'nan' (SOURCE)"),
    (None, "step_flops_budget must be a number of FLOPs, got None (SOURCE)"),
])
def test_a_bad_budget_is_one_line_naming_where_it_was_set(value, message):
    with pytest.raises(ValueError) as raised:
        parse_step_flops_budget(value, "SOURCE")
    assert str(raised.value) == message


def test_planned_switch_point_says_why_it_is_0_where_no_plan_applies():
    from zeroprefill.common.layouts import planned_switch_point

    tokens, source = planned_switch_point(lambda: (SPEC, 2048, "fp8"), "NVIDIA H200", 4)
    assert tokens == switch_point_on_gpus(SPEC, "NVIDIA H200", 4, 2048, "fp8") > 0 and source.startswith("planner")
    assert planned_switch_point(lambda: (SPEC, 2048, "bf16"), "NVIDIA H200", 1) == (0, "one rank")
    assert planned_switch_point(lambda: (SPEC, 2048, "bf16"), None, 4) == (0, "no shipped hardware profile for this device")
    assert planned_switch_point(lambda: (SPEC, 2048, "bf16"), "NVIDIA A100-SXM4-80GB", 4)[0] == 0
    tokens, source = planned_switch_point(lambda: (SPEC, 2048, "bf16"), "NVIDIA H200", 3)  # no shipped 3-GPU profile
    assert tokens == 0 and source.startswith("no plan")
