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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sglang_zeroprefill.args import asyncep_enabled
from sglang_zeroprefill.compat import is_draft_layer, pass_max_tokens
from sglang_zeroprefill.cuda_graphs import order_graph_launches_after, stop_ordering_graph_launches_after
from zeroprefill.common.asyncep_model import AsyncEPConfig, AsyncEPConfigError, AsyncEPModel, build_asyncep_model
from zeroprefill.common.asyncep_moe import AsyncEPMoE
from zeroprefill.common.expert_sharding import ExpertShardLayout

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


def check_fused_moe(layer: Any) -> None:
    """Reject a ``FusedMoE`` configuration the AsyncEP path does not compute."""
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    name = getattr(layer, "layer_name", "") or f"layer {layer.layer_id}"
    config = layer.moe_runner_config
    problems = [
        (not isinstance(layer.quant_method, UnquantizedFusedMoEMethod),
         f"quantized experts ({type(layer.quant_method).__name__}); serve an unquantized (bf16) checkpoint"),
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
            raise AsyncEPConfigError(f"--moe-a2a-backend asyncep: MoE layer {name} has {what}")


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
    shards = [{"w13": layer.w13_weight.data, "w2": layer.w2_weight.data} for layer in layers]
    device = layers[0].w13_weight.device
    # Routing stays SGLang's (TopK runs before run_moe_core); only streaming and experts are ours.
    asyncep = build_asyncep_model(shards, layout, config, top_k=top_ks.pop(), renormalize=True, group=group,
                                  device=device, experts_kernel=experts_kernel,
                                  switch_tokens=planned_switch_tokens(model, world_size, device, config))
    for layer, moe in zip(layers, asyncep.layers):
        _collapse_ep_view(layer)
        setattr(layer, _BINDING_ATTR, moe)
    streamer = asyncep.streamer
    order_graph_launches_after(streamer)
    logger.info(
        "AsyncEP: %d MoE layers over %d ranks, own experts read in place (transport %s, prefetch depth %d, "
        "%.2f GB of gather buffers); passes below %d tokens per rank move tokens instead of weights",
        len(layers), world_size, streamer.transport.name, streamer.prefetch_depth, streamer.gather_buffer_bytes / 1e9,
        asyncep.switch_tokens,
    )
    return AsyncEPBinding(asyncep, layers)


def planned_switch_tokens(model: torch.nn.Module, num_ranks: int, device: torch.device, config: AsyncEPConfig) -> int:
    """The planner's switch point for this deployment (bf16 experts on ``num_ranks`` GPUs of this
    kind; :func:`zeroprefill.common.layouts.planned_switch_point`, 0 where it has none).
    ``ZEROPREFILL_ASYNCEP_SWITCH_TOKENS`` (``config.switch_tokens``) overrides it in the builder."""
    from zeroprefill.common.layouts import planned_switch_point
    from zeroprefill.common.model_spec import MoEModelSpec
    from zeroprefill.common.saturation import DEFAULT_CONTEXT_TOKENS

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    tokens, source = planned_switch_point(
        lambda: (MoEModelSpec.from_hf_config(model.config.to_dict()), DEFAULT_CONTEXT_TOKENS, "bf16"), device_name,
        num_ranks, config.transport)
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
