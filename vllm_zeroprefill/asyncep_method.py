"""vLLM's FusedMoE under ``--moe-backend asyncep``: our AsyncEP layer as a FusedMoE method.

Where this sits in vLLM's MoE data path (``fused_moe/runner/moe_runner.py``)::

    MoERunner.forward
      gate -> router_logits [T, E]                               vLLM (replicated weights)
      _maybe_dispatch            skipped: supports_internal_mk   (no all-gather of tokens)
      router.select_experts -> topk_weights, topk_ids [T, K]     vLLM (global expert ids)
      RoutedExperts.forward_modular
        AsyncEPFusedMoEMethod.apply                              this module
          AsyncEPMoE.forward_routed(x, topk_weights, topk_ids,   zeroprefill.common
                                    max_tokens of any DP rank)
            >= switch point: streamer.acquire(l) -> experts kernel (resident shard, then the
                             gathered shards) -> streamer.release(l)
             < switch point: tokens to the ranks holding their experts and back (TokenExchange)
      _maybe_combine             skipped: supports_internal_mk   (the layer combined its tokens)
      shared experts, final TP all-reduce (TP = 1: a no-op)       vLLM

Weights: vLLM's expert-parallel loader gives every rank its 1/N of each layer's experts
(``w13_weight [E_local, 2I, H]``, ``w2_weight [E_local, H, I]``, placement ``linear`` or
``round_robin``); a block-FP8 checkpoint adds their 128x128 scales
(``w13_weight_scale_inv [E_local, 2I/128, H/128]``, ``w2_weight_scale_inv [E_local, H/128,
I/128]``), created exactly as vLLM's ``Fp8MoEMethod`` creates them, so the same loader fills
them (:class:`AsyncEPBlockFp8FusedMoEMethod`). After loading, each layer hands its shard
(the weights, and the scales as ``w13_scale`` / ``w2_scale``), padded to the layout's
capacity, to the process's :class:`AsyncEPModelLoader`, which hands it to the transport at
once (the copy engine moves it into symmetric memory and vLLM's copy is freed), over a
communicator of AsyncEP's own spanning the EP ranks, with the settings of
``AsyncEPConfig.from_env()`` (transport ``auto``: gloo on CPU, the copy engine on GPU). The
streamer needs every layer, so the loader builds the model
(``zeroprefill.common.asyncep_model.build_asyncep_model``) at the first MoE forward (the
start-up profile run, eager, on every rank at the same point). There, on GPUs, it also runs the
experts kernel at every power-of-two batch up to ``--max-num-batched-tokens``, so every kernel
variant serving can pick is compiled before the server accepts a request. A rank's own
experts are never copied: with one EP rank there are no gather buffers at all.

Per forward pass the layers stream weights or, below the switch point, move tokens; the pass's
largest per-rank token count comes from vLLM's data-parallel metadata
(:func:`vllm_zeroprefill.compat.pass_max_tokens`, the counts vLLM already agrees on for its dummy
batches), so every rank takes the same mode, and a captured graph's size fixes its mode. The
switch point is ``ZEROPREFILL_ASYNCEP_SWITCH_TOKENS`` when set, else the planner's for this
deployment on a GPU with a shipped profile (:func:`zeroprefill.common.layouts.
switch_point_on_gpus`), else 0 (always stream); it is logged at start-up.

Routing is vLLM's own (the same top-k kernel, tie-breaking included, as every other
backend), so AsyncEP picks exactly the experts stock vLLM picks from the same logits. Where
vLLM's router cannot run (its CPU build before 0.30: :func:`vllm_zeroprefill.compat.
vllm_router_runs_here`) the method is monolithic instead: ``apply_monolithic`` hands the
router logits to ``AsyncEPMoE.forward``, which routes by the layer's own rule (softmax or
sigmoid top-k, renormalised as configured; :func:`check_routed_experts_supported` refuses
the rest).

CUDA graphs: the streamer is capture-safe, and :mod:`vllm_zeroprefill.cuda_graphs` orders
every graph capture and replay after the eager gathers in flight (docs/design.md).

Lockstep: every forward pass — real or vLLM's DP dummy batch — runs every MoE layer on every
rank, so every rank issues every gather in the same order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from vllm.distributed import get_ep_group
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from vllm_zeroprefill.compat import layer_skip_match_options, pass_max_tokens, vllm_router_runs_here
from vllm_zeroprefill.validation import block_fp8_weight_block
from zeroprefill.common.asyncep_model import (SWITCH_TOKENS_ENV, AsyncEPConfig, AsyncEPConfigError, AsyncEPModel,
                                              build_asyncep_model)
from zeroprefill.common.asyncep_moe import SCORING_FUNCS, AsyncEPMoE, default_experts_kernel
from zeroprefill.common.block_fp8 import FP8_DTYPE, expert_format
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.transport import GatherTransport, make_transport

# Under vLLM's logger namespace, so these lines appear in the server log like vLLM's own.
logger = init_logger(f"vllm.{__name__}")


def check_routed_experts_supported(layer) -> None:
    """Raise :class:`AsyncEPConfigError` for a FusedMoE layer our AsyncEP core cannot run."""
    reasons = []
    if layer.use_grouped_topk:
        reasons.append("grouped top-k routing (DeepSeek-V3 n_group/topk_group)")
    if layer.custom_routing_function is not None:
        reasons.append("a custom routing function")
    if layer.e_score_correction_bias is not None:
        reasons.append("an expert score-correction bias")
    if layer.routed_scaling_factor != 1.0:
        reasons.append(f"routed_scaling_factor={layer.routed_scaling_factor}")
    if layer.apply_router_weight_on_input:
        reasons.append("router weights applied on the input")
    if layer.scoring_func not in SCORING_FUNCS:
        reasons.append(f"scoring_func={layer.scoring_func!r}")
    if layer.moe_config.activation != MoEActivation.SILU:
        reasons.append(f"activation {layer.moe_config.activation.value!r} (AsyncEP runs SiLU-gated experts)")
    if layer.moe_config.has_bias:
        reasons.append("expert biases")
    if reasons:
        raise AsyncEPConfigError(
            f"--moe-backend asyncep cannot run MoE layer {layer.layer_name}: it uses "
            f"{', '.join(reasons)}; serve this model with the default --moe-backend"
        )


@dataclass(frozen=True)
class ServedModel:
    """What the loader needs to know of vLLM's configuration, read while vLLM loads the model."""

    switch_point_tokens: int  # the planner's, 0 where none applies
    switch_point_source: str
    max_batch_tokens: int  # --max-num-batched-tokens: the largest batch the kernels will see

    @classmethod
    def from_vllm_config(cls, vllm_config, config: AsyncEPConfig, num_ranks: int) -> ServedModel:
        max_batch = vllm_config.scheduler_config.max_num_batched_tokens
        if config.switch_tokens is not None:
            return cls(config.switch_tokens, SWITCH_TOKENS_ENV, max_batch)
        from vllm_zeroprefill.validation import expert_weight_dtype, model_spec_of
        from zeroprefill.common.layouts import planned_switch_point
        from zeroprefill.common.saturation import DEFAULT_CONTEXT_TOKENS

        def model() -> tuple:
            context = min(vllm_config.model_config.max_model_len, DEFAULT_CONTEXT_TOKENS)
            return model_spec_of(vllm_config), context, expert_weight_dtype(vllm_config)

        device_name = current_platform.get_device_name() if current_platform.is_cuda() else None
        tokens, source = planned_switch_point(model, device_name, num_ranks, transport=config.transport)
        return cls(tokens, source, max_batch)


