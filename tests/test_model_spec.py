"""Model spec: the MoE families we read, exact parameter counts, clear errors."""

import json

import pytest

from zeroprefill.common.model_spec import MoEModelSpec, ModelSpecError
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe

QWEN3_235B = "common/model_configs/qwen3-235b-a22b.json"


def test_qwen3_235b_shapes_and_sizes():
    spec = MoEModelSpec.from_pretrained(QWEN3_235B)
    assert (spec.num_layers, spec.num_moe_layers, spec.num_experts, spec.top_k) == (94, 94, 128, 8)
    # One layer's experts: 128 experts * 3 * 4096 * 1536 weights * 2 bytes = 4.83 GB (docs/design.md).
    assert spec.expert_bytes_per_layer("bf16") == 128 * 3 * 4096 * 1536 * 2
    # FP8: one byte a weight + fp32 scale per 128x128 block: w13 (3072/128)*(4096/128) = 768
    # blocks, w2 (4096/128)*(1536/128) = 384, per expert.
    assert spec.expert_bytes_per_layer("fp8") == 128 * 3 * 4096 * 1536 + 128 * (768 + 384) * 4
    # Attention per layer: q 4096*64*128 + k,v 2*4096*4*128 + o 64*128*4096 + q/k norms 2*128.
    assert spec.attention_params_per_layer == 4096 * 8192 + 2 * 4096 * 512 + 8192 * 4096 + 256
    assert round(spec.total_params / 1e9, 1) == 235.1
    assert round(spec.active_params_per_token / 1e9, 1) == 22.2


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_parameter_count_matches_transformers(tmp_path, arch):
    import transformers

    path = generate_tiny_moe(tmp_path / arch, TinyMoEConfig(architecture=arch, num_experts=6, top_k=3))
    spec = MoEModelSpec.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    assert (spec.num_experts, spec.top_k) == (6, 3)
    assert spec.shared_expert_intermediate_size == (128 if arch == "qwen2_moe" else 0)


def test_deepseek_v3_style_config():
    config = {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168,
        "vocab_size": 129280, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3,
        "intermediate_size": 18432, "num_attention_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    }
    spec = MoEModelSpec.from_hf_config(config)
    assert spec.num_moe_layers == 58 and spec.moe_layer_indices[0] == 3
    assert spec.scoring_func == "sigmoid" and spec.renormalize_topk
    assert spec.attention.kind == "mla" and spec.attention.head_dim == 192
    assert round(spec.total_params / 1e9) == 671  # DeepSeek-V3's published size (without MTP)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelSpecError, match="unsupported architecture model_type='llama'"):
        MoEModelSpec.from_hf_config({"model_type": "llama"})
    with pytest.raises(ModelSpecError, match="missing required field 'moe_intermediate_size'"):
        MoEModelSpec.from_hf_config({"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 8,
                                     "vocab_size": 10, "num_experts": 4, "num_experts_per_tok": 2})
    config = json.loads(open(QWEN3_235B).read()) | {"num_experts_per_tok": 200}
    with pytest.raises(ModelSpecError, match="top_k=200 exceeds num_experts=128"):
        MoEModelSpec.from_hf_config(config)
    with pytest.raises(ModelSpecError, match="no config.json"):
        MoEModelSpec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        MoEModelSpec.from_pretrained(tmp_path)
