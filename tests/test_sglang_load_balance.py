"""``--load-balance-method zeroprefill``: decisions, inferred completions, SGLang's contracts."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import import_sglang  # noqa: E402

import_sglang()

from sglang.srt.managers.data_parallel_controller import DataParallelController  # noqa: E402
from sglang.srt.managers.load_snapshot import LoadSnapshot  # noqa: E402

from zeroprefill.common.cost_model import request_flops  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
from sglang_zeroprefill import load_balance  # noqa: E402
from sglang_zeroprefill.load_balance import ZeroPrefillLoadBalancer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-30b-a3b.json"
BLOCK = 16


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def spec() -> MoEModelSpec:
    return MoEModelSpec.from_pretrained(CONFIG)


def _balancer(spec: MoEModelSpec, saturation_flops: float = 0.0, num_ranks: int = 2):
    clock = Clock()
    return ZeroPrefillLoadBalancer(spec, num_ranks, BLOCK, saturation_flops, clock=clock), clock


def test_prefix_affinity_below_saturation(spec: MoEModelSpec) -> None:
    balancer, _ = _balancer(spec, saturation_flops=1e18)
    assert {balancer.choose("x", [7] * 64), balancer.choose("y", [8] * 64)} == {0, 1}  # an idle rank first
    shared = list(range(512))
    first = balancer.choose("a", shared + [1000])
    # Both ranks busy and below the threshold, where a rank finishes in one floor-bound forward
    # however much it has: the prefix hit wins over the rank with less outstanding work.
    assert balancer.choose("b", shared + [2000]) == first
    assert balancer.choose("c", shared + [3000]) == first


def test_earliest_finish_in_true_flops_above_saturation(spec: MoEModelSpec) -> None:
    balancer, _ = _balancer(spec, saturation_flops=0.0)
    shared = list(range(512))
    first = balancer.choose("a", shared + [1000])
    # No tie zone: the idle rank finishes a fresh 513-token prefill before the busy one
    # finishes its queued work plus the cached-prefix remainder.
    assert balancer.choose("b", shared + [2000]) == 1 - first
    # Load is true FLOPs: one 8K-token prompt outweighs many short ones by attention cost.
    assert request_flops(spec, 8192) > 16 * request_flops(spec, 512)


def test_long_prompt_counts_attention_flops_not_tokens(spec: MoEModelSpec) -> None:
    balancer, _ = _balancer(spec)
    long_rank = balancer.choose("long", list(range(10_000, 18_192)))  # 8192 tokens
    # 8 x 512 = 4096 tokens, far less work than the 8K prompt's attention: the other rank.
    for i in range(8):
        assert balancer.choose(f"s{i}", list(range(i * 1000, i * 1000 + 512))) == 1 - long_rank
    outstanding = balancer.outstanding_flops()
    assert outstanding[long_rank] == request_flops(spec, 8192)
    assert outstanding[1 - long_rank] == 8 * request_flops(spec, 512)
    assert request_flops(spec, 8192) > 16 * request_flops(spec, 512)


def test_snapshots_retire_finished_requests(spec: MoEModelSpec) -> None:
    balancer, clock = _balancer(spec, num_ranks=1)
    for i in range(3):
        balancer.choose(f"r{i}", list(range(i * 100, i * 100 + 64)))
    stale = LoadSnapshot(timestamp=clock.now_s - 1.0, dp_rank=0, num_running_reqs=0, num_waiting_reqs=0)
    assert balancer.observe([stale]) == 0  # taken before the requests were sent: proves nothing
    clock.now_s += 1.0
    snapshot = LoadSnapshot(timestamp=clock.now_s, dp_rank=0, num_running_reqs=1, num_waiting_reqs=0)
    assert balancer.observe([snapshot]) == 2  # 3 sent before it, 1 still in the system
    assert balancer.outstanding_flops() == [request_flops(spec, 64)]
    assert balancer.observe([snapshot]) == 0  # the same snapshot again changes nothing
    clock.now_s += 1.0
    assert balancer.observe([LoadSnapshot(timestamp=clock.now_s, dp_rank=0)]) == 1
    assert balancer.outstanding_flops() == [0]


def test_installed_dispatch_honours_routed_dp_rank_and_active_workers(
    spec: MoEModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr("sglang.srt.managers.io_struct.sock_send", lambda worker, req: sent.append((worker, req.rid)))
    monkeypatch.setattr(
        "sglang.srt.managers.data_parallel_controller.sock_send", lambda worker, req: sent.append((worker, req.rid))
    )
    controller = SimpleNamespace(
        workers=["w0", "w1", "w2"],
        _active_workers=[0, 2],  # rank 1 is inactive
        load_snapshot_reader=SimpleNamespace(read_all=lambda: []),
    )
    # SGLang's own external-routing contract, bound to our stand-in controller.
    controller.maybe_external_dp_rank_routing = types.MethodType(
        DataParallelController.maybe_external_dp_rank_routing, controller
    )
    balancer, _ = _balancer(spec, num_ranks=3)
    load_balance.install(controller, balancer)
    controller.dispatching(SimpleNamespace(rid="pinned", input_ids=[1, 2, 3], routed_dp_rank=2))
    for i in range(4):
        controller.dispatching(SimpleNamespace(rid=f"r{i}", input_ids=list(range(64)), routed_dp_rank=None))
    assert sent[0] == ("w2", "pinned")
    assert {worker for worker, _ in sent[1:]} <= {"w0", "w2"}
    assert balancer.policy.placement_of("pinned") is None  # externally routed: not ours to track


def test_embedding_requests_pay_no_lm_head_generate_requests_one_position(
    spec: MoEModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sglang.srt.managers.io_struct import TokenizedEmbeddingReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    monkeypatch.setattr("sglang.srt.managers.io_struct.sock_send", lambda worker, req: None)
    controller = SimpleNamespace(
        workers=["w0"], _active_workers=[0], load_snapshot_reader=SimpleNamespace(read_all=lambda: []),
        maybe_external_dp_rank_routing=lambda req: False,
    )
    balancer, _ = _balancer(spec, num_ranks=1)
    load_balance.install(controller, balancer)
    embedding = TokenizedEmbeddingReqInput(rid="e", input_text=None, input_ids=list(range(300)), mm_inputs=None,
                                           token_type_ids=None, sampling_params=SamplingParams())
    controller.dispatching(embedding)
    assert balancer.outstanding_flops() == [request_flops(spec, 300, head_tokens=0)]
    controller.dispatching(SimpleNamespace(rid="g", input_ids=list(range(1000, 1300)), routed_dp_rank=None))
    assert balancer.outstanding_flops() == [request_flops(spec, 300, head_tokens=0) + request_flops(spec, 300)]


@pytest.fixture
def asyncep(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang_zeroprefill.args import ASYNCEP_ENV

    monkeypatch.setenv(ASYNCEP_ENV, "1")
    monkeypatch.delenv(load_balance.SATURATION_ENV, raising=False)


def test_saturation_threshold_defaults_to_the_planners_on_a_known_gpu(spec: MoEModelSpec, asyncep, monkeypatch) -> None:
    from zeroprefill.common.saturation import Deployment, step_flops_budget

    planned = load_balance.planned_saturation_flops(spec, 4, "NVIDIA H200")
    deployment = Deployment.on_shipped_gpu(spec, "h200", 4)  # the runtime's transport: copy engine
    assert deployment.transport == "copy_engine"
    assert planned == step_flops_budget(deployment, 2048, headroom=1.0) > 0
    # The controller's balancer gets it when no environment value overrides it.
    view = SimpleNamespace(page_size=1, model_path=str(CONFIG))
    monkeypatch.setattr("sglang.srt.arg_groups.overrides.resolved_view", lambda server_args: view)
    monkeypatch.setattr(load_balance, "local_gpu_name", lambda: "NVIDIA H200")
    controller = SimpleNamespace(server_args=None, max_dp_size=4)
    balancer = load_balance.build_for_controller(controller)
    assert [r.saturation_flops for r in balancer.policy.replicas] == [planned] * 4
    monkeypatch.setenv(load_balance.SATURATION_ENV, "3e12")
    assert load_balance.build_for_controller(controller).policy.replicas[0].saturation_flops == 3e12


@pytest.mark.parametrize("num_ranks, device_name", [(4, None), (4, "NVIDIA A100-SXM4-80GB"), (1, "NVIDIA H200"),
                                                    (3, "NVIDIA H200")])
def test_saturation_threshold_is_0_without_a_profile(spec: MoEModelSpec, asyncep, num_ranks, device_name) -> None:
    assert load_balance.planned_saturation_flops(spec, num_ranks, device_name) == 0.0


def test_saturation_threshold_is_0_without_asyncep(spec: MoEModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang_zeroprefill.args import ASYNCEP_ENV

    monkeypatch.delenv(ASYNCEP_ENV, raising=False)  # nothing is gathered: no threshold
    assert load_balance.planned_saturation_flops(spec, 4, "NVIDIA H200") == 0.0


@pytest.mark.parametrize("transport", ["auto", "nccl", "copy_engine"])
def test_sglang_plans_the_budget_vllm_plans_for_the_same_deployment(spec: MoEModelSpec, asyncep, monkeypatch,
                                                                    transport) -> None:
    """Both plugins call one engine budget (tests/test_vllm_scheduler.py ties vLLM's scheduler to
    it for every transport and format): SGLang's per-rank threshold is that budget at headroom 1."""
    from zeroprefill.common.asyncep_model import TRANSPORT_ENV
    from zeroprefill.common.saturation import DEFAULT_STEP_HEADROOM, step_flops_budget_on_gpus

    monkeypatch.setenv(TRANSPORT_ENV, transport)
    vllm_budget = step_flops_budget_on_gpus(spec, "NVIDIA H200", 4, 2048, DEFAULT_STEP_HEADROOM, "bf16")
    sglang_threshold = load_balance.planned_saturation_flops(spec, 4, "NVIDIA H200")
    assert sglang_threshold * DEFAULT_STEP_HEADROOM == pytest.approx(vllm_budget, rel=1e-12)