@dataclass
class AsyncEPModelLoader:
    """Hands every MoE layer's shard to the transport as vLLM loads it; builds the model at first use."""

    layer_shards: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # in load order
    layout: ExpertShardLayout | None = None
    config: AsyncEPConfig | None = None
    transport: GatherTransport | None = None
    vllm_config: object | None = None  # vLLM's configuration, as the layers were built under it
    served: ServedModel | None = None
    model: AsyncEPModel | None = None
    layer_of: dict[str, AsyncEPMoE] = field(default_factory=dict)
    modes_seen: set[bool] = field(default_factory=set)  # moves_tokens values of the passes so far

    def remember_vllm_config(self) -> None:
        """Keep vLLM's configuration while it builds the layers (its context is not set later)."""
        if self.vllm_config is None:
            from vllm.config import get_current_vllm_config

            self.vllm_config = get_current_vllm_config()

    def add_layer(self, layer, layout: ExpertShardLayout, shards: dict[str, torch.Tensor]) -> None:
        """Hand over one layer's padded shards (``w13``, ``w2``, and ``*_scale`` for block FP8)."""
        if self.model is not None:
            raise RuntimeError(f"MoE layer {layer.layer_name} was loaded after AsyncEP started streaming")
        if self.layout is not None and self.layout != layout:
            raise AsyncEPConfigError(
                f"MoE layer {layer.layer_name} has {layout.num_experts} experts but earlier layers "
                f"have {self.layout.num_experts}: AsyncEP streams layers of one shape"
            )
        if self.layer_shards:
            first = expert_format(next(iter(self.layer_shards.values())))
            if expert_format(shards) != first:
                raise AsyncEPConfigError(
                    f"MoE layer {layer.layer_name} stores its experts as {expert_format(shards)} but earlier "
                    f"layers as {first} (the checkpoint leaves some MoE layers unquantized): AsyncEP streams "
                    "layers of one format; drop --moe-backend asyncep for this checkpoint"
                )
        self.layout = layout
        if self.transport is None:
            self.config = AsyncEPConfig.from_env()
            self.transport = _make_transport(self.config, shards["w13"].device)
            self.served = ServedModel.from_vllm_config(self.vllm_config, self.config, layout.world_size)
        # Hand the layer over now, while vLLM loads: a transport that moves shards into shareable
        # memory frees vLLM's copy before the next layer, and vLLM's memory profile (weights at
        # load, everything else at the profile run) counts the experts once.
        self.transport.adopt(shards)
        self.layer_shards[layer.layer_name] = shards

    def moe(self, layer) -> AsyncEPMoE:
        """The AsyncEP layer for ``layer``; builds the model on the first call."""
        if self.model is None:
            self._build(layer)
        return self.layer_of[layer.layer_name]

    def note_mode(self, moe: AsyncEPMoE, max_tokens: int | None) -> None:
        """Log the first pass of each mode (streaming weights, moving tokens), once each."""
        moves_tokens = moe.moves_tokens(max_tokens)
        if moves_tokens in self.modes_seen or not moe.streamer.streams_weights:
            return
        self.modes_seen.add(moves_tokens)
        what = "moves tokens to the resident experts" if moves_tokens else "streams expert weights"
        logger.info("AsyncEP: first pass that %s (largest batch of any rank: %s tokens; switch point %d)",
                    what, "unknown" if max_tokens is None else max_tokens, moe.switch_tokens)

    def _build(self, any_layer) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        if self.layout is None or self.transport is None or self.config is None or self.served is None:
            raise RuntimeError("no MoE layer registered with AsyncEP before the first forward pass")
        order = list(self.layer_shards)
        if order != sorted(order, key=extract_layer_index):
            raise RuntimeError(f"vLLM loaded the MoE layers out of execution order: {order}")
        shards = [self.layer_shards[name] for name in order]
        device = shards[0]["w13"].device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "AsyncEP's first MoE forward is a CUDA-graph capture: vLLM runs an eager profile pass "
                "before capturing, so this vLLM release is not supported; use --enforce-eager"
            )
        self.model = build_asyncep_model(
            shards, self.layout, self.config,
            top_k=any_layer.top_k, renormalize=any_layer.renormalize, scoring_func=any_layer.scoring_func,
            experts_kernel=default_experts_kernel(device, shards[0]["w13"].dtype), transport=self.transport,
            switch_tokens=self.served.switch_point_tokens,
        )
        self.layer_of = dict(zip(order, self.model.layers))
        self.layer_shards.clear()
        streamer = self.model.streamer
        kernel = self.model.layers[0].experts_kernel.__name__
        if device.type == "cuda":
            from vllm_zeroprefill.cuda_graphs import order_graph_launches_after

            order_graph_launches_after(streamer)
            kernel = self._precompile_kernels(any_layer)
        logger.info(
            "AsyncEP: %d MoE layers of %d experts (%s) over %d EP ranks; this rank stores experts %s and "
            "reads them in place; transport %s, prefetch depth %d, %d gather buffers = %.2f GiB; passes "
            "below %d tokens per rank move tokens instead of weights (%s); experts kernel %s",
            len(order), self.layout.num_experts, expert_format(shards[0]), self.layout.world_size,
            self.layout.describe_experts_of_rank(streamer.rank), streamer.transport.name, streamer.prefetch_depth,
            streamer.num_slots, streamer.gather_buffer_bytes / 2**30, self.model.switch_tokens,
            self.served.switch_point_source if self.model.switch_tokens else "never: " + self.served.switch_point_source,
            kernel,
        )

    def _precompile_kernels(self, any_layer) -> str:
        """Compile every experts-kernel variant serving can pick, before any request arrives;
        returns the kernel choice in words."""
        from zeroprefill.kernels import experts_kernel_choice, precompile_experts

        resident = self.model.streamer.resident(0).tensors
        scales = {name: resident[name] for name in ("w13_scale", "w2_scale") if name in resident}
        activation_dtype = any_layer.moe_config.in_dtype
        started = time.monotonic()
        counts = precompile_experts(resident["w13"], resident["w2"], any_layer.top_k, self.served.max_batch_tokens,
                                    activation_dtype=activation_dtype, **scales)
        logger.info("AsyncEP: experts kernels compiled for %d batch sizes, 1 to %d tokens, in %.1f s",
                    len(counts), counts[-1], time.monotonic() - started)
        return experts_kernel_choice(activation_dtype, resident["w13"], resident["w2"], **scales)


