"""AsyncEP inside SGLang's ``FusedMoE``: tokens stay on their rank, expert weights stream in.

Where SGLang's MoE layer is extended (each box names the SGLang object and what we do to it)::

    [TopK]                    SGLang's own routing (the model's rule: softmax/sigmoid,
                              grouped top-k, correction bias) -> global expert ids
    [StandardDispatcher]      chosen by SGLang's ``create_moe_dispatcher`` for
                              moe_a2a_backend=none: moves no tokens; after set-up its EP view is
                              collapsed (as DWDP's ``bind_full_expert_weights`` does) so ids stay
                              global
    [FusedMoE.run_moe_core]   AROUND hook: AsyncEPMoE.forward_routed on this rank's tokens
                              (streamer.acquire(l) -> all experts -> streamer.release(l))
    [combine]                 StandardDispatcher.combine: identity

and at model level the helpers the decoder layers ask (``is_moe_input_scattered_across_dp_ranks()``
and ``post_experts_output_is_complete()``, or their forerunners in older releases:
:func:`sglang_zeroprefill.compat.moe_input_stays_local_targets`,
:func:`~sglang_zeroprefill.compat.experts_output_complete_target`) answer ``True`` (AROUND
hooks), so the decoder layers neither gather tokens over attention DP before the MoE nor
all-reduce after it.

Weights: ``FusedMoE`` under ``--ep-size N`` already loads only this rank's ``E / N`` experts
(``w13_weight [E/N, 2I, H]`` gate rows then up rows, ``w2_weight [E/N, H, I]``), which is
exactly a linear :class:`~zeroprefill.common.expert_sharding.ExpertShardLayout` shard. After
the model is loaded (``ModelRunner.maybe_init_dwdp``, DWDP's own set-up point, AFTER hook),
:func:`setup_asyncep` hands every MoE layer's shard to one
:class:`~zeroprefill.common.streamer.ExpertWeightStreamer` per rank, whose eager gathers every
CUDA-graph capture and replay then waits for (:mod:`sglang_zeroprefill.cuda_graphs`). On one
GPU (``--ep-size 1``) the shard is every expert and nothing is gathered from peers.

Quantization: unquantized experts, and block-FP8 ones as Qwen3-*-FP8 ship them (SGLang's
``Fp8MoEMethod`` with ``weight_block_size`` [128, 128]: float8_e4m3fn ``w13_weight`` /
``w2_weight`` and float32 ``w13_weight_scale_inv [E/N, 2I/128, H/128]`` /
``w2_weight_scale_inv [E/N, H/128, I/128]``, dynamic activation scales). The scales travel
with the weights as ``w13_scale`` / ``w2_scale``, the names the core's kernels take. SGLang's
``process_weights_after_loading`` leaves that layout as loaded on CUDA unless DeepGEMM runs the
experts on a GPU that wants UE8M0 scales (the DeepGEMM runner is refused at resolution), and
converts it on ROCm (e4m3fnuz, aiter shuffles) and under its CPU engine (AMX packing):
:func:`expert_shards` checks the layout after loading and refuses the rest in one line. Every
other scheme is refused at construction (:func:`unsupported_quantization`). The router
(``mlp.gate``) stays SGLang's (Qwen3-MoE builds it unquantized) and runs before our hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sglang_zeroprefill.args import SUPPORTED_EXPERTS, asyncep_enabled
from sglang_zeroprefill.compat import is_draft_layer, pass_max_tokens
from sglang_zeroprefill.cuda_graphs import order_graph_launches_after, stop_ordering_graph_launches_after
from zeroprefill.common.asyncep_model import AsyncEPConfig, AsyncEPConfigError, AsyncEPModel, build_asyncep_model
from zeroprefill.common.asyncep_moe import AsyncEPMoE
from zeroprefill.common.block_fp8 import FP8_DTYPE, block_scale_shape, expert_format
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.model_spec import FP8_WEIGHT_BLOCK

logger = logging.getLogger(__name__)

#: Attribute set on each ``FusedMoE`` served by AsyncEP.
_BINDING_ATTR = "_zeroprefill_asyncep"


@dataclass
class AsyncEPBinding:
    """What :func:`setup_asyncep` built for one model on one rank: the model and its FusedMoEs."""

    model: AsyncEPModel
    fused_moe_layers: list[Any]  # SGLang FusedMoE modules, in execution order

    def close(self) -> None:
        stop_ordering_graph_launches_after(self.model.streamer)
        self.model.close()


def _layer_name(layer: Any) -> str:
    return getattr(layer, "layer_name", "") or f"layer {layer.layer_id}"


def is_block_fp8(quant_method: Any) -> bool:
    """Whether a ``FusedMoE``'s method stores block-FP8 experts AsyncEP serves."""
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    return type(quant_method) is Fp8MoEMethod and unsupported_quantization(quant_method) is None


