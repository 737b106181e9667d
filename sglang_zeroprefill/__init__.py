"""ZeRO-Prefill for SGLang: ``--moe-a2a-backend asyncep`` and ``--load-balance-method zeroprefill``.

:func:`register` is the ``sglang.srt.plugins`` entry point. SGLang's ``load_plugins()`` calls
it before arguments are parsed, in every process that loads plugins (launcher, schedulers, and
from SGLang 0.5.22 the DP controller; our launcher covers the controller of earlier releases).
It registers hooks only; the AsyncEP and load-balancing hooks are inert unless their flag was
resolved (see ``args.py``), and the embedding hook acts only on MoE causal LMs served with
``--is-embedding``. Which SGLang seam each hook uses, and why, is in ``README.md`` beside this
file; how each SGLang release spells them, in ``compat.py``.
"""

from __future__ import annotations

from sglang_zeroprefill.args import ASYNCEP_BACKEND, ZEROPREFILL_LOAD_BALANCE
from sglang_zeroprefill.compat import Hook

__all__ = ["ASYNCEP_BACKEND", "ZEROPREFILL_LOAD_BALANCE", "register", "plugin_hooks", "verify_hooks"]

_FUSED_MOE = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE"
_MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
_DP_CONTROLLER = "sglang.srt.managers.data_parallel_controller.DataParallelController"

_registered_hooks: list[Hook] | None = None


def plugin_hooks() -> list[Hook]:
    """The plugin's ``HookRegistry`` hooks on the installed SGLang, resolution steps aside."""
    from sglang_zeroprefill import args, compat, cuda_graphs, embedding, load_balance, moe

    hooks = [Hook("sglang.srt.server_args.ServerArgs.add_cli_args", "after", args.add_choices_after_add_cli_args)]
    hooks += [Hook(target, "around", moe.always_true_when_asyncep) for target in compat.moe_input_stays_local_targets()]
    hooks.append(Hook(compat.experts_output_complete_target(), "around", moe.always_true_when_asyncep))
    hooks += [
        Hook(f"{_FUSED_MOE}.__init__", "after", moe.after_fused_moe_init),
        Hook(f"{_FUSED_MOE}.run_moe_core", "around", moe.run_moe_core_around),
        # DWDP's set-up point, after the weights are loaded and before any graph is captured.
        Hook(f"{_MODEL_RUNNER}.maybe_init_dwdp", "after", moe.after_maybe_init_dwdp),
        Hook(f"{_MODEL_RUNNER}.maybe_init_dwdp", "after", embedding.after_maybe_init_dwdp),
        Hook(f"{_DP_CONTROLLER}.__init__", "after", load_balance.after_controller_init),
    ]
    for backend in compat.CUDA_GRAPH_BACKENDS:
        hooks += [
            Hook(f"{backend}.capture_one", "before", cuda_graphs.order_after_weight_stream),
            Hook(f"{backend}.replay", "before", cuda_graphs.order_after_weight_stream),
        ]
    return hooks


def register() -> None:
    """Register our resolution steps and hooks with SGLang (idempotent)."""
    global _registered_hooks
    if _registered_hooks is not None:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_zeroprefill import args, compat

    # Our resolution steps go to the release's public seam where it has one, else are hooks too.
    steps = [
        compat.resolution_step("handle_dwdp", args.handle_asyncep),
        compat.resolution_step("handle_load_balance_method", args.handle_zeroprefill_load_balance),
    ]
    hooks = [step for step in steps if step is not None] + plugin_hooks()
    for hook in hooks:
        HookRegistry.register(hook.target, hook.fn, HookType(hook.kind))
    _registered_hooks = hooks


def verify_hooks() -> None:
    """Raise if SGLang did not apply one of our hooks (it only logs such failures)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_zeroprefill import compat

    missing = sorted({hook.target for hook in _registered_hooks or ()} - HookRegistry._patched)
    if missing or _registered_hooks is None:
        raise RuntimeError(
            f"sglang_zeroprefill: SGLang {compat.installed_sglang_version()} did not apply hooks on "
            f"{missing or 'any target (register() was not called)'}; the plugin supports SGLang "
            f"{compat.supported_range_text()}"
        )
