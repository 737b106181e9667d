"""Embeddings from SGLang's own MoE causal-LM classes under ``--is-embedding`` (the plugin's hook).

A fresh process resolves ``--is-embedding`` through our launcher, builds SGLang's parallel
groups on one gloo rank as a scheduler does and constructs SGLang's real
``Qwen3MoeForCausalLM`` / ``Qwen2MoeForCausalLM`` from a generated config. Stock, their
``forward`` refuses ``get_embedding`` (what kills a stock server at its first forward pass);
after the plugin's post-load hook, ``forward(..., get_embedding=True)`` runs the class's own
forward with SGLang's ``Pooler`` in place of the logits processor. The decoder stack needs
SGLang's attention kernels, which a CPU machine lacks, so the model's inner ``model`` is
replaced by a module returning known final hidden states: what is checked is the head,
against last-token pooling with L2 normalisation computed here.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import (  # noqa: E402
    import_sglang,
    initialize_dp_attention,
    initialize_model_parallel,
    initialize_moe_config,
    publish,
)

from zeroprefill.ports import free_port  # noqa: E402
from zeroprefill.tiny_model import TinyMoEConfig  # noqa: E402

HIDDEN = 32


class FinalHiddenStates(torch.nn.Module):
    """Stands in for the decoder stack: returns the given final hidden states."""

    def __init__(self, hidden_states: torch.Tensor) -> None:
        super().__init__()
        self.hidden_states = hidden_states

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden_states


class RecordingHead(torch.nn.Module):
    def forward(self, input_ids, hidden_states, lm_head, forward_batch, *rest) -> str:
        return "logits"


def _worker(rank: int, architecture: str, model_dir: str, port: int) -> None:
    import_sglang()
    from sglang.srt.distributed.parallel_state import init_distributed_environment
    from sglang.srt.layers.pooler import EmbeddingPoolerOutput
    from transformers import AutoConfig

    from sglang_zeroprefill import compat, embedding, launch_server

    server_args = launch_server.prepare(
        ["--model-path", model_dir, "--device", "cpu", "--dtype", "float32", "--is-embedding", "--skip-tokenizer-init"]
    )
    compat.resolve(server_args)
    publish(server_args, rank)
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1)
    initialize_moe_config(server_args)
    initialize_dp_attention(server_args)
    # RotaryEmbedding binds a compiled rope kernel unless SGLang runs its CPU engine (which
    # needs sgl_kernel); no attention runs here, so let it build its torch path.
    import sglang.srt.layers.rotary_embedding.base as rotary

    rotary._is_cpu = True
    if architecture == "qwen3_moe":
        from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM as CausalLM
    else:
        from sglang.srt.models.qwen2_moe import Qwen2MoeForCausalLM as CausalLM
    model = CausalLM(AutoConfig.from_pretrained(model_dir))

    # Stock: no get_embedding keyword, so SGLang's embedding forward fails.
    assert "get_embedding" not in inspect.signature(model.forward).parameters
    assert embedding.lacks_embedding_forward(model)
    with pytest.raises(TypeError, match="get_embedding"):
        model.forward(None, None, None, get_embedding=True)

    embedding.after_maybe_init_dwdp(None, SimpleNamespace(model=model, is_generation=True))
    assert embedding.lacks_embedding_forward(model)  # a generation server keeps the class as it is
    embedding.after_maybe_init_dwdp(None, SimpleNamespace(model=model, is_generation=False))
    assert not embedding.lacks_embedding_forward(model)

    hidden = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(rank))  # two requests: 3 + 5 tokens
    model.model = FinalHiddenStates(hidden)
    batch = SimpleNamespace(extend_seq_lens=torch.tensor([3, 5]), extend_seq_lens_cpu=[3, 5], dimensions=None,
                            return_pooled_hidden_states=False, is_prefill_only=True, token_indices_to_pool=None)
    input_ids, positions = torch.zeros(8, dtype=torch.long), torch.arange(8)
    model.logits_processor = RecordingHead()
    out = model.forward(input_ids, positions, batch, get_embedding=True)
    assert isinstance(out, EmbeddingPoolerOutput)
    expected = torch.nn.functional.normalize(hidden[[2, 7]], dim=-1)  # each request's last token
    torch.testing.assert_close(out.embeddings, expected)
    assert isinstance(model.logits_processor, RecordingHead)  # the head is back after the call
    assert model.forward(input_ids, positions, batch) == "logits"


@pytest.mark.parametrize("architecture", ["qwen3_moe", "qwen2_moe"])
def test_moe_causal_lm_serves_last_token_embeddings(architecture: str, tmp_path: Path) -> None:
    pytest.importorskip("sglang")
    config = TinyMoEConfig(architecture=architecture, num_experts=4, hidden_size=HIDDEN, expert_intermediate_size=16,
                           num_attention_heads=2, num_kv_heads=1, head_dim=16, vocab_size=64,
                           shared_expert_intermediate_size=32)
    (tmp_path / "config.json").write_text(json.dumps(config.hf_config()))
    mp.spawn(_worker, args=(architecture, str(tmp_path), free_port()), nprocs=1, join=True)


def test_a_model_without_moe_layers_is_left_alone() -> None:
    import_sglang()
    from sglang_zeroprefill import embedding

    class DenseCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logits_processor = RecordingHead()

        def forward(self, input_ids, positions, forward_batch):
            return None

    assert not embedding.lacks_embedding_forward(DenseCausalLM())
