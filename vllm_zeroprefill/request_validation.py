"""``/v1/embeddings`` request bodies validated by their shape, not by trying every request model.

vLLM's ``EmbeddingRequest`` (0.26 to 0.33) is a union of five pydantic models: completion-style
``input`` (text or token ids), one chat conversation in ``messages``, a batch of them, and the
same two passed as ``input``. It has no discriminator, so FastAPI's validation tries every
member, and the members that read ``input`` as chat messages give up only after trying each
token id as a message: about 8 µs per token on this project's 2-core CI machine, 16.4 of the
17.5 ms a 2,048-token body costs (``benchmarks/frontend_validation.py``). The API server
validates on its event loop, so this alone holds one API server process to ~57 such requests
per second, below what one GPU computes for a prefill-only model.

:func:`install` replaces the alias in vLLM's protocol module with the same members under a
callable discriminator (:func:`request_kind`: from the body's first items, the one member that
can accept it), before the API server imports the router that annotates ``/v1/embeddings``
with it, so only that member validates the body (0.07 ms at 2,048 tokens); a body whose shape
takes more than its first items to tell goes to vLLM's whole union, as before. What is
accepted and the model it becomes are vLLM's own (tests compare both for every shape); a body
that fails validation fails with that one member's errors. ``ZEROPREFILL_VLLM_DISCRIMINATED_
REQUESTS=0`` leaves vLLM's union in place. A vLLM whose union has other members is left alone,
and so is one that validates plain inputs first itself (0.34: :data:`VLLM_FAST_PATH`).
"""

from __future__ import annotations

import importlib
import os
import typing
from collections.abc import Mapping
from typing import Any

#: Where vLLM defines ``EmbeddingRequest``.
PROTOCOL_MODULE = "vllm.entrypoints.pooling.embed.protocol"
#: ``0`` keeps vLLM's undiscriminated union.
SETTING_ENV = "ZEROPREFILL_VLLM_DISCRIMINATED_REQUESTS"
#: vLLM 0.34's own remedy: a wrap validator that tries the completion member first for bodies no
#: chat member could accept. Where the protocol module has it, nothing is replaced.
VLLM_FAST_PATH = "_validate_embedding_request"
#: The member each :func:`request_kind` names, by vLLM's class names.
KIND_MEMBERS = {
    "completion": "EmbeddingCompletionRequest",
    "chat": "EmbeddingChatRequest",
    "batch_chat": "EmbeddingBatchChatRequest",
    "chat_input": "EmbeddingChatInputRequest",
    "batch_chat_input": "EmbeddingBatchChatInputRequest",
}


#: The tag of bodies :func:`request_kind` leaves to vLLM's whole union.
ANY_MEMBER = "any"


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


_announced = False


def _announce_once() -> None:
    """One line in the log of the process that validates requests (the API server), at its first."""
    global _announced
    if not _announced:
        _announced = True
        from vllm.logger import init_logger

        init_logger(f"vllm.{__name__}").info(
            "zeroprefill: /v1/embeddings bodies are validated by the one request model their shape allows "
            "(%s=0 keeps vLLM's union of five)", SETTING_ENV)


def request_kind(body: Any) -> str:
    """The one member (a key of :data:`KIND_MEMBERS`) that can accept an embeddings request
    body, from its first items alone, or :data:`ANY_MEMBER` where that takes more (a body with
    both ``messages`` and ``input``, an empty list, anything else): vLLM's whole union then
    decides, as without this module.

    ``messages`` (no ``input``): a message first is one conversation (``chat``), a list first a
    batch (``batch_chat``). ``input`` (no ``messages``): a string, or a token id, first (or a
    string alone) is completion-style, and so is a list of token ids first; a message first is
    a conversation (``chat_input``), a list of messages first a batch (``batch_chat_input``).
    No other member accepts a body whose first item has that type, so the member named builds
    what the union would, and rejects what it would."""
    _announce_once()
    if not isinstance(body, dict) or ("messages" in body) == ("input" in body):
        return ANY_MEMBER
    if "messages" in body:
        first = _first(body["messages"])
        return "chat" if isinstance(first, dict) else "batch_chat" if isinstance(first, list) else ANY_MEMBER
    value = body["input"]
    if isinstance(value, str):
        return "completion"
    first = _first(value)
    if isinstance(first, (int, str)) and not isinstance(first, bool):
        return "completion"
    if isinstance(first, dict):
        return "chat_input"
    if isinstance(first, list):
        inner = _first(first)
        if isinstance(inner, int) and not isinstance(inner, bool):
            return "completion"
        if isinstance(inner, dict):
            return "batch_chat_input"
    return ANY_MEMBER


