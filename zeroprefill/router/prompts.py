"""Turn a pooling/scoring request body into the prompts the engine will prefill.

The router needs each prompt's token ids (for its length, true FLOPs and prefix block hashes)
without forwarding anything, so it tokenises with the model's own fast tokenizer. Bodies:

===========================================  ===============================================
endpoint                                     prompts
===========================================  ===============================================
``/v1/embeddings`` ``/pooling`` ``/classify``  ``input``: str, [str], [int] or [[int]];
``/v1/classify``                             ``messages``: the contents, concatenated
``/score`` ``/v1/score``                     one per pair: ``queries|text_1|data_1|query``
                                             x ``documents|items|text_2|data_2``
``/rerank`` ``/v1/rerank``                   one per document: ``query`` + document
===========================================  ===============================================

A pair's prompt is the query's tokens followed by the item's, so pairs that share a query
share a prefix (the engine's template adds a few tokens around them; the router's estimate
ignores those). Anything unusable raises :class:`BadRequest` with a message for the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

EMBEDDING_LIKE_PATHS = frozenset({"/v1/embeddings", "/pooling", "/classify", "/v1/classify"})
SCORE_PATHS = frozenset({"/score", "/v1/score"})
RERANK_PATHS = frozenset({"/rerank", "/v1/rerank"})
ROUTED_PATHS = EMBEDDING_LIKE_PATHS | SCORE_PATHS | RERANK_PATHS

_PAIR_FIRST = ("queries", "text_1", "data_1", "query")
_PAIR_SECOND = ("documents", "items", "text_2", "data_2")


class BadRequest(ValueError):
    """The request cannot be served as sent; the message tells the client why."""


class PromptTokenizer:
    """The model's HF fast tokenizer (``tokenizer.json``), used only to count and hash tokens."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {model_dir}: pass --model a model directory with a fast tokenizer"
            )
        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) == 1:
            return [self._tokenizer.encode(texts[0], add_special_tokens=True).ids]
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]


def request_prompts(path: str, body: dict[str, Any], tokenizer: PromptTokenizer) -> list[list[int]]:
    """Token ids of every prompt ``body`` asks ``path`` to prefill."""
    if path in EMBEDDING_LIKE_PATHS:
        if "input" in body:
            return _inputs(body["input"], tokenizer, "input")
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list of chat messages")
            text = "".join(_text_of(m.get("content") if isinstance(m, dict) else None, "messages") for m in messages)
            return tokenizer.encode([text])
        raise BadRequest(f"{path} needs an 'input' field (a string, a list of strings or token ids)")
    if path in SCORE_PATHS:
        first_key = next((k for k in _PAIR_FIRST if k in body), None)
        second_key = next((k for k in _PAIR_SECOND if k in body), None)
        if first_key is None or second_key is None:
            raise BadRequest(
                f"{path} needs a query field ({'/'.join(_PAIR_FIRST)}) and an item field "
                f"({'/'.join(_PAIR_SECOND)})"
            )
        return _pairs(body[first_key], body[second_key], tokenizer, first_key, second_key)
    if path in RERANK_PATHS:
        if "query" not in body or "documents" not in body:
            raise BadRequest(f"{path} needs 'query' and 'documents'")
        return _pairs(body["query"], body["documents"], tokenizer, "query", "documents")
    raise BadRequest(f"{path} is not a prefill-only endpoint the router serves")


def _text_of(value: Any, field: str) -> str:
    """Text of a string or of OpenAI-style content parts (``{"type": "text", "text": ...}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        text = value.get("text", value.get("content"))
        if isinstance(text, str):
            return text
    if isinstance(value, list) and value and all(isinstance(part, dict) for part in value):
        return "".join(_text_of(part, field) for part in value)
    raise BadRequest(f"'{field}' holds {type(value).__name__}; expected text")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _inputs(value: Any, tokenizer: PromptTokenizer, field: str) -> list[list[int]]:
    if isinstance(value, str):
        return tokenizer.encode([value])
    if _is_token_ids(value):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return tokenizer.encode(value)
        if all(_is_token_ids(v) for v in value):
            return list(value)
    raise BadRequest(
        f"'{field}' must be a non-empty string, list of strings, token ids or lists of token ids"
    )


def _items(value: Any, tokenizer: PromptTokenizer, field: str) -> list[list[int]]:
    values = value if isinstance(value, list) and not _is_token_ids(value) else [value]
    if not values:
        raise BadRequest(f"'{field}' must not be empty")
    texts: list[str | None] = []
    ids: list[list[int] | None] = []
    for v in values:
        if _is_token_ids(v):
            texts.append(None)
            ids.append(v)
        else:
            texts.append(_text_of(v, field))
            ids.append(None)
    to_encode = [t for t in texts if t is not None]
    encoded = iter(tokenizer.encode(to_encode) if to_encode else [])
    return [i if i is not None else next(encoded) for i in ids]


def _pairs(
    first: Any, second: Any, tokenizer: PromptTokenizer, first_field: str, second_field: str
) -> list[list[int]]:
    queries = _items(first, tokenizer, first_field)
    items = _items(second, tokenizer, second_field)
    if len(queries) == 1:
        return [queries[0] + item for item in items]
    if len(queries) != len(items):
        raise BadRequest(
            f"'{first_field}' has {len(queries)} entries and '{second_field}' {len(items)}; "
            "give one query or as many as items"
        )
    return [q + item for q, item in zip(queries, items)]
