"""Start-up checks of a ``--moe-backend asyncep`` deployment, before any worker starts.

Each check names the offending setting and what to change, so a bad deployment fails in
the API server at start-up rather than in a worker at the first request. Layer-level checks
(routing rules, activation, quantised experts) run when the model is built
(:func:`vllm_zeroprefill.asyncep_method.check_routed_experts_supported`).
"""

from __future__ import annotations

from vllm.config import VllmConfig

from zeroprefill.common.model_spec import ModelSpecError, MoEModelSpec
from zeroprefill.common.asyncep_model import AsyncEPConfig, AsyncEPConfigError


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
    if model.quantization is not None:
        raise AsyncEPConfigError(
            f"--moe-backend asyncep runs unquantized expert weights, but the model is quantized "
            f"with {model.quantization!r}: serve an unquantized checkpoint or drop --moe-backend asyncep"
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
    AsyncEPConfig.from_env()  # a bad ZEROPREFILL_ASYNCEP_* setting fails here, not in a worker
    if getattr(parallel, "enable_dbo", False):
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
