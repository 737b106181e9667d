"""Triton kernels for Mixture-of-Experts prefill: routing, alignment, grouped expert GEMMs.

    router_logits --[topk_routing]--> (topk_weights, topk_ids)
        --[fused_experts: moe_align_block_size -> GEMM1 (gate/up + SiLU*mul) -> GEMM2 (down,
           routing weight, scatter) -> K-slot sum]--> out [T, H]

bf16/fp16/fp32 weights take the plain path; float8_e4m3fn weights with 128x128 block scales
take the FP8 path (tokens quantised per 1x128 group inside the call). Every kernel has its
plain-torch definition beside it (``*_reference``), which the tests compare against. No vLLM or
SGLang imports: the AsyncEP layer plugs ``fused_experts`` in as its experts kernel.
"""

from .align import ExpertAlignment, moe_align_block_size
from .fused_moe import fused_experts, fused_experts_reference
from .moe_config import GemmConfig, MoEConfig, get_config
from .quant import dequantize_fp8_block, quantize_tokens_fp8_group, quantize_weights_fp8_block
from .routing import topk_routing, topk_routing_reference

__all__ = [
    "ExpertAlignment",
    "GemmConfig",
    "MoEConfig",
    "dequantize_fp8_block",
    "fused_experts",
    "fused_experts_reference",
    "get_config",
    "moe_align_block_size",
    "quantize_tokens_fp8_group",
    "quantize_weights_fp8_block",
    "topk_routing",
    "topk_routing_reference",
]