def unsupported_quantization(quant_method: Any) -> str | None:
    """What AsyncEP cannot serve about a ``FusedMoE``'s experts, in words; None where it serves them.

    SGLang's ``Fp8MoEMethod`` also holds per-tensor FP8 (no ``weight_block_size``: per-tensor
    scales, or bf16 quantized online by ``--quantization fp8``), MXFP8 (1x32 blocks) and FP4
    experts; subclasses and wrappers of it (MXFP4 re-quantization, NPU methods) other formats.
    """
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    if isinstance(quant_method, UnquantizedFusedMoEMethod):
        return None
    if type(quant_method) is not Fp8MoEMethod:
        return f"quantized experts ({type(quant_method).__name__})"
    if quant_method.is_fp4_expert:
        return "FP4 experts (Fp8MoEMethod)"
    if quant_method.use_mxfp8:
        return "MXFP8 experts (Fp8MoEMethod, 1x32 UE8M0 scales)"
    block = quant_method.weight_block_size
    if block is None:
        return ("per-tensor FP8 experts (Fp8MoEMethod without weight_block_size: per-tensor scales, or "
                "quantized online by --quantization fp8)")
    if list(block) != [FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK]:
        return f"block-FP8 experts in {block[0]}x{block[1]} blocks (Fp8MoEMethod)"
    return None


def check_fused_moe(layer: Any) -> None:
    """Reject a ``FusedMoE`` configuration the AsyncEP path does not compute."""
    config = layer.moe_runner_config
    quantization = unsupported_quantization(layer.quant_method)
    problems = [
        (quantization is not None, f"{quantization}; AsyncEP serves {SUPPORTED_EXPERTS}"),
        (config.activation != "silu" or not config.is_gated,
         f"activation {config.activation!r} (gated={config.is_gated}); AsyncEP kernels are SiLU-gated"),
        (layer.with_bias, "expert biases"),
        (config.apply_router_weight_on_input, "apply_router_weight_on_input"),
        (layer.num_fused_shared_experts > 0,
         "shared experts fused into the routed experts; pass --disable-shared-experts-fusion"),
        (layer.moe_tp_size != 1, f"MoE tensor parallelism {layer.moe_tp_size}; use --ep-size equal to --tp-size"),
    ]
    for bad, what in problems:
        if bad:
            raise AsyncEPConfigError(f"--moe-a2a-backend asyncep: MoE layer {_layer_name(layer)} has {what}")


def expert_shards(layer: Any) -> dict[str, torch.Tensor]:
    """A loaded ``FusedMoE``'s shard as the core streams it: ``w13``, ``w2`` and, for block FP8,
    their scales as ``w13_scale`` / ``w2_scale``.

    Raises :class:`AsyncEPConfigError` where SGLang's ``process_weights_after_loading`` left the
    experts in a layout other than the checkpoint's, which the kernels would misread.
    """
    shards = {"w13": layer.w13_weight.data, "w2": layer.w2_weight.data}
    if is_block_fp8(layer.quant_method):
        shards |= {"w13_scale": layer.w13_weight_scale_inv.data, "w2_scale": layer.w2_weight_scale_inv.data}
    problem = layout_problem_after_loading(layer, shards)
    if problem is not None:
        raise AsyncEPConfigError(f"--moe-a2a-backend asyncep: MoE layer {_layer_name(layer)} has {problem}")
    return shards


