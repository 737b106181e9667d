"""The SGLang releases this plugin supports, and how each spells the APIs the plugin touches.

Read for this module: the source of SGLang 0.5.17 (the newest release that pins the torch 2.11
of the project's GPU machines) and 0.5.23 (the newest on PyPI when this was written), and every
seam below in each release between; the plugin's tests pass on 0.5.17, 0.5.19, 0.5.21 and 0.5.23
(``make test-sglang-cpu SGLANG=...``). Where the releases differ, the API is detected here by
its presence, never by the version number; everything else the plugin uses is the same in all
seven (the plugin framework ``sglang.srt.plugins`` with ``HookRegistry``,
``ServerArgs.add_cli_args``, ``FusedMoE.__init__`` / ``run_moe_core``, ``StandardDispatcher``,
``ModelRunner.maybe_init_dwdp``, ``DataParallelController.__init__`` and its ``dispatching`` /
``load_snapshot_reader`` / ``maybe_external_dp_rank_routing``, ``sglang.srt.layers.pooler``, and
the CUDA-graph backends' ``capture_one`` / ``replay``, see :data:`CUDA_GRAPH_BACKENDS`).

What differs, per seam the plugin uses (the Python names are SGLang's):

- **Where our resolution steps run** (``asyncep`` at DWDP's step, ``zeroprefill`` at the
  load-balance method's): 0.5.17 - 0.5.18 run the methods ``ServerArgs._handle_dwdp`` /
  ``_handle_load_balance_method`` from ``__post_init__``; 0.5.19's pipeline calls the
  functions ``parallel_hook.handle_dwdp`` / ``serving_hook.handle_load_balance_method``;
  0.5.20+ have the public ``register_resolution_hook(name)``. :func:`resolution_step`.
- **Reading and deciding fields mid-resolution**: ``resolving_view`` and ``declare_resolution``
  from 0.5.19; before, ``resolved_view`` and plain assignment (what DWDP's step does there).
  :func:`resolving_view`, :func:`declare`.
- **When resolution runs**: at construction, inside ``prepare_server_args`` (0.5.17 - 0.5.18);
  ``ServerArgs.resolve_once()`` from ``run_server`` (0.5.19+). :func:`resolve`.
- **Attention DP**: ``--dp-size N --enable-dp-attention`` up to 0.5.21; ``--attn-dp-size N``,
  a record field, from 0.5.22 (the old spelling still resolves to it).
  :func:`attention_dp_size`, :func:`dp_rank_count`, :func:`attention_dp_flags`.
- **No DP gather before the experts**: decoder layers ask ``communicator.enable_dwdp()``
  (``LayerScatterModes``, 0.5.17 - 0.5.20) and ``moe.utils.is_moe_input_scattered_across_
  dp_ranks()`` (0.5.19+; the layer boundaries from 0.5.21). :func:`moe_input_stays_local_targets`.
- **No EP / TP sum after the experts**: MoE blocks (Qwen2/3-MoE among them) ask
  ``moe.utils.should_skip_post_experts_all_reduce(is_tp_path)`` (0.5.17 - 0.5.20); from 0.5.21
  that defers to ``post_experts_output_is_complete(is_tp_path)``, which other helpers also
  read directly, so that one is the seam there. :func:`experts_output_complete_target`.
- **A draft model's MoE layer**: ``FusedMoE.is_draft`` only in 0.5.23 (AsyncEP rejects
  speculative decoding, so an unmarked layer is never a draft's). :func:`is_draft_layer`.
- **The DP controller process loads plugins** itself from 0.5.22; before, the controller is
  spawned without them, and our launcher loads them in every child it spawns.
  :func:`dp_controller_loads_plugins`.

- **The pass's token counts per attention-DP rank** (what the switch between streaming weights
  and moving tokens reads): ``layers.dp_attention.get_dp_global_num_tokens()`` in every release,
  set before each forward (eager or a graph capture) with DP attention. :func:`pass_max_tokens`.

Not used: ``register_moe_runner_core`` (0.5.19+): AsyncEP replaces the token exchange, not the
expert kernel runner, so it hooks ``run_moe_core`` in every release. Missing in all seven: a
``get_embedding`` keyword on the MoE causal LMs (:mod:`sglang_zeroprefill.embedding` adds it).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from zeroprefill.supported_range import SupportedRange

#: [first supported, first unsupported): the releases read for this module.
SUPPORTED_SGLANG = SupportedRange(Version("0.5.17"), Version("0.5.24"))

#: A resolution step: ``fn(server_args, previous)``; ``previous(server_args)`` runs SGLang's own step.
ResolutionStep = Callable[[Any, Callable[[Any], None]], None]

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_MOE_UTILS = "sglang.srt.layers.moe.utils"
_COMMUNICATOR = "sglang.srt.layers.communicator"
_RUNNER_BACKEND = "sglang.srt.model_executor.runner_backend"

#: SGLang's CUDA-graph backends; each captures with ``capture_one`` and launches with ``replay``.
CUDA_GRAPH_BACKENDS = (
    f"{_RUNNER_BACKEND}.full_cuda_graph_backend.FullCudaGraphBackend",
    f"{_RUNNER_BACKEND}.breakable_cuda_graph_backend.BreakableCudaGraphBackend",
    f"{_RUNNER_BACKEND}.tc_piecewise_cuda_graph_backend.TcPiecewiseCudaGraphBackend",
)

#: Where releases before the public resolution hooks run each step we take over (0.5.19's
#: pipeline imports the step function when it runs it, so a hook on the module attribute holds).
_PIPELINE_STEP_FUNCTIONS = {
    "handle_dwdp": "sglang.srt.arg_groups.parallel_hook.handle_dwdp",
    "handle_load_balance_method": "sglang.srt.arg_groups.serving_hook.handle_load_balance_method",
}


@dataclass(frozen=True)
class Hook:
    """One ``HookRegistry`` hook: the dotted target, ``"before"`` / ``"after"`` / ``"around"``, the function."""

    target: str
    kind: str
    fn: Callable[..., Any]


# -- the supported releases -------------------------------------------------------------------


def supported_range_text() -> str:
    return SUPPORTED_SGLANG.text()


def installed_sglang_version() -> str:
    import sglang

    return str(sglang.__version__)


def unsupported_sglang_message(version: str) -> str | None:
    """``None`` if ``version`` is supported, else the one-line start-up error to show."""
    return SUPPORTED_SGLANG.unsupported_message(
        version, engine="SGLang", subject="sglang_zeroprefill",
        remedy="install a release in that range or serve without --moe-a2a-backend asyncep / "
               "--load-balance-method zeroprefill")


# -- argument resolution ----------------------------------------------------------------------


def resolution_step(step: str, fn: ResolutionStep) -> Hook | None:
    """Run ``fn(server_args, previous)`` in place of SGLang's resolution step ``step``.

    ``step``: ``"handle_dwdp"`` or ``"handle_load_balance_method"``. Where the release has the
    public seam (0.5.20+) ``fn`` is registered there and ``None`` returned; otherwise the
    ``HookRegistry`` hook to register is returned: around the pipeline's step function (0.5.19)
    or the ``ServerArgs`` method ``__post_init__`` calls (0.5.17 - 0.5.18).
    """
    try:
        from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    except ImportError:
        pass
    else:
        register_resolution_hook(step)(fn)
        return None
    from sglang.srt.server_args import ServerArgs

    target = f"{_SERVER_ARGS}._{step}" if hasattr(ServerArgs, f"_{step}") else _PIPELINE_STEP_FUNCTIONS[step]

    def around(original: Callable[[Any], None], server_args: Any) -> None:
        fn(server_args, original)

    return Hook(target, "around", around)


def resolving_view(server_args: Any) -> Any:
    """The configuration as resolved so far (read-only), for a resolution step to read."""
    from sglang.srt.arg_groups import overrides

    view = getattr(overrides, "resolving_view", None) or overrides.resolved_view
    return view(server_args)


def declare(server_args: Any, source: str, **fields: Any) -> None:
    """Decide ``fields`` in a resolution step, the way the release's own steps do."""
    from sglang.srt.arg_groups import overrides

    declare_resolution = getattr(overrides, "declare_resolution", None)
    if declare_resolution is not None:
        declare_resolution(server_args, source, **fields)
        return
    for name, value in fields.items():  # 0.5.17 - 0.5.18: steps assign inside __post_init__
        setattr(server_args, name, value)