def test_a_block_fp8_checkpoint_is_planned_at_fp8(asyncep, monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 experts stream half the bytes, so their threshold is lower than the same model's in bf16;
    the controller reads the format from the checkpoint's quantization_config."""
    from zeroprefill.common.saturation import step_flops_budget_on_gpus

    fp8_config = CONFIG.with_name("qwen3-30b-a3b-fp8.json")
    spec, expert_dtype = load_balance.model_for_planning(str(fp8_config))
    assert expert_dtype == "fp8" and load_balance.model_for_planning(str(CONFIG))[1] == "bf16"
    fp8 = load_balance.planned_saturation_flops(spec, 4, "NVIDIA H200", expert_dtype)
    assert fp8 == pytest.approx(step_flops_budget_on_gpus(spec, "NVIDIA H200", 4, 2048, 1.0, "fp8"), rel=1e-12)
    assert 0 < fp8 < load_balance.planned_saturation_flops(spec, 4, "NVIDIA H200", "bf16")
    view = SimpleNamespace(page_size=1, model_path=str(fp8_config))
    monkeypatch.setattr("sglang.srt.arg_groups.overrides.resolved_view", lambda server_args: view)
    monkeypatch.setattr(load_balance, "local_gpu_name", lambda: "NVIDIA H200")
    balancer = load_balance.build_for_controller(SimpleNamespace(server_args=None, max_dp_size=4))
    assert [r.saturation_flops for r in balancer.policy.replicas] == [fp8] * 4