def _make_transport(config: AsyncEPConfig, device: torch.device) -> GatherTransport:
    """The transport over a communicator of AsyncEP's own, spanning vLLM's EP ranks.

    Its own: the side-stream gathers never interleave with vLLM's collectives. Collective: every
    EP rank creates it at its first MoE layer, as vLLM loads the same layers on every rank.
    """
    backend = "gloo" if device.type == "cpu" else "nccl"
    group = dist.new_group(ranks=get_ep_group().ranks, backend=backend, use_local_synchronization=True)
    return make_transport(config.transport, group, device, config.copy_streams)


def asyncep_method_for(
    prefix: str, quant_config: QuantizationConfig | None, moe: FusedMoEConfig
) -> AsyncEPFusedMoEMethod:
    """The AsyncEP method of the FusedMoE layer ``prefix``, in the checkpoint's weight format.

    Unquantized, or block FP8 (raises :class:`AsyncEPConfigError` for any other scheme). A
    layer the FP8 config leaves unquantized (its ``ignored_layers`` /
    ``modules_to_not_convert``, matched as vLLM's ``Fp8Config`` matches them) gets the
    unquantized method, as vLLM gives it ``UnquantizedFusedMoEMethod``.
    """
    weight_block = block_fp8_weight_block(quant_config)
    if weight_block is None or _ignored_by(quant_config, prefix):
        return AsyncEPFusedMoEMethod(moe)
    return AsyncEPBlockFp8FusedMoEMethod(moe, weight_block)


