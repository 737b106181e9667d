"""Planner: gather time, saturation threshold (FLOPs and tokens), memory plans with the
arithmetic, step predictions, multi-node, and the `zeroprefill plan` CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from zeroprefill.cli import main
from zeroprefill.common.cost_model import layer_flops_at_context
from zeroprefill.common.hardware import shipped_profile
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.layouts import (LAYOUTS, alltoall_exchange_time_s, predict_step, remote_ranks_per_token,
                                       switch_point_tokens)
from zeroprefill.common.memory_plan import memory_plan
from zeroprefill.common.planner import make_plan
from zeroprefill.common.saturation import (
    Deployment,
    PlanError,
    effective_tflops,
    forward_flops_at_threshold,
    gather_time_s,
    light_load_pass_time_s,
    saturation_threshold_flops,
    saturation_threshold_tokens,
    step_flops_budget,
)
from zeroprefill.common.transport_choice import resolve_transport
from zeroprefill.plan import LAYOUT_COLUMN

CONFIGS = Path(__file__).resolve().parents[1] / "common" / "model_configs"
EXPERT_BF16 = 3 * 4096 * 1536 * 2  # one Qwen3-235B expert: 37,748,736 bytes
EXPERT_FP8 = 3 * 4096 * 1536 + (24 * 32 + 32 * 12) * 4  # 1 byte/weight + fp32 per 128x128 block
H200_BUDGET = int(0.9 * round(139.8 * 2**30))  # 90% of the H200's 139.8 GiB = 135.1 GB


@pytest.fixture(scope="module")
def q235() -> MoEModelSpec:
    return MoEModelSpec.from_pretrained(CONFIGS / "qwen3-235b-a22b.json")


@pytest.fixture(scope="module")
def h200x4():
    return shipped_profile("h200", 4)


def nccl(spec: MoEModelSpec, profile, num_gpus: int, dtype: str, **knobs) -> Deployment:
    """The deployments the hand-computed numbers below were worked out for: NCCL gathers."""
    return Deployment(spec, profile, num_gpus, dtype, "nccl", **knobs)


def test_gather_time_and_threshold_qwen3_235b_bf16_4xh200(q235, h200x4):
    # W = 128 experts * 37,748,736 B = 4.83 GB; each rank sends W/4, receives 3 W/4 at 339 GB/s.
    t_g = 32 * EXPERT_BF16 * 3 / 339e9
    assert gather_time_s(nccl(q235, h200x4, 4, "bf16")) == pytest.approx(t_g)
    assert t_g == pytest.approx(10.69e-3, rel=1e-3)  # docs/design.md: ~10.7 ms
    threshold = t_g * 709e12 / 1.12  # R_eff = 709 / (1 + 12%) TFLOP/s
    assert saturation_threshold_flops(nccl(q235, h200x4, 4, "bf16")) == pytest.approx(threshold)
    assert saturation_threshold_flops(nccl(q235, h200x4, 1, "bf16")) == 0.0


def test_threshold_in_tokens_falls_with_context(q235, h200x4):
    threshold = saturation_threshold_flops(nccl(q235, h200x4, 4, "bf16"))
    tokens = {c: saturation_threshold_tokens(nccl(q235, h200x4, 4, "bf16"), c) for c in (512, 4096, 32768)}
    assert tokens[512] > tokens[4096] > tokens[32768]
    # Short context: ~15K tokens per GPU (docs/design.md: "~16K tokens ... at short context");
    # per token 2 * 222,822,400 + 32,768 * 513 / 2 = 454,049,792 FLOPs per layer.
    assert tokens[512] == pytest.approx(threshold / 454_049_792, abs=1)
    for context, count in tokens.items():  # smallest batch: one token fewer falls short
        assert layer_flops_at_context(q235, 0, count, context).total >= threshold
        assert layer_flops_at_context(q235, 0, count - 1, context).total < threshold
    # Every layer is MoE: a forward at the threshold is 94 threshold layers, whatever the context.
    for context in tokens:
        forward = forward_flops_at_threshold(nccl(q235, h200x4, 4, "bf16"), context)
        assert forward == pytest.approx(94 * threshold, rel=1e-3)
    budget = step_flops_budget(nccl(q235, h200x4, 4, "bf16"), 4096, headroom=1.25)
    assert budget == pytest.approx(1.25 * forward_flops_at_threshold(nccl(q235, h200x4, 4, "bf16"), 4096))
    with pytest.raises(PlanError, match="headroom"):
        step_flops_budget(nccl(q235, h200x4, 4, "bf16"), 4096, headroom=0.5)


def test_fp8_weights_and_compute_keep_the_threshold_in_tokens_close(q235, h200x4):
    # Half the bytes, 1299/709 the rate, and the smaller (604 MB) shard gathers a little slower
    # than the 1.2 GB bf16 one (interpolated 326..339 GB/s): 0.93x the tokens.
    bf16 = saturation_threshold_tokens(nccl(q235, h200x4, 4, "bf16"), 4096)
    fp8 = saturation_threshold_tokens(nccl(q235, h200x4, 4, "fp8"), 4096)
    slower_wire = 339 / h200x4.gather().bus_gbps(32 * EXPERT_FP8)
    expected = 1299 / 709 * EXPERT_FP8 / EXPERT_BF16 * slower_wire
    assert fp8 / bf16 == pytest.approx(expected, rel=2e-3)
    assert 0.9 < fp8 / bf16 < 0.95


def test_memory_qwen3_235b_bf16_on_4xh200_does_not_fit_fp8_does(q235, h200x4):
    bf16 = memory_plan(nccl(q235, h200x4, 4, "bf16"), "asyncep", tokens_per_gpu=16384, context_tokens=4096)
    # dense: 7,997,238,784 non-expert params x 2 B = 16.0 GB (embeddings + head 2.5 GB of it)
    assert bf16.dense_weight_bytes == 7_997_238_784 * 2
    # experts: 94 layers x 32 experts per rank x 37.7 MB = 113.5 GB
    assert bf16.expert_weight_bytes == 94 * 32 * EXPERT_BF16 == 113_548_197_888
    # gather buffers: (d + 1) = 2 full layers of 128 experts = 9.7 GB
    assert bf16.gather_buffer_bytes == 2 * 128 * EXPERT_BF16
    # activations: 16384 tokens x 2 B x (4 x 4096 residual + 9216 qkv + 8 x (2 x 4096 + 3 x 1536))
    assert bf16.activation_bytes == 16384 * 2 * (4 * 4096 + 9216 + 8 * (2 * 4096 + 3 * 1536))
    # KV: 16384 tokens x 94 layers x 2 (k, v) x 4 heads x 128 x 2 B = 3.15 GB
    assert bf16.kv_cache_bytes == 16384 * 94 * 2 * 4 * 128 * 2
    # 16.0 + 113.5 + 9.7 + 4.2 + 3.2 = 146.6 GB > 135.1 GB (90% of 139.8 GiB): does not fit;
    # weights and buffers alone (139.2 GB) already exceed the budget.
    assert bf16.total_bytes == 146_554_772_480 and bf16.budget_bytes == H200_BUDGET
    assert not bf16.fits
    assert bf16.dense_weight_bytes + bf16.expert_weight_bytes + bf16.gather_buffer_bytes > H200_BUDGET

    fp8 = memory_plan(nccl(q235, h200x4, 4, "fp8"), "asyncep", tokens_per_gpu=16384, context_tokens=4096)
    # FP8 linear weights: 94 x 71,303,168 attention params at 1 B + a 4 B scale per 128x128
    # block; embeddings, head, router and norms (1,294,740,992 params) stay bf16.
    assert fp8.dense_weight_bytes == 94 * 71_303_168 + 4 * 94 * 71_303_168 // 16384 + 1_294_740_992 * 2
    assert fp8.expert_weight_bytes == 94 * 32 * EXPERT_FP8
    assert fp8.gather_buffer_bytes == 2 * 128 * EXPERT_FP8
    # 9.3 + 56.8 + 4.8 + 4.2 + 3.2 = 78.3 GB (about 75 GB per GPU): fits with room.
    assert fp8.total_bytes == 78_263_014_400 and fp8.fits


def test_kv_capacity_is_what_the_budget_holds_beside_weights_buffers_and_activations(q235, h200x4):
    plan = memory_plan(Deployment(q235, h200x4, 4, "fp8", transport="copy_engine"), "asyncep", 6000, 4096)
    held = plan.dense_weight_bytes + plan.expert_weight_bytes + plan.gather_buffer_bytes + plan.activation_bytes
    assert plan.kv_capacity_tokens == (plan.budget_bytes - held) // (94 * 2 * 4 * 128 * 2)
    one_gpu = memory_plan(Deployment(q235, h200x4, 1, "bf16"), "asyncep", 6000, 4096)
    assert one_gpu.kv_capacity_tokens == 0  # 235B in bf16 does not fit one GPU at all


def test_gather_buffers_hold_only_the_other_ranks_experts_over_the_copy_engine(q235, h200x4):
    copy = memory_plan(Deployment(q235, h200x4, 4, "fp8", transport="copy_engine"), "asyncep", 6000, 4096)
    assert copy.gather_buffer_bytes == 2 * 3 * 32 * EXPERT_FP8  # 2 slots x 3 other ranks x 32 experts
    nccl_plan = memory_plan(nccl(q235, h200x4, 4, "fp8"), "asyncep", 6000, 4096)
    assert nccl_plan.gather_buffer_bytes == 2 * 4 * 32 * EXPERT_FP8  # AllGather writes the local part too
    one = memory_plan(Deployment(q235, h200x4, 1, "fp8"), "asyncep", 6000, 4096)
    assert one.gather_buffer_bytes == 0


def test_memory_grows_with_prefetch_depth_and_kv_holds_whole_prompts(q235, h200x4):
    d1 = memory_plan(nccl(q235, h200x4, 4, "fp8"), "asyncep", 6000, 32768)
    d2 = memory_plan(nccl(q235, h200x4, 4, "fp8", prefetch_depth=2), "asyncep", 6000, 32768)
    assert d2.gather_buffer_bytes - d1.gather_buffer_bytes == 128 * EXPERT_FP8
    assert d1.kv_cache_bytes == 32768 * 94 * 2 * 4 * 128 * 2  # one whole 32K prompt's keys
    ep = memory_plan(nccl(q235, h200x4, 4, "fp8"), "alltoall_ep", 6000, 32768)
    assert ep.gather_buffer_bytes == 0 and ep.expert_weight_bytes == d1.expert_weight_bytes
    tp = memory_plan(nccl(q235, h200x4, 4, "fp8"), "tp", 6000, 32768)
    assert tp.expert_weight_bytes == -(-94 * 128 * EXPERT_FP8 // 4)


def test_asyncep_step_is_comm_bound_below_threshold_and_taxed_above(q235, h200x4):
    t_g = gather_time_s(nccl(q235, h200x4, 4, "bf16"))
    tokens = saturation_threshold_tokens(nccl(q235, h200x4, 4, "bf16"), 4096)
    below = predict_step(nccl(q235, h200x4, 4, "bf16"), "asyncep", tokens // 2, 4096)
    assert below.step_time_s == pytest.approx(94 * t_g)  # every layer waits for its gather
    at = predict_step(nccl(q235, h200x4, 4, "bf16"), "asyncep", tokens, 4096)
    assert at.step_time_s == pytest.approx(94 * t_g, rel=1e-3)
    assert at.exposed_fraction == pytest.approx(1 - 1 / 1.12, abs=1e-3)  # only the overlap tax
    above = predict_step(nccl(q235, h200x4, 4, "bf16"), "asyncep", 4 * tokens, 4096)
    assert above.exposed_fraction < at.exposed_fraction / 3
    assert 0 < at.mfu < 709 / 989


def test_alltoall_ep_sends_each_token_once_per_remote_rank(q235, h200x4):
    deployment = nccl(q235, h200x4, 4, "bf16")
    tokens = 8192
    # 3 other ranks, each missing all 8 of a token's experts with probability C(96, 8) / C(128, 8).
    remote = 3 * (1 - math.comb(96, 8) / math.comb(128, 8))
    assert remote_ranks_per_token(128, 8, 4) == pytest.approx(remote)
    assert remote_ranks_per_token(128, 8, 1) == 0.0
    assert 2.7 < remote < 3 and remote_ranks_per_token(128, 8, 8) < 8 * 7 / 8  # fewer rows than pairs
    # Dispatch rows: the token in bf16 + 8 routing slots of 8 B; combine rows: bf16; at 312 GB/s.
    exchange = tokens * remote * (4096 * 2 + 8 * 8 + 4096 * 2) / 312e9
    assert alltoall_exchange_time_s(deployment, tokens) == pytest.approx(exchange)
    assert alltoall_exchange_time_s(deployment, tokens, remote_ranks=1.5) == pytest.approx(exchange * 1.5 / remote)
    ep = predict_step(deployment, "alltoall_ep", tokens, 4096)
    assert ep.step_time_s == pytest.approx(ep.compute_time_s + 94 * exchange, rel=1e-6)


def test_two_batch_overlap_hides_the_exchange_and_skew_slows_only_ep(q235, h200x4):
    deployment = nccl(q235, h200x4, 4, "bf16")
    ep = predict_step(deployment, "alltoall_ep", 16384, 4096)
    tbo = predict_step(deployment, "alltoall_ep_tbo", 16384, 4096)
    # Compute-bound at 16K tokens: the exchange is hidden but slows the GEMMs under it.
    exchange = alltoall_exchange_time_s(deployment, 16384)
    rate = h200x4.compute_tflops("bf16") * 1e12
    tax = exchange * (1 - 1 / (1 + h200x4.gather("nccl").gemm_slowdown.value))
    assert tbo.step_time_s == pytest.approx(ep.compute_time_s + 94 * tax, rel=1e-6)
    assert tbo.step_time_s < ep.step_time_s
    skewed = predict_step(deployment, "alltoall_ep_tbo", 16384, 4096, rank_imbalance=1.2)
    routed = sum(layer_flops_at_context(q235, layer, 16384, 4096).routed_experts for layer in range(94))
    assert skewed.step_time_s == pytest.approx(tbo.step_time_s + 0.2 * routed / rate, rel=1e-6)
    for layout in ("asyncep", "tp"):
        assert (predict_step(deployment, layout, 16384, 4096, rank_imbalance=1.2)
                == predict_step(deployment, layout, 16384, 4096))
    with pytest.raises(PlanError, match="at least 1.0"):
        predict_step(deployment, "alltoall_ep", 16384, 4096, rank_imbalance=0.9)


@pytest.mark.parametrize("transport", ["nccl", "copy_engine"])
def test_switch_point_is_the_batch_where_ep_stops_being_faster(q235, h200x4, transport):
    deployment = nccl(q235, h200x4, 4, "bf16") if transport == "nccl" else Deployment(q235, h200x4, 4, "bf16", transport)

    def ep_lead_s(tokens: int) -> float:
        asyncep = predict_step(deployment, "asyncep", tokens, 4096).step_time_s
        return asyncep - predict_step(deployment, "alltoall_ep", tokens, 4096).step_time_s

    switch = switch_point_tokens(deployment, 4096)
    assert ep_lead_s(switch - 1) > 0 >= ep_lead_s(switch)
    assert ep_lead_s(1) > 0 >= ep_lead_s(4 * switch)
    # Here EP wins only below AsyncEP's threshold, where a pass waits on its gathers.
    assert 0.5 * saturation_threshold_tokens(deployment, 4096) < switch < saturation_threshold_tokens(deployment, 4096)
    # A skewed EP (its busiest rank runs 1.2x the mean) gives up its lead earlier.
    assert switch_point_tokens(deployment, 4096, rank_imbalance=1.2) < switch


def test_ep_never_wins_on_one_gpu(q235):
    assert switch_point_tokens(Deployment(q235, shipped_profile("h200", 1), 1), 4096) is None


def test_plan_suggests_what_fits_and_multinode_recommends_replicas(q235, h200x4):
    plan = make_plan(nccl(q235, h200x4, 4, "bf16"), (512, 4096))
    assert not plan.fits["asyncep"]
    assert any(s.startswith("--dtype fp8") for s in plan.suggestions)
    assert any(s.startswith("--gpus 8") for s in plan.suggestions)
    fp8 = make_plan(nccl(q235, h200x4, 4, "fp8"), (512, 4096), deploy_nodes=2)
    assert fp8.fits["asyncep"] and not fp8.suggestions
    multi = fp8.multinode
    # 4 of a node's 8 NICs (8 x 400 Gb/s = 400 GB/s) carry the cross-node ring: 200 GB/s < 339.
    assert multi.spanning_bus_gbps == 200
    assert multi.threshold_ratio > 1.5
    assert "replicas behind the zeroprefill router" in multi.recommendation
    assert fp8.recommendation == multi.recommendation
    # The copy engine reads peer memory inside a node: never across nodes.
    with pytest.raises(PlanError, match="inside one node"):
        gather_time_s(Deployment(q235, h200x4, 8, "fp8", "copy_engine", nodes=2))
    copy = make_plan(Deployment(q235, h200x4, 4, "fp8", "copy_engine"), (4096,), deploy_nodes=2)
    assert copy.multinode.threshold_ratio == pytest.approx(multi.threshold_ratio)


def test_light_load_pass_is_every_moe_layer_gathered_once(q235, h200x4):
    deployment = nccl(q235, h200x4, 4, "bf16")
    plan = make_plan(deployment, (512,))
    assert plan.light_load_pass_time_s == pytest.approx(94 * gather_time_s(deployment))
    assert light_load_pass_time_s(nccl(q235, h200x4, 1, "bf16")) == 0.0  # nothing gathered
    # FP8 experts stream half the bytes: half the floor.
    assert light_load_pass_time_s(nccl(q235, h200x4, 4, "fp8")) == pytest.approx(plan.light_load_pass_time_s / 2, rel=0.02)


def test_plan_takes_a_block_fp8_checkpoints_format_unless_told_otherwise(capsys):
    assert main(["plan", "--model", "qwen3-235b-a22b-fp8", "--gpus", "2", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["dtype"] == "fp8" and stored["assumed"]["dtype"] == "fp8"
    assert main(["plan", "--model", "qwen3-235b-a22b-fp8", "--gpus", "2", "--dtype", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bf16"
    assert main(["plan", "--model", "qwen3-235b-a22b", "--gpus", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bf16"


def test_plan_cli_table_and_json(capsys):
    assert main(["plan", "--model", "qwen3-235b-a22b", "--gpus", "4", "--gpu", "h200", "--dtype", "fp8",
                 "--context", "512,32768"]) == 0
    out = capsys.readouterr().out
    assert main(["plan", "--model", "qwen3-30b-a3b", "--gpus", "1"]) == 0
    assert "nothing is gathered" in capsys.readouterr().out
    for text in ("threshold F*", "AsyncEP", "AllToAll-EP", "TP", "Recommendation:", "32768", "streamed pass floor", "switch point"):
        assert text in out
    assert main(["plan", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--gpus", "2", "--json",
                 "--nodes", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_gpus"] == 2 and data["profile"] == "h200x2"
    assert [c["context_tokens"] for c in data["contexts"]] == [512, 4096, 32768]
    assert data["multinode"]["nodes"] == 2
    assert set(data["contexts"][0]["steps"]) == {"asyncep", "alltoall_ep", "alltoall_ep_tbo", "tp"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "no-such-model"], "neither a path nor a shipped config"),
        (["--model", "qwen3-30b-a3b", "--gpus", "3"], "no shipped h200 profile for 3 GPUs"),
        (["--model", "qwen3-30b-a3b", "--dtype", "fp4"], "unknown dtype 'fp4'"),
        (["--model", "qwen3-30b-a3b", "--context", "4k"], "--context '4k'"),
        (["--model", "qwen3-30b-a3b", "--gpu", "a100"], "no shipped profile for gpu 'a100'"),
        (["--model", "qwen3-30b-a3b", "--profile", "missing.json"], "no profile file"),
        (["--model", "qwen3-30b-a3b", "--transport", "ib"], "unknown transport 'ib'"),
        (["--model", "qwen3-30b-a3b", "--prefetch-depth", "0"], "--prefetch-depth must be >= 1, got 0"),
        (["--model", "qwen3-30b-a3b", "--memory-utilization", "1.5"], "--memory-utilization must be in (0, 1]"),
        (["--model", "qwen3-30b-a3b", "--nodes", "0"], "--nodes must be >= 1, got 0"),
    ],
)
def test_plan_cli_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_auto_transport_is_what_the_runtime_gathers_with(q235, h200x4):
    # make_transport("auto") on CUDA: the copy engine (torch >= 2.6 has symmetric memory);
    # the copy engine reads peers inside one node only, so a group spanning nodes uses NCCL.
    assert resolve_transport("auto") == "copy_engine"
    assert resolve_transport("auto", nodes=2) == "nccl"
    assert resolve_transport("nccl") == "nccl"
    auto = Deployment(q235, h200x4, 4, "bf16")
    assert auto.transport == "copy_engine"
    assert saturation_threshold_flops(auto) == saturation_threshold_flops(Deployment(q235, h200x4, 4, "bf16", "copy_engine"))
    assert saturation_threshold_flops(auto) != saturation_threshold_flops(nccl(q235, h200x4, 4, "bf16"))
    assert effective_tflops(auto) == pytest.approx(709 / 1.06)  # the copy engine's 6% GEMM slowdown
    assert effective_tflops(Deployment(q235, shipped_profile("h200", 1), 1)) == 709  # nothing gathered
    assert Deployment(q235, h200x4, 8, "bf16", nodes=2).transport == "nccl"
    with pytest.raises(PlanError, match="unknown transport 'ib'"):
        Deployment(q235, h200x4, 4, "bf16", "ib")


def test_plan_cli_uses_the_runtime_transport_and_says_what_it_assumed(capsys):
    assert main(["plan", "--model", "qwen3-30b-a3b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["transport"] == "copy_engine"
    assert data["assumed"] == {"gpus": 4, "gpu": "h200", "dtype": "bf16", "transport": "copy_engine"}
    assert main(["plan", "--model", "qwen3-30b-a3b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "Assumed (not given): --gpus 4, --gpu h200, --dtype bf16, --transport auto (copy_engine)"
    # Given flags are not listed; the defaults' values given explicitly are not assumptions.
    assert main(["plan", "--model", "qwen3-30b-a3b", "--gpus", "4", "--dtype", "bf16", "--transport", "nccl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "AllGather nccl" in lines[0] and lines[1] == "Assumed (not given): --gpu h200"
    assert main(["plan", "--model", "qwen3-30b-a3b", "--gpus", "2", "--gpu", "h100", "--dtype", "fp8",
                 "--transport", "auto"]) == 0
    assert not any(line.startswith("Assumed") for line in capsys.readouterr().out.splitlines())


def test_plan_tables_keep_their_columns_apart_on_a_tiny_model(tmp_path, capsys):
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 128,
        "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 512, "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    width = 2 + 8 + len(LAYOUTS) * LAYOUT_COLUMN
    rows = [line for line in lines if line[:10].strip().isdigit() and len(line) > 60]  # not the threshold table
    assert len(rows) == 9  # three contexts in the memory, KV-capacity and step tables
    for row in rows:
        assert len(row) == width, row
        cells = [row[10 + i * LAYOUT_COLUMN: 10 + (i + 1) * LAYOUT_COLUMN] for i in range(len(LAYOUTS))]
        assert all(cell.startswith("  ") for cell in cells), row  # never touching the cell before
    step_rows = rows[6:]
    assert all(" us |" in row and " 0 |" not in row for row in step_rows)  # microseconds, not "0 ms"


@pytest.mark.parametrize("transport, recommendation", [
    ("nccl", "TP (highest predicted throughput among layouts that fit); AsyncEP does not fit"),
    ("copy_engine", "no layout fits"),  # its larger threshold batch fits no layout
])
def test_plan_gives_the_what_would_fit_advice_once(capsys, transport, recommendation):
    assert main(["plan", "--model", "qwen3-235b-a22b", "--gpus", "4", "--transport", transport]) == 0
    out = capsys.readouterr().out
    assert "AsyncEP does not fit; what would:" in out
    assert out.count("--dtype fp8:") == 1 and out.count("--gpus 8:") == 1
    assert f"Recommendation: {recommendation}" in out
    if transport == "nccl":
        assert "Serve it with: vllm serve MODEL --tensor-parallel-size 4" in out


def test_every_plan_option_has_help_and_the_formatter_names_its_default_once():
    import argparse

    from zeroprefill import plan

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    assert not [a.dest for a in options if "default" in a.help]  # the formatter adds it, once
    text = parser.format_help()
    for shown in ("(default: 4)", "(default: h200)", "(default: bf16)", "(default: auto)", "(default: 0.9)"):
        assert shown in text


def test_an_ep_recommendation_says_its_prediction_is_a_best_case():
    plan = make_plan(Deployment.on_shipped_gpu(MoEModelSpec.from_pretrained(CONFIGS / "qwen3-30b-a3b.json"), "h200", 2),
                     (512, 4096, 32768))
    assert plan.recommendation.startswith("EP two-batch overlap")
    assert "a best case: balanced routing, the exchange fully hidden" in plan.recommendation
    assert plan.recommendation.endswith("--enable-dbo (SGLang: --enable-two-batch-overlap)")
