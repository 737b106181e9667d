"""A user mistake stops vLLM at start-up with one line, not a traceback.

Start-up refusals are :class:`~zeroprefill.common.asyncep_model.AsyncEPConfigError`. Raised
while vLLM builds a config (a pydantic dataclass), one reaches the top wrapped in pydantic's
``ValidationError``; :func:`install_one_line_errors` makes the process print the message of
either as ``error: ...`` and exit non-zero. Other exceptions keep their tracebacks. A caller
of the Python API that catches the exception sees it unchanged.
"""

from __future__ import annotations

import sys

from zeroprefill.common.asyncep_model import AsyncEPConfigError


def config_error_in(exc: BaseException) -> AsyncEPConfigError | None:
    """``exc`` if it is ours, the one a pydantic ``ValidationError`` carries, else ``None``."""
    if isinstance(exc, AsyncEPConfigError):
        return exc
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return None
    try:
        details = errors()
    except Exception:  # not pydantic's ValidationError after all
        return None
    for detail in details:
        cause = (detail.get("ctx") or {}).get("error") if isinstance(detail, dict) else None
        if isinstance(cause, AsyncEPConfigError):
            return cause
    return None


def install_one_line_errors() -> None:
    """Print an uncaught start-up refusal as one line (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "zeroprefill_one_line", False):
        return

    def excepthook(kind, value, traceback) -> None:
        error = config_error_in(value)
        if error is None:
            previous(kind, value, traceback)
            return
        print(f"error: {error}", file=sys.stderr)

    excepthook.zeroprefill_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