def _ignored_by(quant_config: QuantizationConfig, prefix: str) -> bool:
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    return is_layer_skipped(prefix, quant_config.ignored_layers, quant_config.packed_modules_mapping,
                            **layer_skip_match_options(quant_config))


_LOADER = AsyncEPModelLoader()


def model_loader() -> AsyncEPModelLoader:
    """This process's AsyncEP model (one model per worker process)."""
    return _LOADER


class AsyncEPFusedMoEMethod(FusedMoEMethodBase):
    """FusedMoE method that runs the layer with AsyncEP: stream weights, keep tokens local."""

    def __init__(self, moe: FusedMoEConfig):
        super().__init__(moe)
        self.loader = model_loader()
        self.vllm_routes = vllm_router_runs_here(on_cpu=current_platform.is_cpu())

    # The runner's naive DP/EP dispatch and combine move tokens between ranks; AsyncEP owns
    # its communication (weights only), so it reports itself as the internal kernel path.
    @property
    def supports_internal_mk(self) -> bool:
        return True

    @property
    def is_monolithic(self) -> bool:
        return not self.vllm_routes

    def create_weights(
        self,
        layer,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        check_routed_experts_supported(layer)
        self.loader.remember_vllm_config()
        w13 = torch.nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size_per_partition, hidden_size, dtype=params_dtype),
            requires_grad=False,
        )
        layer.register_parameter("w13_weight", w13)
        set_weight_attrs(w13, extra_weight_attrs)
        w2 = torch.nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        layer.register_parameter("w2_weight", w2)
        set_weight_attrs(w2, extra_weight_attrs)

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig:
        # The runner hands apply() unquantized activations; the experts kernel quantizes them
        # itself where the weights are FP8. Nothing of vLLM's quantizes for us.
        return FusedMoEQuantConfig.make()

    def loaded_experts(self, layer) -> dict[str, torch.nn.Parameter]:
        """The layer's expert parameters vLLM filled, by the name the AsyncEP core streams them under."""
        return {"w13": layer.w13_weight, "w2": layer.w2_weight}

    def process_weights_after_loading(self, layer) -> None:
        parallel = self.moe.moe_parallel_config
        layout = ExpertShardLayout(layer.global_num_experts, parallel.ep_size, layer.expert_placement_strategy)
        _check_layout_matches_vllm(layer, layout, parallel.ep_rank)
        loaded = self.loaded_experts(layer)
        # A rank may own one expert fewer than the largest shard: pad to the layout's capacity.
        self.loader.add_layer(layer, layout, {name: layout.pad_shard(p.data) for name, p in loaded.items()})
        # The shard now lives in the streamer's transport; drop vLLM's copy of it.
        for param in loaded.values():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        # Shared experts are the runner's (before or beside this call), as for every backend.
        moe, max_tokens = self.loader.moe(layer), pass_max_tokens()
        self.loader.note_mode(moe, max_tokens)
        return moe.forward_routed(x, topk_weights, topk_ids, max_tokens)

    def apply_monolithic(self, layer, x, router_logits, input_ids=None) -> torch.Tensor:
        """Where vLLM's router cannot run here (``is_monolithic``): route, then the same layer."""
        moe, max_tokens = self.loader.moe(layer), pass_max_tokens()
        self.loader.note_mode(moe, max_tokens)
        return moe.forward(x, router_logits, max_tokens)