def layout_problem_after_loading(layer: Any, shards: dict[str, torch.Tensor]) -> str | None:
    """How SGLang changed the loaded experts away from the checkpoint's layout, with the setting
    that did it; None where it left them as loaded."""
    if getattr(layer, "use_intel_amx_backend", False):
        return ("experts packed for AMX by SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1); AsyncEP reads "
                "them unpacked: serve on a GPU")
    if "w13_scale" not in shards:
        return None
    if torch.version.hip is not None:
        return ("block-FP8 experts on ROCm, which SGLang rescales to float8_e4m3fnuz (and shuffles for aiter "
                "under SGLANG_USE_AITER); AsyncEP's kernels read float8_e4m3fn: serve a bf16 checkpoint there")
    if any(getattr(scale, "format_ue8m0", False) for scale in (layer.w13_weight_scale_inv, layer.w2_weight_scale_inv)):
        return ("block scales requantized to UE8M0 for DeepGEMM (SGLang does so where DeepGEMM runs the "
                "experts on Blackwell); set SGLANG_ENABLE_JIT_DEEPGEMM=0")
    num_experts, two_inter, hidden = shards["w13"].shape
    expected = {
        "w13": ((num_experts, two_inter, hidden), FP8_DTYPE),
        "w2": ((num_experts, hidden, two_inter // 2), FP8_DTYPE),
        "w13_scale": ((num_experts, *block_scale_shape(two_inter, hidden)), torch.float32),
        "w2_scale": ((num_experts, *block_scale_shape(hidden, two_inter // 2)), torch.float32),
    }
    found = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in shards.items()}
    if found != expected:
        return (f"block-FP8 experts in a layout SGLang prepared for another MoE kernel: {found}, where AsyncEP "
                f"reads {expected}")
    return None


def after_fused_moe_init(result: Any, layer: Any, *args: Any, **kwargs: Any) -> Any:
    """``AFTER`` hook on ``FusedMoE.__init__``: fail at construction, not mid-forward."""
    if asyncep_enabled() and not is_draft_layer(layer):
        check_fused_moe(layer)
    return result


def setup_asyncep(
    model: torch.nn.Module,
    group: Any,
    config: AsyncEPConfig | None = None,
    experts_kernel: Callable[..., torch.Tensor] | None = None,
) -> AsyncEPBinding:
    """Give every ``FusedMoE`` of ``model`` to one weight streamer over ``group`` (the EP group).

    Call once, after the weights are loaded and on every rank of ``group`` (registration of
    the shards is collective for some transports). ``config``: ``AsyncEPConfig.from_env()``.
    """
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    layers = sorted((m for m in model.modules() if isinstance(m, FusedMoE) and not is_draft_layer(m)),
                    key=lambda m: m.layer_id)
    if not layers:
        raise AsyncEPConfigError(f"--moe-a2a-backend asyncep: {type(model).__name__} has no FusedMoE layers")
    for layer in layers:
        check_fused_moe(layer)
    num_experts = {layer.num_experts for layer in layers}
    if len(num_experts) != 1:
        raise AsyncEPConfigError(f"--moe-a2a-backend asyncep needs the same expert count in every MoE layer, got {sorted(num_experts)}")
    top_ks = {layer.top_k if layer.top_k is not None else layer.moe_runner_config.top_k for layer in layers}
    if len(top_ks) != 1:
        raise AsyncEPConfigError(f"--moe-a2a-backend asyncep needs the same top-k in every MoE layer, got {sorted(top_ks)}")
    world_size = layers[0].moe_ep_size
    layout = ExpertShardLayout(num_experts.pop(), world_size, placement="linear")
    if layers[0].num_local_experts != layout.capacity:
        raise AsyncEPConfigError(
            f"--moe-a2a-backend asyncep: FusedMoE holds {layers[0].num_local_experts} experts per rank, "
            f"the shard layout expects {layout.capacity}"
        )
    config = config or AsyncEPConfig.from_env()
    shards = [expert_shards(layer) for layer in layers]
    formats = sorted({expert_format(shard) for shard in shards})
    if len(formats) != 1:
        raise AsyncEPConfigError(
            f"--moe-a2a-backend asyncep streams MoE layers of one format, this model's store experts as "
            f"{' and as '.join(formats)} (the checkpoint leaves some MoE layers unquantized)"
        )
    expert_dtype = "fp8" if "w13_scale" in shards[0] else "bf16"
    device = layers[0].w13_weight.device
    # Routing stays SGLang's (TopK runs before run_moe_core); only streaming and experts are ours.
    asyncep = build_asyncep_model(shards, layout, config, top_k=top_ks.pop(), renormalize=True, group=group,
                                  device=device, experts_kernel=experts_kernel,
                                  switch_tokens=planned_switch_tokens(model, world_size, device, config, expert_dtype))
    for layer, moe in zip(layers, asyncep.layers):
        _collapse_ep_view(layer)
        setattr(layer, _BINDING_ATTR, moe)
    streamer = asyncep.streamer
    order_graph_launches_after(streamer)
    logger.info(
        "AsyncEP: %d MoE layers of %s experts over %d ranks, own experts read in place (transport %s, prefetch "
        "depth %d, %.2f GB of gather buffers); passes below %d tokens per rank move tokens instead of weights",
        len(layers), formats[0], world_size, streamer.transport.name, streamer.prefetch_depth,
        streamer.gather_buffer_bytes / 1e9, asyncep.switch_tokens,
    )
    return AsyncEPBinding(asyncep, layers)


def planned_switch_tokens(model: torch.nn.Module, num_ranks: int, device: torch.device, config: AsyncEPConfig,
                          expert_dtype: str) -> int:
    """The planner's switch point for this deployment (``expert_dtype`` experts, ``"bf16"`` or
    ``"fp8"``, on ``num_ranks`` GPUs of this kind; :func:`zeroprefill.common.layouts.planned_switch_point`,
    0 where it has none). ``ZEROPREFILL_ASYNCEP_SWITCH_TOKENS`` (``config.switch_tokens``) overrides
    it in the builder."""
    from zeroprefill.common.layouts import planned_switch_point
    from zeroprefill.common.model_spec import MoEModelSpec
    from zeroprefill.common.saturation import DEFAULT_CONTEXT_TOKENS

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    tokens, source = planned_switch_point(
        lambda: (MoEModelSpec.from_hf_config(model.config.to_dict()), DEFAULT_CONTEXT_TOKENS, expert_dtype),
        device_name, num_ranks, config.transport)
    logger.info("AsyncEP: switch point %d tokens per rank (%s)", tokens, source)
    return tokens


def _collapse_ep_view(layer: Any) -> None:
    """Make the layer and its dispatcher see one rank owning every expert (global ids)."""
    layer.moe_ep_size = 1
    layer.moe_ep_rank = 0
    dispatcher = layer.dispatcher
    dispatcher.moe_ep_size = 1
    dispatcher.moe_ep_rank = 0
    dispatcher.local_expert_mapping = None
    dispatcher.expert_mask_gpu = None


def run_moe_core_around(original: Callable[..., Any], layer: Any, dispatch_output: Any, *args: Any, **kwargs: Any) -> Any:
    """``AROUND`` hook on ``FusedMoE.run_moe_core``: AsyncEP layers compute here."""
    moe: AsyncEPMoE | None = getattr(layer, _BINDING_ATTR, None)
    if moe is None:
        return original(layer, dispatch_output, *args, **kwargs)
    return asyncep_run_moe_core(layer, moe, dispatch_output)


def asyncep_run_moe_core(layer: Any, moe: AsyncEPMoE, dispatch_output: Any) -> Any:
    """All experts on this rank's tokens; an empty batch still joins the layer's gather."""
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput
    from sglang.srt.layers.moe.topk import TopKOutputChecker

    topk_output = dispatch_output.topk_output
    if not TopKOutputChecker.format_is_standard(topk_output):
        raise AsyncEPConfigError(
            f"--moe-a2a-backend asyncep needs SGLang's standard top-k output, got {type(topk_output).__name__}"
        )
    hidden_states = dispatch_output.hidden_states
    topk_weights = topk_output.topk_weights.float()
    # SGLang marks DP pad rows with id -1; the AsyncEP layer skips such slots.
    topk_ids = topk_output.topk_ids.long()
    scaling = layer.moe_runner_config.routed_scaling_factor
    if scaling is not None and not layer.should_fuse_routed_scaling_factor_in_topk:
        topk_weights = topk_weights * scaling
    out = moe.forward_routed(hidden_states, topk_weights, topk_ids, pass_max_tokens())
    return StandardCombineInput(hidden_states=out)


def always_true_when_asyncep(original: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
    """``AROUND`` hook for the model-level MoE helpers (see the module docstring)."""
    return True if asyncep_enabled() else original(*args, **kwargs)


def after_maybe_init_dwdp(result: Any, model_runner: Any, *args: Any, **kwargs: Any) -> Any:
    """``AFTER`` hook on ``ModelRunner.maybe_init_dwdp``: DWDP's set-up point is ours too."""
    if asyncep_enabled() and not model_runner.is_draft_worker:
        from sglang.srt.runtime_context import get_parallel

        model_runner.zeroprefill_asyncep = setup_asyncep(model_runner.model, get_parallel().moe_ep_group.device_group)
    return result
