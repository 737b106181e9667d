"""Launch flags: ``--moe-a2a-backend asyncep`` and ``--load-balance-method zeroprefill``.

SGLang's argument parser has no adder for either flag's choices, so an ``AFTER`` hook on
``ServerArgs.add_cli_args`` appends ours to the two argparse actions. The values are then
turned into SGLang's own terms by two resolution steps that take the place of SGLang's own
(:func:`sglang_zeroprefill.compat.resolution_step` says where each release runs them):

- DWDP's step (it runs before CUDA-graph and data-parallel resolution, where DWDP forces its
  layout): when ``moe_a2a_backend == "asyncep"`` we check the layout and declare what AsyncEP
  runs on, in SGLang's terms — ``moe_a2a_backend="none"`` (the :class:`StandardDispatcher`,
  which moves no tokens) and, over several attention-DP ranks, ``moe_dense_tp_size=1`` and
  ``enable_dp_lm_head`` (dense parts stay data-parallel) — and mark the process environment so
  every SGLang subprocess (scheduler, DP controller) knows AsyncEP is on, the way DWDP sets
  ``SGLANG_SCHEDULER_SKIP_ALL_GATHER``. Unlike DWDP we keep CUDA graphs
  (:mod:`sglang_zeroprefill.cuda_graphs`) and do *not* skip the scheduler's DP all-gather:
  collective transports need every attention-DP rank to step together, so SGLang's idle
  batches are kept. On one GPU AsyncEP has nothing to stream and runs every expert locally.
- The load-balance method's step: ``zeroprefill`` becomes SGLang's ``round_robin`` (the
  fallback its DP controller builds) plus an environment mark; the controller's dispatch is
  then replaced by :mod:`sglang_zeroprefill.load_balance`. With one DP rank SGLang starts no
  DP controller, which the step says in the log.

Every unsupported combination fails during resolution with one line naming the flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from sglang_zeroprefill import compat
from zeroprefill.common.asyncep_model import AsyncEPConfigError, check_settings
from zeroprefill.common.model_spec import FP8_WEIGHT_BLOCK

logger = logging.getLogger(__name__)

ASYNCEP_BACKEND = "asyncep"
ZEROPREFILL_LOAD_BALANCE = "zeroprefill"

#: Set (to "1") in the launching process during resolution; inherited by SGLang's subprocesses.
ASYNCEP_ENV = "ZEROPREFILL_SGLANG_ASYNCEP"
LOAD_BALANCE_ENV = "ZEROPREFILL_SGLANG_LOAD_BALANCE"

#: The module ``python -m`` runs for our launcher (it loads plugins in the children it spawns).
LAUNCHER_MODULE = "sglang_zeroprefill.launch_server"

#: The experts ``--moe-a2a-backend asyncep`` serves, as the refusals name them.
SUPPORTED_EXPERTS = (
    f"unquantized experts and block-FP8 ones ({FP8_WEIGHT_BLOCK}x{FP8_WEIGHT_BLOCK} weight_block_size, "
    "as Qwen3-*-FP8 ship)"
)

_FLAG_CHOICES = {
    "--moe-a2a-backend": ASYNCEP_BACKEND,
    "--load-balance-method": ZEROPREFILL_LOAD_BALANCE,
}


def asyncep_enabled() -> bool:
    """Whether this process serves with ``--moe-a2a-backend asyncep``."""
    return os.environ.get(ASYNCEP_ENV) == "1"


def zeroprefill_load_balance_enabled() -> bool:
    """Whether this process's DP controller dispatches with the zeroprefill policy."""
    return os.environ.get(LOAD_BALANCE_ENV) == "1"


def add_choices(parser: argparse.ArgumentParser) -> None:
    """Append ``asyncep`` / ``zeroprefill`` to the choices of SGLang's two flags."""
    for action in parser._actions:
        for option in action.option_strings:
            value = _FLAG_CHOICES.get(option)
            if value is not None and action.choices is not None and value not in action.choices:
                action.choices = [*action.choices, value]
                action.help = f"{action.help} ({value!r}: added by sglang_zeroprefill)"


def add_choices_after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    """``HookType.AFTER`` hook on ``ServerArgs.add_cli_args``."""
    add_choices(parser)
    return result


def check_sglang_release() -> None:
    """Raise :class:`AsyncEPConfigError` outside the SGLang releases the plugin was read against."""
    message = compat.unsupported_sglang_message(compat.installed_sglang_version())
    if message is not None:
        raise AsyncEPConfigError(message)


# -- resolution steps -------------------------------------------------------------------------


