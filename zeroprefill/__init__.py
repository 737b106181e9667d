"""ZeRO-Prefill: prefill-only serving of large Mixture-of-Experts models.

Import map (one distribution, several import names):

- ``zeroprefill.common``  (folder ``common/``): the engine-agnostic core: model spec, expert
  sharding, the AsyncEP weight streamer and MoE layer, cost model, router policy.
- ``zeroprefill.kernels`` (folder ``kernels/``): Triton kernels for routing and grouped experts.
- ``vllm_zeroprefill`` / ``sglang_zeroprefill``: thin engine plugins over the core.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeroprefill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
