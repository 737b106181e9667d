"""ZeRO-Prefill for SGLang: ``--moe-a2a-backend asyncep`` and ``--load-balance-method zeroprefill``.

:func:`register` is the ``sglang.srt.plugins`` entry point. SGLang's ``load_plugins()`` calls
it in every process (launcher, DP controller, schedulers) before arguments are parsed; it
registers hooks only, and each hook is inert unless its flag was resolved (see ``args.py``).
Which SGLang seam each hook uses, and why, is in ``README.md`` beside this file.
"""

from __future__ import annotations

from sglang_zeroprefill.args import ASYNCEP_BACKEND, ZEROPREFILL_LOAD_BALANCE

__all__ = ["ASYNCEP_BACKEND", "ZEROPREFILL_LOAD_BALANCE", "register", "HOOK_TARGETS"]

_MOE_UTILS = "sglang.srt.layers.moe.utils"
_FUSED_MOE = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE"

#: Every SGLang function or method we hook, and how (checked by ``verify_hooks``).
HOOK_TARGETS: dict[str, str] = {
    "sglang.srt.server_args.ServerArgs.add_cli_args": "after",
    f"{_MOE_UTILS}.is_moe_input_scattered_across_dp_ranks": "around",
    f"{_MOE_UTILS}.post_experts_output_is_complete": "around",
    f"{_FUSED_MOE}.__init__": "after",
    f"{_FUSED_MOE}.run_moe_core": "around",
    "sglang.srt.model_executor.model_runner.ModelRunner.maybe_init_dwdp": "after",
    "sglang.srt.managers.data_parallel_controller.DataParallelController.__init__": "after",
}

_registered = False


def register() -> None:
    """Register our resolution steps and hooks with SGLang (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_zeroprefill import args, load_balance, moe

    register_resolution_hook("handle_dwdp")(args.handle_asyncep)
    register_resolution_hook("handle_load_balance_method")(args.handle_zeroprefill_load_balance)

    hooks = {
        "sglang.srt.server_args.ServerArgs.add_cli_args": args.add_choices_after_add_cli_args,
        f"{_MOE_UTILS}.is_moe_input_scattered_across_dp_ranks": moe.always_true_when_asyncep,
        f"{_MOE_UTILS}.post_experts_output_is_complete": moe.always_true_when_asyncep,
        f"{_FUSED_MOE}.__init__": moe.after_fused_moe_init,
        f"{_FUSED_MOE}.run_moe_core": moe.run_moe_core_around,
        "sglang.srt.model_executor.model_runner.ModelRunner.maybe_init_dwdp": moe.after_maybe_init_dwdp,
        "sglang.srt.managers.data_parallel_controller.DataParallelController.__init__": load_balance.after_controller_init,
    }
    kinds = {"after": HookType.AFTER, "around": HookType.AROUND}
    for target, hook in hooks.items():
        HookRegistry.register(target, hook, kinds[HOOK_TARGETS[target]])
    _registered = True


def verify_hooks() -> None:
    """Raise if SGLang did not apply one of our hooks (it only logs such failures)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = sorted(target for target in HOOK_TARGETS if target not in HookRegistry._patched)
    if missing:
        raise RuntimeError(
            f"sglang_zeroprefill: SGLang did not apply hooks on {missing}; this SGLang version "
            "differs from the one the plugin was written against (0.5.23)"
        )
