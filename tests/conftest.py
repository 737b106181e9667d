"""Test-session set-up shared by every test module.

Without CUDA, Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before ``zeroprefill.kernels`` is first imported, since the kernels read it at import time. A
conftest runs before pytest imports any test module, so the setting holds whatever order the
modules are collected in (and it reaches the server and rank processes the tests start).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
