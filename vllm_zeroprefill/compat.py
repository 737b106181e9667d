"""The vLLM releases this plugin supports, and the few APIs that differ between them.

Every vLLM API the plugin touches was read in each release from 0.26.0 to 0.34.0; all but
the ones below are the same in all of them (``KernelConfig.moe_backend``, the
``RoutedExperts._get_quant_method`` seam, ``FusedMoEMethodBase``, ``EngineArgs.
create_engine_config``, the v1 ``Scheduler`` queues, ``coordinator.find_longest_cache_hit``,
and the weight offloader's CUDA-graph hooks that :mod:`vllm_zeroprefill.asyncep_method` uses).
What differs is detected here, by the presence of the API, never by the version number:

- ``KVCacheManager.prefix_cache_lookup_enabled(request)`` appears in 0.27; 0.26 spells the
  same test inline (``enable_caching and not request.skip_reading_prefix_cache``).
- vLLM's own top-k router (``FusedMoERouter.select_experts``) runs on GPUs in every release,
  on the CPU build only from 0.30 (``fused_moe/router/cpu_router.py``): before, the CPU experts
  route inside their monolithic kernels and the generic router calls CUDA-only ops
  (``torch.ops._moe_C.topk_softmax``). :func:`vllm_router_runs_here` says which.
- ``Fp8Config.store_dtype`` (a storage format other than e4m3, e.g. ``'mxfp4'``) exists in
  some releases only: :func:`fp8_store_dtype`. ``ParallelConfig.enable_dbo`` likewise:
  :func:`dbo_enabled`.
- vLLM 0.26 detects its platform (running our platform plugin) while it is still importing
  itself, before ``vllm.engine.arg_utils`` and its cache of parser arguments exist:
  :func:`clear_cli_argument_cache` clears that cache only where it has been built.

- ``Fp8Config.ignored_layers_match_mode`` appears in 0.32 (:func:`layer_skip_match_options`).
- 0.34 removes Model Runner V1 (0.33 already defaults to V2) and
  ``Request.skip_reading_prefix_cache``, which only the 0.26 spelling of
  :func:`prefix_cache_lookup_enabled` reads.
- The forward context's ``dp_metadata.num_tokens_across_dp_cpu`` (every DP rank's token count
  in the pass now running, the figure vLLM pads dummy batches and graphs to) has the same
  name and meaning in every release; :func:`pass_max_tokens` reads it.

Outside the supported range, ``--moe-backend asyncep`` fails at start-up with one line
(:func:`unsupported_vllm_message`); other backends are left alone.
"""

from __future__ import annotations

import importlib.util
import sys

from packaging.version import Version

from zeroprefill.supported_range import SupportedRange

# [first supported, first unsupported): the releases checked above. The one definition code
# reads; pyproject.toml's ``vllm`` extra states the same range (tests/test_vllm_compat.py).
SUPPORTED_VLLM = SupportedRange(Version("0.26.0"), Version("0.35.0"))


def supported_range_text() -> str:
    return SUPPORTED_VLLM.text()


def unsupported_vllm_message(version: str) -> str | None:
    """``None`` if ``version`` is supported, else the one-line start-up error to show."""
    return SUPPORTED_VLLM.unsupported_message(
        version, engine="vLLM", subject="--moe-backend asyncep",
        remedy="install a vLLM in that range or drop --moe-backend asyncep")


def installed_vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def prefix_cache_lookup_enabled(kv_cache_manager, request) -> bool:
    """Whether the engine would look ``request`` up in its prefix cache now."""
    lookup = getattr(kv_cache_manager, "prefix_cache_lookup_enabled", None)
    if lookup is not None:  # vLLM >= 0.27
        return bool(lookup(request))
    return bool(kv_cache_manager.enable_caching and not request.skip_reading_prefix_cache)


def fp8_store_dtype(quant_config) -> str | None:
    """The storage format a vLLM ``Fp8Config`` names besides e4m3 (``store_dtype``), or None:
    where this vLLM's config has no such field, FP8 weights are stored as e4m3."""
    return getattr(quant_config, "store_dtype", None)


def dbo_enabled(parallel_config) -> bool:
    """Whether ``--enable-dbo`` (two micro-batches per forward pass) is on, where vLLM has it."""
    return bool(getattr(parallel_config, "enable_dbo", False))


def clear_cli_argument_cache() -> None:
    """Drop vLLM's cache of parser arguments (``arg_utils._compute_kwargs``, an LRU cache), so
    the next parser sees a widened ``--moe-backend``; nothing to do before it exists.

    Never imports ``arg_utils``: this runs while vLLM imports itself (platform detection, or
    right after ``vllm.config``), and ``arg_utils`` imports half of vLLM.
    """
    compute_kwargs = getattr(sys.modules.get("vllm.engine.arg_utils"), "_compute_kwargs", None)
    if compute_kwargs is not None:
        compute_kwargs.cache_clear()


#: vLLM's CPU router (0.30+): where it exists, vLLM's routing runs on its CPU build too.
CPU_ROUTER_MODULE = "vllm.model_executor.layers.fused_moe.router.cpu_router"


def vllm_router_runs_here(on_cpu: bool) -> bool:
    """Whether vLLM's own top-k router can route this process's MoE layers."""
    if not on_cpu:
        return True
    try:
        return importlib.util.find_spec(CPU_ROUTER_MODULE) is not None
    except ModuleNotFoundError:  # a parent package missing: no CPU router either
        return False


def pass_max_tokens() -> int | None:
    """The largest token count of any data-parallel rank in the forward pass now running.

    vLLM agrees on these counts across its DP ranks before every pass (real or dummy, eager or
    a graph capture); None where it keeps none (one DP rank, or outside a forward pass).
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    dp_metadata = get_forward_context().dp_metadata
    if dp_metadata is None:
        return None
    return int(dp_metadata.num_tokens_across_dp_cpu.max())


def layer_skip_match_options(quant_config) -> dict[str, str]:
    """Keyword arguments for ``is_layer_skipped`` that match ``ignored_layers`` as ``quant_config``
    asks: vLLM 0.32 added ``ignored_layers_match_mode`` (exact by default); 0.26 matches exactly."""
    match_mode = getattr(quant_config, "ignored_layers_match_mode", None)
    return {} if match_mode is None else {"match_mode": match_mode}