class AsyncEPBlockFp8FusedMoEMethod(AsyncEPFusedMoEMethod):
    """AsyncEP on block-FP8 experts: e4m3 weights and 128x128 scales, gathered together.

    ``create_weights`` registers the parameters vLLM's ``Fp8MoEMethod`` registers for a
    block-quantized checkpoint (vLLM 0.26-0.34, tensor parallel size 1), so vLLM's FusedMoE
    weight loader fills them unchanged: ``w13_weight`` / ``w2_weight`` in float8_e4m3fn and
    float32 ``w13_weight_scale_inv [E, 2 * ceil(I/bn), ceil(H/bk)]`` /
    ``w2_weight_scale_inv [E, ceil(H/bn), ceil(I/bk)]`` with ``quant_method="block"`` (the
    attribute the loader dispatches block scales on). Activations stay unquantized until the
    experts kernel, which quantizes them per 1x128 group (dynamic, as the checkpoint asks).
    """

    def __init__(self, moe: FusedMoEConfig, weight_block: tuple[int, int]):
        super().__init__(moe)
        self.weight_block = weight_block

    def create_weights(
        self,
        layer,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        block_n, block_k = self.weight_block
        intermediate = intermediate_size_per_partition
        if intermediate % block_n:  # vLLM's Fp8MoEMethod refuses it too: gate and up share scale rows
            raise AsyncEPConfigError(
                f"{layer.layer_name}: block-FP8 experts need an intermediate size that is a multiple of "
                f"{block_n}, got {intermediate}"
            )
        super().create_weights(layer, num_experts, hidden_size, intermediate, FP8_DTYPE, **extra_weight_attrs)
        # What vLLM's Fp8MoEMethod.create_weights records on the layer besides the parameters.
        layer.num_experts = num_experts
        layer.orig_dtype = params_dtype
        layer.weight_block_size = list(self.weight_block)
        layer.w13_input_scale = None  # dynamic activation scales: none in the checkpoint
        layer.w2_input_scale = None
        # Gate and up are two logical shards of w13: each has its own ceil(I / block_n) scale rows.
        scales = {
            "w13_weight_scale_inv": (num_experts, 2 * -(-intermediate // block_n), -(-hidden_size // block_k)),
            "w2_weight_scale_inv": (num_experts, -(-hidden_size // block_n), -(-intermediate // block_k)),
        }
        scale_attrs = {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.BLOCK.value}
        for name, shape in scales.items():
            scale = torch.nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)
            layer.register_parameter(name, scale)
            set_weight_attrs(scale, scale_attrs)

    def loaded_experts(self, layer) -> dict[str, torch.nn.Parameter]:
        return super().loaded_experts(layer) | {
            "w13_scale": layer.w13_weight_scale_inv,
            "w2_scale": layer.w2_weight_scale_inv,
        }


def _check_layout_matches_vllm(layer, layout: ExpertShardLayout, ep_rank: int) -> None:
    """Our shard of experts is exactly what vLLM's EP loader put on this rank."""
    expert_map = layer.expert_map
    owned = layout.experts_of_rank(ep_rank)
    if expert_map is None:
        expected = list(range(layer.global_num_experts))
    else:
        expected = [e for e in range(layer.global_num_experts) if int(expert_map[e]) >= 0]
        expected.sort(key=lambda e: int(expert_map[e]))
    if list(owned) != expected:
        raise AssertionError(
            f"{layer.layer_name}: vLLM placed experts {expected} on EP rank {ep_rank}, "
            f"AsyncEP's {layout.placement} layout expects {list(owned)}"
        )