def union_members(alias: Any) -> tuple[list[type], tuple[Any, ...]]:
    """The models of an ``Annotated[A | B | ..., *metadata]`` request alias, and its metadata."""
    metadata: tuple[Any, ...] = ()
    if typing.get_origin(alias) is typing.Annotated:
        alias, *rest = typing.get_args(alias)
        metadata = tuple(rest)
    return list(typing.get_args(alias)), metadata


def discriminated(alias: Any) -> Any | None:
    """``alias`` (vLLM's ``EmbeddingRequest``) with its members under :func:`request_kind`, the
    whole of it for :data:`ANY_MEMBER`, and its metadata; None where its members are not the
    five this module knows."""
    from pydantic import Discriminator, Tag

    if alias is None:
        return None
    members, metadata = union_members(alias)
    kinds = {name: kind for kind, name in KIND_MEMBERS.items()}
    if sorted(cls.__name__ for cls in members) != sorted(kinds):
        return None
    whole = typing.Union[tuple(members)]  # noqa: UP007
    tagged = (*(typing.Annotated[cls, Tag(kinds[cls.__name__])] for cls in members),
              typing.Annotated[whole, Tag(ANY_MEMBER)])
    return typing.Annotated[typing.Union[tagged], Discriminator(request_kind), *metadata]  # noqa: UP007


_vllm_alias: Any = None  # vLLM's own EmbeddingRequest, once install() has replaced it


def vllm_embedding_request() -> Any:
    """vLLM's own ``EmbeddingRequest``, whether or not :func:`install` has replaced it."""
    if _vllm_alias is not None:
        return _vllm_alias
    return importlib.import_module(PROTOCOL_MODULE).EmbeddingRequest


def _replacement(environ: Mapping[str, str]) -> tuple[Any, Any] | str:
    """vLLM's protocol module and the alias to put in it, or why nothing is replaced."""
    if environ.get(SETTING_ENV, "1") == "0":
        return f"{SETTING_ENV}=0: vLLM's EmbeddingRequest union left as it is"
    try:
        protocol = importlib.import_module(PROTOCOL_MODULE)
    except ImportError:
        return f"no {PROTOCOL_MODULE} in this vLLM: its request validation left as it is"
    if hasattr(protocol, VLLM_FAST_PATH):
        return f"this vLLM validates plain inputs first itself ({VLLM_FAST_PATH}): its EmbeddingRequest left as it is"
    replacement = discriminated(getattr(protocol, "EmbeddingRequest", None) if _vllm_alias is None else _vllm_alias)
    if replacement is None:
        return "this vLLM's EmbeddingRequest has other members: left as it is"
    return protocol, replacement


def replaces_vllms_union(environ: Mapping[str, str]) -> bool:
    """Whether :func:`install` replaces this vLLM's ``EmbeddingRequest`` in a process started
    with ``environ`` (what a benchmark records of the servers it starts)."""
    return not isinstance(_replacement(environ), str)


def validation_state(environ: Mapping[str, str]) -> str:
    """How a vLLM server started with ``environ`` validates ``/v1/embeddings`` bodies, in words
    (``zeroprefill info``)."""
    replacement = _replacement(environ)
    if isinstance(replacement, str):
        return replacement
    return ("discriminated by the plugin: one request model per body, by its shape (vLLM's own union tries "
            f"all five; {SETTING_ENV}=0 keeps it)")


def install() -> str:
    """Put :func:`discriminated` in place of vLLM's ``EmbeddingRequest``; what was done, in words
    (for the log). Idempotent; does nothing where :data:`SETTING_ENV` is ``0``, where vLLM has no
    such alias, where it validates plain inputs first itself, or where its members differ."""
    global _vllm_alias
    if _vllm_alias is not None:
        return "EmbeddingRequest already discriminated"
    replacement = _replacement(os.environ)
    if isinstance(replacement, str):
        return replacement
    protocol, alias = replacement
    _vllm_alias, protocol.EmbeddingRequest = protocol.EmbeddingRequest, alias
    return "/v1/embeddings bodies validated by their shape (EmbeddingRequest discriminated)"
