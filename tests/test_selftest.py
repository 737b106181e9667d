"""The install self-check: AsyncEP on 2 gloo ranks vs transformers' own MoE blocks."""

import pytest

from zeroprefill.common.checkpoint import CheckpointError, ExpertCheckpoint
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.selftest import run_selftest
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe


@pytest.mark.parametrize("arch,experts,top_k", [("qwen3_moe", 8, 2), ("mixtral", 5, 3)])
def test_selftest_matches_transformers(tmp_path, capsys, arch, experts, top_k):
    model = generate_tiny_moe(tmp_path, TinyMoEConfig(architecture=arch, num_experts=experts, top_k=top_k))
    assert run_selftest(model, world_size=2)
    out = capsys.readouterr().out
    assert out.count("MATCH") == 2 and "MISMATCH" not in out


def test_checkpoint_reader_layout_and_errors(tmp_path):
    model = generate_tiny_moe(tmp_path, TinyMoEConfig(num_experts=4))
    spec = MoEModelSpec.from_pretrained(model)
    ckpt = ExpertCheckpoint(model)
    layer = ckpt.moe_layer(spec, 1)
    gate = ckpt.get("model.layers.1.mlp.experts.2.gate_proj.weight")
    up = ckpt.get("model.layers.1.mlp.experts.2.up_proj.weight")
    assert (layer["w13"][2, :64] == gate).all() and (layer["w13"][2, 64:] == up).all()
    assert tuple(layer["w2"].shape) == (4, 128, 64) and tuple(layer["router"].shape) == (4, 128)
    with pytest.raises(CheckpointError, match="decoder layer 5 is not a MoE layer"):
        ckpt.moe_layer(spec, 5)
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        ExpertCheckpoint(tmp_path / "missing")


def test_selftest_cli_rejects_a_directory_without_a_checkpoint(tmp_path, capsys):
    from zeroprefill.cli import main

    assert main(["selftest", "--model", str(tmp_path)]) == 2
    assert "zeroprefill selftest: no config.json" in capsys.readouterr().out