def handle_asyncep(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Resolution step at DWDP's position: validate and lower ``asyncep``."""
    cfg = compat.resolving_view(server_args)
    if cfg.moe_a2a_backend != ASYNCEP_BACKEND:
        previous(server_args)
        return
    check_sglang_release()
    check_settings()  # a bad ZEROPREFILL_* setting fails here, not in a scheduler process
    ranks = check_asyncep_layout(cfg)
    dense_data_parallel = {"moe_dense_tp_size": 1, "enable_dp_lm_head": True} if ranks > 1 else {}
    compat.declare(server_args, "_zeroprefill_asyncep", moe_a2a_backend="none", **dense_data_parallel)
    os.environ[ASYNCEP_ENV] = "1"
    previous(server_args)
    if ranks == 1:
        logger.info("ZeRO-Prefill AsyncEP on one GPU: every expert is local, nothing is streamed "
                    "(moe_a2a_backend=none underneath)")
    else:
        logger.info(
            "ZeRO-Prefill AsyncEP: %d attention-DP ranks, each storing 1/%d of every MoE layer's experts; "
            "tokens stay on their rank (moe_a2a_backend=none underneath); CUDA graph launches wait for "
            "the weight stream", ranks, cfg.ep_size,
        )


def check_asyncep_layout(cfg: Any) -> int:
    """The attention-DP ranks AsyncEP runs on; :class:`AsyncEPConfigError` for a layout it does not run."""
    n = compat.attention_dp_size(cfg)
    if cfg.tp_size != n:
        raise AsyncEPConfigError(
            f"--moe-a2a-backend asyncep needs one GPU per attention-DP rank: --tp-size {cfg.tp_size} must equal "
            f"the attention-DP size {n} (for {cfg.tp_size} GPUs pass {compat.attention_dp_flags(cfg.tp_size)})"
        )
    if cfg.ep_size != n:
        raise AsyncEPConfigError(
            f"--moe-a2a-backend asyncep shards every MoE layer's experts over the {n} attention-DP "
            f"rank(s): pass --ep-size {n} (got --ep-size {cfg.ep_size})"
        )
    unsupported = [
        (cfg.dwdp_size > 1, f"--dwdp-size {cfg.dwdp_size}", "AsyncEP replaces DWDP; drop --dwdp-size"),
        (cfg.pp_size != 1, f"--pp-size {cfg.pp_size}", "use --pp-size 1"),
        (cfg.quantization not in (None, "fp8"), f"--quantization {cfg.quantization}",
         f"AsyncEP serves {SUPPORTED_EXPERTS}; a block-FP8 checkpoint needs no --quantization (or fp8)"),
        (cfg.enable_eplb, "--enable-eplb", "AsyncEP runs every expert on every rank; expert "
         "load balancing has nothing to move"),
        (cfg.ep_num_redundant_experts != 0, f"--ep-num-redundant-experts {cfg.ep_num_redundant_experts}",
         "AsyncEP needs no redundant experts"),
        (cfg.speculative_algorithm is not None, f"--speculative-algorithm {cfg.speculative_algorithm}",
         "AsyncEP serves prefill-only work (no decoding)"),
        (cfg.enable_two_batch_overlap, "--enable-two-batch-overlap",
         "the weight stream already overlaps compute; drop the flag"),
        (cfg.disaggregation_mode not in ("null", "prefill"), f"--disaggregation-mode {cfg.disaggregation_mode}",
         "AsyncEP runs prefill: use null or prefill"),
        (cfg.moe_runner_backend not in ("auto", "triton"), f"--moe-runner-backend {cfg.moe_runner_backend}",
         "AsyncEP computes experts with zeroprefill.kernels; leave --moe-runner-backend auto"),
    ]
    for bad, flag, advice in unsupported:
        if bad:
            raise AsyncEPConfigError(f"--moe-a2a-backend asyncep does not support {flag}: {advice}")
    return n


def handle_zeroprefill_load_balance(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Resolution step at the load-balance method's position."""
    cfg = compat.resolving_view(server_args)
    if cfg.load_balance_method != ZEROPREFILL_LOAD_BALANCE:
        previous(server_args)
        return
    check_sglang_release()
    if cfg.disaggregation_mode == "prefill":
        raise AsyncEPConfigError(
            "--load-balance-method zeroprefill does not support --disaggregation-mode prefill: "
            "PD prefill servers must follow the bootstrap room (use --load-balance-method auto)"
        )
    ranks = compat.dp_rank_count(cfg)
    if ranks > 1 and not compat.dp_controller_loads_plugins() and not launched_by_our_launcher():
        raise AsyncEPConfigError(
            f"--load-balance-method zeroprefill: SGLang {compat.installed_sglang_version()} starts its DP "
            f"controller without plugins; start the server with python -m {LAUNCHER_MODULE}"
        )
    compat.declare(server_args, "_zeroprefill_load_balance", load_balance_method="round_robin")
    os.environ[LOAD_BALANCE_ENV] = "1"
    previous(server_args)
    if ranks == 1:
        logger.warning(
            "--load-balance-method zeroprefill with one DP rank: SGLang starts no DP controller, so every "
            "request goes to that rank and the zeroprefill policy has nothing to choose (it routes from 2 ranks)"
        )
    else:
        logger.info("--load-balance-method zeroprefill: SGLang's DP controller dispatches over %d ranks "
                    "with the zeroprefill policy", ranks)


def launched_by_our_launcher() -> bool:
    """Whether this process runs ``python -m sglang_zeroprefill.launch_server``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == LAUNCHER_MODULE
