"""Read one MoE layer's routed experts and router from a safetensors checkpoint.

Returns them in vLLM's fused layout, the one the streamer shards and the kernels consume:
``w13 [E, 2I, H]`` (gate rows, then up rows), ``w2 [E, H, I]``, ``router [E, H]``. Both the
per-expert naming of HF checkpoints and transformers' fused ``gate_up_proj`` naming are read:

=========================  ===============================================  ==============
family                     per-expert tensors (gate, up, down)              router
=========================  ===============================================  ==============
qwen2/3_moe, deepseek      ``mlp.experts.{e}.{gate,up,down}_proj.weight``   ``mlp.gate``
mixtral                    ``block_sparse_moe.experts.{e}.{w1,w3,w2}``      ``…moe.gate``
=========================  ===============================================  ==============
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zeroprefill.common.model_spec import MoEModelSpec

_PER_EXPERT_NAMES = {
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "block_sparse_moe": ("w1", "w3", "w2"),
}


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor the spec says it has."""


class ExpertCheckpoint:
    """Lazy access to a model directory's safetensors files by tensor name."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {str(self.model_dir)!r}")
        self._handles = [safe_open(str(self.model_dir / f), framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} not found in {str(self.model_dir)!r}")
        return self._where[name].get_tensor(name)

    def moe_layer(self, spec: MoEModelSpec, layer_index: int) -> dict[str, torch.Tensor]:
        """``{"w13", "w2", "router"}`` of decoder layer ``layer_index`` (must be a MoE layer)."""
        if layer_index not in spec.moe_layer_indices:
            raise CheckpointError(f"decoder layer {layer_index} is not a MoE layer of this {spec.architecture} model")
        for block, (gate, up, down) in _PER_EXPERT_NAMES.items():
            prefix = f"model.layers.{layer_index}.{block}"
            if self.has(f"{prefix}.gate.weight"):
                break
        else:
            raise CheckpointError(f"no router weight for decoder layer {layer_index} (looked for mlp.gate / block_sparse_moe.gate)")
        router = self.get(f"{prefix}.gate.weight")
        if self.has(f"{prefix}.experts.gate_up_proj"):  # transformers' fused layout
            w13 = self.get(f"{prefix}.experts.gate_up_proj")
            w2 = self.get(f"{prefix}.experts.down_proj")
        else:
            experts = range(spec.num_experts)
            w13 = torch.stack([
                torch.cat([self.get(f"{prefix}.experts.{e}.{gate}.weight"), self.get(f"{prefix}.experts.{e}.{up}.weight")])
                for e in experts
            ])
            w2 = torch.stack([self.get(f"{prefix}.experts.{e}.{down}.weight") for e in experts])
        expected = {
            "w13": (spec.num_experts, 2 * spec.expert_intermediate_size, spec.hidden_size),
            "w2": (spec.num_experts, spec.hidden_size, spec.expert_intermediate_size),
            "router": (spec.num_experts, spec.hidden_size),
        }
        tensors = {"w13": w13, "w2": w2, "router": router}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(
                    f"decoder layer {layer_index} {name} has shape {tuple(tensors[name].shape)}, the config implies {shape}"
                )
        return tensors
