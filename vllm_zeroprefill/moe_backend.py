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
never claims a platform. vLLM may detect its platform in the middle of importing its own
modules (0.26: from ``vllm.utils.torch_utils``, half-imported, which ``vllm.config`` needs),
and it swallows a platform plugin's exception: then ``vllm.config`` cannot be imported yet,
and the registration runs the moment ``vllm.config`` has finished importing (a one-shot
import hook), still before any parser exists. The general plugin calls it again (idempotent)
for the Python API ``LLM(..., moe_backend="asyncep")`` and for processes that never detect a
platform.

``VLLM_PLUGINS`` selects which entry points vLLM loads, by name. If it keeps this one but
leaves the general plugin (``zeroprefill``) out, ``asyncep`` would parse and then run as
nothing of ours: the platform plugin makes it fail at start-up instead, naming the fix. If it
leaves both out, vLLM's own parser rejects ``asyncep`` as an invalid choice.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Annotated, Literal, get_args, get_origin

from vllm_zeroprefill.compat import clear_cli_argument_cache

ASYNCEP = "asyncep"
#: The ``vllm.general_plugins`` entry point's name (pyproject.toml), as VLLM_PLUGINS lists it.
GENERAL_PLUGIN_NAME = "zeroprefill"


def _moe_backend_literal(annotation):
    """The ``Literal`` of the field's annotation (ours may wrap it in ``Annotated``)."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def register_moe_backend(refusal: str | None = None) -> None:
    """Add ``asyncep`` to ``KernelConfig.moe_backend``'s accepted values (idempotent).

    With ``refusal``, the value still parses but a ``KernelConfig`` refuses to hold it, with
    that message, before any worker starts: when built (an ``AfterValidator`` in the field's
    ``Annotated`` type, which pydantic applies and vLLM's argument parser looks through) and
    when assigned (``EngineArgs.create_engine_config`` sets the flag on a copy of the config,
    which pydantic does not validate).
    """
    from pydantic import AfterValidator
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config.kernel import KernelConfig

    current = KernelConfig.__dataclass_fields__["moe_backend"].type
    literal = _moe_backend_literal(current)
    choices = get_args(literal)
    refused = get_origin(current) is Annotated
    if ASYNCEP in choices and (refusal is None or refused):
        return
    widened = literal if ASYNCEP in choices else Literal[(*choices, ASYNCEP)]  # type: ignore[valid-type]
    annotation = widened if refusal is None else Annotated[widened, AfterValidator(_refuser(refusal))]
    KernelConfig.__dataclass_fields__["moe_backend"].type = annotation
    KernelConfig.__annotations__["moe_backend"] = annotation
    KernelConfig.__pydantic_fields__["moe_backend"].annotation = annotation
    rebuild_dataclass(KernelConfig, force=True)

    clear_cli_argument_cache()
    if refusal is not None:
        from vllm_zeroprefill.errors import install_one_line_errors

        _refuse_assignment(KernelConfig, refusal)
        install_one_line_errors()


def _refuser(message: str):
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    def refuse(value: str) -> str:
        if value == ASYNCEP:
            raise AsyncEPConfigError(message)
        return value

    return refuse


def _refuse_assignment(kernel_config_cls: type, message: str) -> None:
    refuse = _refuser(message)
    vllm_setattr = kernel_config_cls.__setattr__

    def setattr_refusing_asyncep(self, name: str, value) -> None:
        if name == "moe_backend":
            refuse(value)
        vllm_setattr(self, name, value)

    kernel_config_cls.__setattr__ = setattr_refusing_asyncep


def general_plugin_excluded(environ: Mapping[str, str] = os.environ) -> str | None:
    """The start-up error to give if ``VLLM_PLUGINS`` leaves the general plugin out, else ``None``."""
    allowed = environ.get("VLLM_PLUGINS")
    if allowed is None or GENERAL_PLUGIN_NAME in allowed.split(","):
        return None
    return (
        f"--moe-backend asyncep needs vLLM to load the {GENERAL_PLUGIN_NAME!r} plugin, but "
        f"VLLM_PLUGINS={allowed!r} leaves it out: add {GENERAL_PLUGIN_NAME} to VLLM_PLUGINS"
    )


def platform_plugin() -> None:
    """``vllm.platform_plugins`` entry point: register the CLI value, claim no platform."""
    refusal = general_plugin_excluded()
    try:
        register_moe_backend(refusal=refusal)
    except ImportError:  # vLLM is detecting its platform mid-import (module docstring)
        run_after_import("vllm.config", lambda: register_moe_backend(refusal=refusal))
    return None


def run_after_import(module_name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` once, right after ``module_name`` next finishes importing.

    For a module not (or no longer, after a failed import) in ``sys.modules``: a one-shot
    ``sys.meta_path`` finder wraps the loader the other finders return.
    """
    if module_name in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _PostImportFinder(module_name, callback))


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, module_name: str, callback: Callable[[], None]) -> None:
        self.module_name, self.callback = module_name, callback

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name: str):  # resource readers, is_package, ...: the real loader's
        return getattr(self.loader, name)
