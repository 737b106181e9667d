"""Make ``asyncep`` a value of vLLM's ``--moe-backend`` / ``KernelConfig.moe_backend``.

vLLM spells the accepted MoE backends as one ``Literal`` (``vllm.config.kernel.MoEBackend``)
and reads it in two places:

- ``EngineArgs.add_cli_args`` turns the type of the ``KernelConfig.moe_backend`` dataclass
  field into argparse ``choices`` (``get_kwargs`` -> ``_compute_kwargs``, an LRU cache);
- pydantic validates ``KernelConfig`` (and ``--kernel-config '{"moe_backend": ...}'``)
  against the schema it built from the same annotation.

:func:`register_moe_backend` widens that one field's type to ``MoEBackend | "asyncep"`` and
rebuilds the pydantic schema, so both readers accept the new value and every other value
keeps its meaning. It must run before the CLI parser is built, which is why it is wired as a
``vllm.platform_plugins`` entry point (vLLM runs those while it detects the platform, which
happens on import of the engine arguments, before ``add_cli_args``); it returns ``None`` so it
never claims a platform. The general plugin calls it again (idempotent) for the Python API
``LLM(..., moe_backend="asyncep")`` and for processes that never detect a platform.
"""

from __future__ import annotations

from typing import Literal, get_args

ASYNCEP = "asyncep"


def _moe_backend_field_choices() -> tuple[str, ...]:
    from vllm.config.kernel import KernelConfig

    return get_args(KernelConfig.__dataclass_fields__["moe_backend"].type)


def register_moe_backend() -> None:
    """Add ``asyncep`` to ``KernelConfig.moe_backend``'s accepted values (idempotent)."""
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config.kernel import KernelConfig

    choices = _moe_backend_field_choices()
    if ASYNCEP in choices:
        return
    widened = Literal[(*choices, ASYNCEP)]  # type: ignore[valid-type]
    KernelConfig.__dataclass_fields__["moe_backend"].type = widened
    KernelConfig.__annotations__["moe_backend"] = widened
    KernelConfig.__pydantic_fields__["moe_backend"].annotation = widened
    rebuild_dataclass(KernelConfig, force=True)

    from vllm.engine import arg_utils

    arg_utils._compute_kwargs.cache_clear()


def platform_plugin() -> None:
    """``vllm.platform_plugins`` entry point: register the CLI value, claim no platform."""
    register_moe_backend()
    return None
