"""SGLang's real classes on a CPU test machine, for any supported release (0.5.17 - 0.5.23).

Importing: SGLang's argument resolution imports ``sglang.srt.configs``, whose multimodal
configs (``internvl_utils``, ``deepseek_ocr``) import ``torchvision`` at module level. The
default environment has no torchvision (the builds available are for another torch and break
``import vllm``, Makefile), and the two modules only use it inside image-preprocessing
functions that these tests never call. So :func:`import_sglang` pre-imports that package with a
two-attribute ``torchvision`` stand-in in ``sys.modules`` and removes it again, after pinning
transformers' "torchvision available?" check to its real answer (False) so transformers never
sees the stand-in. Where torchvision is installed (``make test-sglang-cpu``: SGLang 0.5.17
imports it at ``import sglang``), the real one is used.

Under ``make test-sglang-cpu`` torch is a CUDA build (PyPI has no CPU build of the torch
SGLang 0.5.17 pins) on a machine without a GPU: it still ships an NCCL library, which SGLang
would then load for the gloo ranks' groups. :func:`import_sglang` points SGLang's
``SGLANG_NCCL_SO_PATH`` at no library, which SGLang reads as "no GPU", as under a CPU torch.

Setting up a rank as a scheduler does differs between releases in four test-only ways, kept
here: :func:`publish` (rank placement is an argument from 0.5.21),
:func:`initialize_model_parallel` (the widths are arguments up to 0.5.20, read from the published
configuration later), :func:`initialize_dp_attention` (it takes the model config up to 0.5.20)
and :func:`initialize_moe_config` (0.5.17 - 0.5.18 take the server arguments).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import os
import sys
import types
from typing import Any

import pytest

_STANDIN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def import_sglang() -> None:
    """Import SGLang and its model configs (skips the test module if SGLang is absent)."""
    pytest.importorskip("sglang")
    if "sglang.srt.configs" in sys.modules:
        return
    import torch

    if torch.version.cuda is not None and not torch.cuda.is_available():
        os.environ.setdefault("SGLANG_NCCL_SO_PATH", "no-nccl-on-a-machine-without-gpus.so")
    from transformers.utils import import_utils

    if import_utils.is_torchvision_available():
        importlib.import_module("sglang.srt.configs")
        return
    modules = {name: types.ModuleType(name) for name in _STANDIN}
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    for name in ("torchvision.transforms", "torchvision.transforms.functional"):
        modules[name].InterpolationMode = _InterpolationMode
    sys.modules.update(modules)
    try:
        importlib.import_module("sglang.srt.configs")
    finally:
        for name in _STANDIN:
            sys.modules.pop(name, None)


def sglang_version() -> str:
    import sglang

    return str(sglang.__version__)


def publish(server_args: Any, rank: int) -> None:
    """Publish ``server_args`` in this process as rank ``rank``'s scheduler would."""
    from sglang.srt import runtime_context

    if "ranks" in inspect.signature(runtime_context.publish).parameters:
        runtime_context.publish(server_args, role="test", ranks=runtime_context.SpawnRanks(world_rank=rank))
    else:
        runtime_context.publish(server_args, role="test")


def initialize_model_parallel(ranks: int) -> None:
    """SGLang's parallel groups for ``ranks`` GPUs of attention DP = TP = EP."""
    from sglang.srt.distributed import parallel_state

    if "tensor_model_parallel_size" in inspect.signature(parallel_state.initialize_model_parallel).parameters:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=ranks, expert_model_parallel_size=ranks, attention_data_parallel_size=ranks
        )
    else:
        parallel_state.initialize_model_parallel()


def initialize_dp_attention(server_args: Any) -> None:
    from sglang.srt.layers import dp_attention

    if "model_config" in inspect.signature(dp_attention.initialize_dp_attention).parameters:
        from sglang.srt.configs.model_config import ModelConfig

        dp_attention.initialize_dp_attention(server_args, ModelConfig.from_server_args(server_args))
    else:
        dp_attention.initialize_dp_attention(server_args)


def initialize_moe_config(server_args: Any) -> None:
    from sglang.srt.layers.moe import utils

    if inspect.signature(utils.initialize_moe_config).parameters:
        utils.initialize_moe_config(server_args)
    else:
        utils.initialize_moe_config()