def resolve(server_args: Any) -> None:
    """Finish resolving ``server_args`` as ``run_server`` does (0.5.17 - 0.5.18: already done)."""
    resolve_once = getattr(server_args, "resolve_once", None)
    if resolve_once is not None:
        resolve_once()


def _server_args_fields() -> frozenset[str]:
    from sglang.srt.server_args import ServerArgs

    struct_fields = getattr(ServerArgs, "__struct_fields__", None)  # a msgspec record
    if struct_fields is not None:
        return frozenset(struct_fields)
    return frozenset(field.name for field in dataclasses.fields(ServerArgs))


def has_attn_dp_size_flag() -> bool:
    """Whether the release spells attention DP ``--attn-dp-size N`` (0.5.22+)."""
    return "attn_dp_size" in _server_args_fields()


def attention_dp_size(cfg: Any) -> int:
    """Attention-DP ranks of a configuration being resolved."""
    if has_attn_dp_size_flag():
        return cfg.attn_dp_size
    return cfg.dp_size if cfg.enable_dp_attention else 1


def dp_rank_count(cfg: Any) -> int:
    """DP ranks SGLang's DP controller dispatches to (it starts none for one)."""
    if has_attn_dp_size_flag():
        return cfg.dp_size * cfg.attn_dp_size
    return cfg.dp_size


