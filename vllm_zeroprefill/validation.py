"""Start-up checks of a ``--moe-backend asyncep`` deployment, before any worker starts.

Each check names the offending setting and what to change, so a bad deployment fails in
the API server at start-up rather than in a worker at the first request. Layer-level checks
(routing rules, activation) run when the model is built
(:func:`vllm_zeroprefill.asyncep_method.check_routed_experts_supported`).

Quantisation: unquantised checkpoints, and block-FP8 ones as Qwen3-*-FP8 ship them (vLLM's
``fp8`` method with ``weight_block_size`` [128, 128]: e4m3 weights, 128x128 scales, dynamic
1x128 activation scales). Every other scheme is refused here, in one line
(:func:`block_fp8_weight_block`).
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_zeroprefill.compat import dbo_enabled, fp8_store_dtype
from zeroprefill.common.model_spec import FP8_WEIGHT_BLOCK, ModelSpecError, MoEModelSpec
from zeroprefill.common.asyncep_model import AsyncEPConfigError, check_settings

SUPPORTED_QUANTIZATION = (
    "unquantized checkpoints and block-FP8 ones (quantization_config quant_method 'fp8' with "
    f"weight_block_size [{FP8_WEIGHT_BLOCK}, {FP8_WEIGHT_BLOCK}], as Qwen3-*-FP8 ship)"
)


def block_fp8_weight_block(quant_config: QuantizationConfig | None) -> tuple[int, int] | None:
    """``None`` for an unquantized model, the weight block of a block-FP8 one AsyncEP runs.

    Raises :class:`AsyncEPConfigError` for any other quantization, naming what is supported.
    """
    if quant_config is None:
        return None
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    supported_block = [FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK]
    if type(quant_config) is not Fp8Config:  # subclasses (e.g. DeepSeek-V4's) store other formats
        scheme = repr(quant_config.get_name())
    elif quant_config.weight_block_size is None:
        scheme = "'fp8' without weight_block_size (per-tensor scales, or quantized online)"
    elif (store_dtype := fp8_store_dtype(quant_config)) is not None:
        scheme = f"'fp8' stored as {store_dtype!r}"
    elif list(quant_config.weight_block_size) != supported_block:
        scheme = f"'fp8' with weight_block_size {list(quant_config.weight_block_size)}"
    else:
        return FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK
    raise AsyncEPConfigError(
        f"--moe-backend asyncep serves {SUPPORTED_QUANTIZATION}; this model is quantized with "
        f"{scheme}: serve a supported checkpoint or drop --moe-backend asyncep"
    )


def expert_weight_dtype(config: VllmConfig) -> str:
    """What AsyncEP streams, as the planner names it: ``"fp8"`` or ``"bf16"``.

    ``check_asyncep_config`` admits block FP8 as the only quantization, so a quantized
    deployment that passed it streams block FP8.
    """
    return "fp8" if config.model_config.quantization is not None else "bf16"


def model_spec_of(config: VllmConfig) -> MoEModelSpec:
    """Our shape description of the served model (raises ``ModelSpecError`` if not a MoE)."""
    hf_config = config.model_config.hf_text_config
    return MoEModelSpec.from_hf_config(hf_config.to_dict())


def check_asyncep_config(config: VllmConfig) -> MoEModelSpec:
    """Raise :class:`AsyncEPConfigError` if AsyncEP cannot serve this deployment."""
    model = config.model_config
    parallel = config.parallel_config
    try:
        spec = model_spec_of(config)
    except ModelSpecError as exc:
        raise AsyncEPConfigError(
            f"--moe-backend asyncep needs a Mixture-of-Experts model; {model.model!r} is not one "
            f"AsyncEP supports ({exc}); drop --moe-backend asyncep for this model"
        ) from None
    weight_block = block_fp8_weight_block(config.quant_config)
    if weight_block is not None and spec.expert_intermediate_size % weight_block[0]:
        raise AsyncEPConfigError(
            f"--moe-backend asyncep runs block-FP8 experts whose intermediate size is a multiple of "
            f"{weight_block[0]}; this model's is {spec.expert_intermediate_size}: serve it unquantized "
            "or drop --moe-backend asyncep"
        )
    if not parallel.enable_expert_parallel:
        raise AsyncEPConfigError(
            "--moe-backend asyncep shards experts the way vLLM's expert parallelism does: "
            "add --enable-expert-parallel (with --data-parallel-size N)"
        )
    if parallel.tensor_parallel_size > 1:
        raise AsyncEPConfigError(
            f"--moe-backend asyncep runs each data-parallel rank on one device, got "
            f"--tensor-parallel-size {parallel.tensor_parallel_size}: use --tensor-parallel-size 1 "
            f"and --data-parallel-size {parallel.tensor_parallel_size * parallel.data_parallel_size}"
        )
    if parallel.pipeline_parallel_size > 1:
        raise AsyncEPConfigError(
            f"--moe-backend asyncep does not support --pipeline-parallel-size "
            f"{parallel.pipeline_parallel_size}: use --pipeline-parallel-size 1"
        )
    if parallel.enable_eplb:
        raise AsyncEPConfigError(
            "--moe-backend asyncep runs every expert on every rank, so expert load balancing has "
            "nothing to balance: drop --enable-eplb"
        )
    check_settings()  # a bad ZEROPREFILL_* setting fails here, not in a worker
    if dbo_enabled(parallel):
        raise AsyncEPConfigError(
            "--moe-backend asyncep streams each MoE layer once per forward pass, but --enable-dbo "
            "runs every layer twice (two micro-batches): drop --enable-dbo"
        )
    if parallel.data_parallel_size > spec.num_experts:
        raise AsyncEPConfigError(
            f"--data-parallel-size {parallel.data_parallel_size} exceeds the model's "
            f"{spec.num_experts} experts: some rank would store no expert; use at most "
            f"{spec.num_experts} ranks"
        )
    return spec
