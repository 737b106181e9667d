"""A simulated replica's hardware: one AsyncEP group modelled by its forward-pass time.

::

    step_s = max(batch_true_flops / effective_flops_per_s, forward_floor_s)

``forward_floor_s`` is the time to stream every MoE layer's experts (``num_moe_layers x
W_layer x (G-1)/G / B_allgather``): below the saturation threshold
(``forward_floor_s x effective_flops_per_s`` FLOPs per forward) a replica waits on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroprefill.common.model_spec import MoEModelSpec


@dataclass(frozen=True)
class ReplicaHardware:
    """One replica = ``gpus`` GPUs running AsyncEP. Defaults: the 4xH200 measurements
    (613 TFLOP/s grouped GEMM, 12 % slowdown under gathers, 339 GB/s AllGather, bf16)."""

    gpus: int = 4
    gemm_tflops_per_gpu: float = 613.0  # torch._grouped_mm at Qwen3-235B MoE shapes
    comm_slowdown: float = 0.12  # GEMM slowdown under concurrent NCCL AllGathers
    allgather_gbps: float = 339.0  # NCCL AllGather bus bandwidth
    weight_dtype: str = "bf16"
    cache_capacity_tokens: int = 400_000  # prefix-cache (KV) room per replica
    max_batch_tokens: int = 131_072  # uncached tokens one forward may compute

    def effective_flops_per_s(self) -> float:
        return self.gpus * self.gemm_tflops_per_gpu * 1e12 * (1.0 - self.comm_slowdown)

    def forward_floor_s(self, spec: MoEModelSpec) -> float:
        gathered_bytes = spec.expert_bytes_per_layer(self.weight_dtype) * (self.gpus - 1) / self.gpus
        return spec.num_moe_layers * gathered_bytes / (self.allgather_gbps * 1e9)

    def saturation_flops(self, spec: MoEModelSpec) -> float:
        return self.forward_floor_s(spec) * self.effective_flops_per_s()
