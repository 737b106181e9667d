"""``python -m sglang_zeroprefill.launch_server``: SGLang's server with our plugin guaranteed.

Same arguments as ``python -m sglang.launch_server`` (or ``sglang serve``) plus two choices::

    python -m sglang_zeroprefill.launch_server --model-path Qwen/Qwen3-30B-A3B --is-embedding \\
        --attn-dp-size 4 --tp-size 4 --ep-size 4 --moe-a2a-backend asyncep \\
        --load-balance-method zeroprefill

With the package installed, its ``sglang.srt.plugins`` entry point already makes plain
``sglang serve`` accept both; this launcher also works when SGLANG_PLUGINS filters plugins
(it adds ours to the list, which SGLang's subprocesses inherit), checks that every hook was
applied, turns a rejected flag combination into one line on stderr instead of a traceback,
and loads the plugins in every process SGLang spawns from it (SGLang before 0.5.22 starts its
DP controller process without loading them). It then hands over to SGLang's ``run_server``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sglang_zeroprefill import register, verify_hooks
from zeroprefill.common.asyncep_model import AsyncEPConfigError

#: Our entry-point name in the ``sglang.srt.plugins`` group (pyproject.toml).
PLUGIN_NAME = "zeroprefill"


def load_plugins_with_ours() -> None:
    """SGLang's ``load_plugins()``, ours included, and every hook checked."""
    allowed = os.environ.get("SGLANG_PLUGINS")
    if allowed and PLUGIN_NAME not in {name.strip() for name in allowed.split(",")}:
        os.environ["SGLANG_PLUGINS"] = f"{allowed},{PLUGIN_NAME}"
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()
    register()  # also when the entry point is not installed (e.g. a source checkout)
    HookRegistry.apply_hooks()
    verify_hooks()


def prepare(argv: list[str]) -> Any:
    """Load plugins (ours included), check our hooks, parse ``argv`` with SGLang's parser.

    SGLang 0.5.17 - 0.5.18 resolve the arguments here already; later releases in ``run_server``
    (``sglang_zeroprefill.compat.resolve``).
    """
    load_plugins_with_ours()
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(argv)


def main(argv: list[str] | None = None) -> int:
    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    try:
        run_server(prepare(sys.argv[1:] if argv is None else argv))
    except AsyncEPConfigError as exc:
        print(f"sglang_zeroprefill: {exc}", file=sys.stderr)
        return 2
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":
    # multiprocessing's spawn start method (SGLang's) imports the parent's main module under
    # this name in every child before it runs the child's target.
    load_plugins_with_ours()
