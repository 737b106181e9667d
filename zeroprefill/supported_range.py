"""The range of engine releases a plugin supports, and its one-line start-up error outside it.

Used by ``vllm_zeroprefill.compat`` and ``sglang_zeroprefill.compat``: each names its range
and the words of its error (who refuses, what to do instead); the range check and the
message's shape are written here once. No engine is imported (``packaging`` reads versions;
both engines install it).
"""

from __future__ import annotations

from typing import NamedTuple

from packaging.version import Version


class SupportedRange(NamedTuple):
    """``[low, high)``: the first supported release and the first unsupported one.

    A tuple, so ``low, high = SUPPORTED`` and ``SUPPORTED[0]`` read it as before.
    """

    low: Version
    high: Version

    def text(self) -> str:
        return f">= {self.low}, < {self.high}"

    def unsupported_message(self, version: str, *, engine: str, subject: str, remedy: str) -> str | None:
        """``None`` if ``version`` is supported, else the one-line start-up error to show.

        ``engine``: its name as users write it ("vLLM"); ``subject``: what refuses to run
        ("--moe-backend asyncep"); ``remedy``: what to do instead, after the colon.
        """
        if self.supports(version):
            return None
        try:
            Version(version)
        except ValueError:
            return f"{subject} cannot read the {engine} version {version!r}; it supports {engine} {self.text()}"
        return f"{subject} supports {engine} {self.text()}, found {version}: {remedy}"

    def supports(self, version: str) -> bool:
        """Whether ``version`` is in the range (False if it cannot be read as a version).

        A local build tag (0.32.0+cpu) or a post release of a supported release is that release.
        """
        try:
            parsed = Version(version)
        except ValueError:
            return False
        return self.low <= Version(parsed.base_version) < self.high