def attention_dp_flags(ranks: int) -> str:
    """How to ask this release for ``ranks`` attention-DP ranks."""
    return f"--attn-dp-size {ranks}" if has_attn_dp_size_flag() else f"--dp-size {ranks} --enable-dp-attention"


# -- model-level MoE helpers ------------------------------------------------------------------


def _existing(candidates: list[str]) -> list[str]:
    """The dotted names among ``candidates`` that this release defines."""
    found = []
    for target in candidates:
        module_name, name = target.rsplit(".", 1)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # the module is not in this release (0.5.21+ have no layers.communicator)
            raise
        if hasattr(module, name):
            found.append(target)
    return found


def moe_input_stays_local_targets() -> list[str]:
    """The helpers a decoder layer asks whether MoE input stays on its DP rank (no DP gather)."""
    return _existing([f"{_MOE_UTILS}.is_moe_input_scattered_across_dp_ranks", f"{_COMMUNICATOR}.enable_dwdp"])


def experts_output_complete_target() -> str:
    """The helper a MoE block asks whether its experts' output still owes an EP / TP sum."""
    newer = _existing([f"{_MOE_UTILS}.post_experts_output_is_complete"])
    return newer[0] if newer else f"{_MOE_UTILS}.should_skip_post_experts_all_reduce"


# -- layers and processes ---------------------------------------------------------------------


def is_draft_layer(fused_moe: Any) -> bool:
    """Whether a ``FusedMoE`` belongs to a speculative draft model (unmarked before 0.5.23)."""
    return bool(getattr(fused_moe, "is_draft", False))


def dp_controller_loads_plugins() -> bool:
    """Whether SGLang's DP controller process loads plugins itself (0.5.22+)."""
    from sglang.srt.managers import data_parallel_controller

    return hasattr(data_parallel_controller, "load_plugins")


def pass_max_tokens() -> int | None:
    """The largest token count of any attention-DP rank in the forward pass now running; None
    where SGLang keeps none (no DP attention: one rank)."""
    from sglang.srt.layers.dp_attention import get_dp_global_num_tokens

    counts = get_dp_global_num_tokens()
    return int(max(counts)) if counts else None
