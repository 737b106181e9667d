"""What the ``vllm.general_plugins`` entry point installs in every vLLM process.

vLLM loads general plugins in the API server (``EngineArgs.__post_init__``), in the engine
core and in every worker. Four seams, each as narrow as vLLM allows:

1. ``KernelConfig.moe_backend`` accepts ``asyncep`` (:mod:`vllm_zeroprefill.moe_backend`).
2. ``RoutedExperts._get_quant_method`` — the one place a FusedMoE layer picks its method,
   quantized or not — returns an AsyncEP method when the engine's MoE backend is ``asyncep``
   (:func:`~vllm_zeroprefill.asyncep_method.asyncep_method_for`: unquantized, or block FP8
   in place of vLLM's ``Fp8MoEMethod``), and defers to vLLM otherwise.
3. ``EngineArgs.create_engine_config`` checks an ``asyncep`` deployment before any worker
   starts (:func:`vllm_zeroprefill.validation.check_asyncep_config`) and, for the pooling
   runner, selects the prefill-only scheduler unless ``--scheduler-cls`` was given.
4. vLLM's ``EmbeddingRequest`` union gets a discriminator, so that the API server validates a
   ``/v1/embeddings`` body with the one request model its shape names instead of all five
   (:mod:`vllm_zeroprefill.request_validation`; every server, stock or AsyncEP).

On a vLLM outside the supported range (:mod:`vllm_zeroprefill.compat`) only a refusal is
installed: ``--moe-backend asyncep`` fails at start-up with one line
(:func:`~vllm_zeroprefill.moe_backend.register_moe_backend`), other backends run as they
would without the plugin. Start-up refusals print one line (:mod:`vllm_zeroprefill.errors`).
"""

from __future__ import annotations

import functools

from vllm_zeroprefill.compat import installed_vllm_version, unsupported_vllm_message
from vllm_zeroprefill.errors import install_one_line_errors
from vllm_zeroprefill.moe_backend import ASYNCEP, register_moe_backend

PREFILL_ONLY_SCHEDULER = "vllm_zeroprefill.scheduler.PrefillOnlyScheduler"
ASYNC_PREFILL_ONLY_SCHEDULER = "vllm_zeroprefill.scheduler.AsyncPrefillOnlyScheduler"

_installed = False


def register() -> None:
    """``vllm.general_plugins`` entry point (idempotent: vLLM may call it more than once)."""
    global _installed
    if _installed:
        return
    _installed = True
    problem = unsupported_vllm_message(installed_vllm_version())
    register_moe_backend(refusal=problem)
    install_one_line_errors()
    if problem is not None:
        return
    _install_quant_method_hook()
    _install_engine_config_hook()
    from vllm.logger import init_logger

    from vllm_zeroprefill import request_validation

    init_logger(f"vllm.{__name__}").debug("zeroprefill: %s", request_validation.install())


def _install_quant_method_hook() -> None:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    vllm_get_quant_method = RoutedExperts._get_quant_method

    @functools.wraps(vllm_get_quant_method)
    def get_quant_method(self, prefix, quant_config, moe_config):
        if moe_config.moe_backend != ASYNCEP:
            return vllm_get_quant_method(self, prefix, quant_config, moe_config)
        from vllm_zeroprefill.asyncep_method import asyncep_method_for

        return asyncep_method_for(prefix, quant_config, moe_config)

    RoutedExperts._get_quant_method = get_quant_method


def _install_engine_config_hook() -> None:
    from vllm.engine.arg_utils import EngineArgs

    vllm_create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(vllm_create_engine_config)
    def create_engine_config(self, *args, **kwargs):
        config = vllm_create_engine_config(self, *args, **kwargs)
        if config.kernel_config.moe_backend == ASYNCEP:
            from vllm_zeroprefill.validation import check_asyncep_config

            check_asyncep_config(config)
            scheduler = config.scheduler_config
            if config.model_config.runner_type == "pooling" and scheduler.scheduler_cls is None:
                scheduler.scheduler_cls = (
                    ASYNC_PREFILL_ONLY_SCHEDULER if scheduler.async_scheduling else PREFILL_ONLY_SCHEDULER
                )
        return config

    EngineArgs.create_engine_config = create_engine_config
