"""A simulated replica's hardware: one AsyncEP group on a shipped hardware profile, priced by the planner.

::

    step_s = max(batch_true_flops / effective_flops_per_s, forward_floor_s)

All three numbers are the planner's (:mod:`zeroprefill.common.saturation`) for the replica's
:class:`~zeroprefill.common.saturation.Deployment` (``gpus`` GPUs of the shipped ``gpu``
profile, ``weight_dtype``, ``transport``):

- ``effective_flops_per_s``: ``gpus * R_eff``, ``R_eff = R / (1 + s)`` (the profile's GEMM rate
  at MoE shapes and the transport's GEMM slowdown);
- ``forward_floor_s``: the light-load pass, ``num_moe_layers * t_g``: every forward streams
  every MoE layer's remote experts, so below the saturation threshold a replica waits on the wire;
- ``saturation_flops``: the replica's threshold as the router computes it with ``--gpus``
  (:func:`~zeroprefill.common.saturation.replica_saturation_flops`, 2048-token prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.saturation import (Deployment, light_load_pass_time_s, replica_flops_per_s,
                                           replica_saturation_flops)


@dataclass(frozen=True)
class ReplicaHardware:
    """One replica = ``gpus`` GPUs of the shipped ``gpu`` profile running AsyncEP. Defaults:
    4xH200 gathering bf16 experts over NCCL, whose rates the shipped profile carries as measured
    (docs/design.md, measured anchors)."""

    gpus: int = 4
    gpu: str = "h200"
    transport: str = "nccl"
    weight_dtype: str = "bf16"
    cache_capacity_tokens: int = 400_000  # prefix-cache (KV) room per replica
    max_batch_tokens: int = 131_072  # uncached tokens one forward may compute

    def deployment(self, spec: MoEModelSpec) -> Deployment:
        """The replica as the planner sees it (raises ``HardwareProfileError`` / ``PlanError``
        for a GPU kind, count, format or transport without a plan)."""
        return Deployment.on_shipped_gpu(spec, self.gpu, self.gpus, self.weight_dtype, self.transport)

    def effective_flops_per_s(self, spec: MoEModelSpec) -> float:
        return replica_flops_per_s(self.deployment(spec))

    def forward_floor_s(self, spec: MoEModelSpec) -> float:
        return light_load_pass_time_s(self.deployment(spec))

    def saturation_flops(self, spec: MoEModelSpec) -> float:
        return replica_saturation_flops(self.deployment(spec))
