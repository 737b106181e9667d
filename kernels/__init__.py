"""Triton kernels for Mixture-of-Experts prefill: alignment, grouped expert GEMMs.

    (topk_weights, topk_ids) from the engine's router or AsyncEP's (select_experts, plain torch)
        --[fused_experts, one of four backends]--> out [T, H]
    triton      (fused_moe.py): moe_align_block_size -> GEMM1 (gate/up + SiLU*mul) -> GEMM2
                (down, routing weight, scatter) -> K-slot sum
    grouped_mm  (grouped_mm_moe.py): align -> scatter token rows -> torch._grouped_mm ->
                SiLU*mul -> torch._grouped_mm -> weighted combine
    triton_grouped_mm (fused_moe.py, bf16): align -> the Triton GEMM1 (token gather and
                SiLU*mul fused) -> torch._grouped_mm -> weighted combine
    deepgemm    (deepgemm.py, optional): the grouped_mm pipeline with DeepGEMM's sm90 grouped
                GEMMs in place of torch's (bf16, and block FP8 with 1x128 activation groups)

bf16 picks its backend per token count from the shipped table (``moe_config.py``); fp16/fp32
run the Triton one. float8_e4m3fn weights with 128x128 block scales take the Triton FP8 path
(tokens quantised per 1x128 group inside the call); with per-output-channel scales, the
FP8-rowwise path on ``torch._scaled_grouped_mm`` (tokens quantised per row). Where
``deep_gemm`` (the ``deepgemm`` extra) loads on an sm90 GPU, bf16 and block-FP8 layers run on
DeepGEMM instead; ``ZEROPREFILL_EXPERTS_KERNEL`` (``auto``, ``triton``, ``deepgemm``) says
which. Every kernel has its plain-torch definition beside it (``*_reference``), which the tests
compare against. No vLLM or SGLang imports: the AsyncEP layer plugs ``fused_experts`` in as its
experts kernel.
"""

import sys

if __name__ == "kernels":
    # Imported as the top-level name ``kernels``: a checkout's root is on sys.path (``python -m``
    # or pytest from it), and this folder shadows whatever ``kernels`` is installed (Hugging
    # Face's kernel hub, which transformers imports when its metadata says it is there). This
    # folder is ``zeroprefill.kernels`` only: the installed package takes its place. With none
    # installed the module stays empty (no attributes, no version), which is what a probe such
    # as transformers' availability check, which imports the name, reads as "not installed".
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    _checkout = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [entry for entry in sys.path if Path(entry or ".").resolve() != _checkout])
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _installed  # what the import statement returns once this body ends
        _spec.loader.exec_module(_installed)
else:
    from .align import ExpertAlignment, moe_align_block_size
    from .deepgemm import deepgemm_experts, deepgemm_source, deepgemm_unavailable_reason
    from .fused_moe import (EXPERTS_KERNEL_ENV, experts_kernel_choice, experts_kernel_setting, fused_experts,
                            fused_experts_reference, precompile_experts)
    from .grouped_mm_moe import grouped_mm_experts
    from .moe_config import GROUPED_MM, TRITON, TRITON_GROUPED_MM, GemmConfig, MoEConfig, get_config
    from .quant import (dequantize_fp8_block, dequantize_fp8_rowwise, quantize_tokens_fp8_group,
                        quantize_weights_fp8_block, quantize_weights_fp8_rowwise)

__all__ = [
    "EXPERTS_KERNEL_ENV",
    "ExpertAlignment",
    "GROUPED_MM",
    "GemmConfig",
    "MoEConfig",
    "TRITON",
    "TRITON_GROUPED_MM",
    "dequantize_fp8_block",
    "dequantize_fp8_rowwise",
    "deepgemm_experts",
    "deepgemm_source",
    "deepgemm_unavailable_reason",
    "experts_kernel_choice",
    "experts_kernel_setting",
    "fused_experts",
    "fused_experts_reference",
    "get_config",
    "grouped_mm_experts",
    "moe_align_block_size",
    "precompile_experts",
    "quantize_tokens_fp8_group",
    "quantize_weights_fp8_block",
    "quantize_weights_fp8_rowwise",
]
