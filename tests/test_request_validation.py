"""``vllm_zeroprefill.request_validation``: vLLM's ``EmbeddingRequest`` union, discriminated.

The discriminated union must accept exactly what vLLM's accepts and build the same model
from it, for every shape of body the five members take (and reject what vLLM rejects); it
must be much cheaper on long token-id bodies, which is its reason to exist; and ``install``
must replace the alias, once, unless told not to. That the live API server uses it is
tested through a real server in ``test_vllm_server.py``.
"""

from __future__ import annotations

import json
import time
import typing

import pytest

pytest.importorskip("vllm")

from pydantic import TypeAdapter, ValidationError  # noqa: E402

from vllm_zeroprefill import request_validation  # noqa: E402

USER = {"role": "user", "content": "Paris is the capital of France."}
BODIES = {
    "token ids": {"input": list(range(3, 40))},
    "token ids, base64 out": {"input": [5, 6, 7], "encoding_format": "base64", "dimensions": 8},
    "text": {"input": "a"},
    "texts": {"input": ["a", "b c"]},
    "lists of token ids": {"input": [[1, 2], [3]]},
    "chat": {"messages": [USER]},
    "batched chat": {"messages": [[USER], [USER, {"role": "assistant", "content": "yes"}]]},
    "chat as input": {"input": [USER]},
    "batched chat as input": {"input": [[USER], [USER]]},
    "chat with an unknown field": {"messages": [USER], "not_a_field": 1},
    # Shapes the first items do not settle: vLLM's whole union decides, as it would alone.
    "messages and input": {"messages": [USER], "input": "x"},
    "no messages, and input": {"messages": [], "input": "x"},
    "no messages": {"messages": []},
    "no input": {"input": []},
}
REJECTED = {
    "a string among token ids": {"input": [1, "x"]},
    "a message among texts": {"input": ["x", USER]},
    "a text among messages": {"input": [USER, "x"]},
    "neither input nor messages": {},
    "input null": {"input": None},
    "a message without a role": {"input": [{"content": "hi"}]},
}


def dump(adapter: TypeAdapter, body: dict):
    """The model ``adapter`` builds from ``body``, and its fields but the per-request random ones."""
    model = adapter.validate_json(json.dumps({"model": "m"} | body))
    again = adapter.validate_json(json.dumps({"model": "m"} | body))
    fields = model.model_dump()
    return type(model), {k: v for k, v in fields.items() if again.model_dump().get(k) == v}


@pytest.fixture(scope="module")
def adapters():
    vllm_union = request_validation.vllm_embedding_request()
    return TypeAdapter(vllm_union), TypeAdapter(request_validation.discriminated(vllm_union))


@pytest.mark.parametrize("name", BODIES)
def test_every_body_vllm_accepts_becomes_the_same_model(adapters, name):
    vllm_union, ours = adapters
    assert dump(ours, BODIES[name]) == dump(vllm_union, BODIES[name])


@pytest.mark.parametrize("name", REJECTED)
def test_what_vllm_rejects_is_rejected(adapters, name):
    vllm_union, ours = adapters
    for adapter in (vllm_union, ours):
        with pytest.raises(ValidationError):
            adapter.validate_json(json.dumps({"model": "m"} | REJECTED[name]))


def vllm_validates_plain_inputs_first() -> bool:
    import importlib

    return hasattr(importlib.import_module(request_validation.PROTOCOL_MODULE), request_validation.VLLM_FAST_PATH)


def test_a_long_token_id_body_costs_one_member_not_five(adapters):
    if vllm_validates_plain_inputs_first():
        pytest.skip("this vLLM validates plain inputs first itself (0.34): install() leaves it alone")
    vllm_union, ours = adapters
    body = json.dumps({"model": "m", "input": [i % 500 + 3 for i in range(2048)]})

    def fastest(adapter: TypeAdapter) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            adapter.validate_json(body)
            times.append(time.perf_counter() - started)
        return min(times)

    # vLLM's union tries the chat-as-input members on every token id: ~200x dearer, measured.
    assert fastest(vllm_union) > 20 * fastest(ours)


def test_request_kind_names_the_member_for_each_shape():
    kinds = {name: request_validation.request_kind(body) for name, body in BODIES.items()}
    assert kinds["token ids"] == kinds["text"] == kinds["texts"] == kinds["lists of token ids"] == "completion"
    assert (kinds["chat"], kinds["batched chat"]) == ("chat", "batch_chat")
    assert (kinds["chat as input"], kinds["batched chat as input"]) == ("chat_input", "batch_chat_input")
    unsettled = ("messages and input", "no messages, and input", "no messages", "no input")
    assert {kinds[name] for name in unsettled} == {request_validation.ANY_MEMBER}
    assert request_validation.request_kind("not a dict") == request_validation.ANY_MEMBER


def test_install_replaces_the_alias_once_unless_told_not_to(monkeypatch):
    import importlib

    protocol = importlib.import_module(request_validation.PROTOCOL_MODULE)
    vllm_union = request_validation.vllm_embedding_request()
    monkeypatch.setattr(request_validation, "_vllm_alias", None)
    monkeypatch.setattr(protocol, "EmbeddingRequest", vllm_union)
    monkeypatch.setenv(request_validation.SETTING_ENV, "0")
    assert request_validation.install().startswith(f"{request_validation.SETTING_ENV}=0")
    assert protocol.EmbeddingRequest is vllm_union
    monkeypatch.delenv(request_validation.SETTING_ENV)
    assert not request_validation.replaces_vllms_union({request_validation.SETTING_ENV: "0"})
    assert request_validation.replaces_vllms_union({}) is not vllm_validates_plain_inputs_first()
    if vllm_validates_plain_inputs_first():
        assert "validates plain inputs first itself" in request_validation.install()
        assert protocol.EmbeddingRequest is vllm_union
        return
    assert request_validation.install().endswith("(EmbeddingRequest discriminated)")
    replaced = protocol.EmbeddingRequest
    assert replaced is not vllm_union and request_validation.vllm_embedding_request() is vllm_union
    assert request_validation.install() == "EmbeddingRequest already discriminated"
    assert protocol.EmbeddingRequest is replaced


def test_info_says_how_a_server_here_validates_embedding_requests(monkeypatch):
    from zeroprefill.environment import collect_environment

    state = collect_environment()["backends"]["vllm requests"]
    if vllm_validates_plain_inputs_first():
        assert "validates plain inputs first itself" in state
    else:
        assert state.startswith("discriminated by the plugin: one request model per body")
    monkeypatch.setenv(request_validation.SETTING_ENV, "0")
    assert collect_environment()["backends"]["vllm requests"] == (
        f"{request_validation.SETTING_ENV}=0: vLLM's EmbeddingRequest union left as it is")


def test_a_union_of_other_members_is_left_alone():
    assert request_validation.discriminated(typing.Annotated[int | str, "metadata"]) is None


def test_the_benchmark_times_vllms_union_against_the_discriminated_one(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import frontend_validation

    out = tmp_path / "frontend_validation.json"
    assert frontend_validation.main(["--tokens", "64", "512", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [point["tokens"] for point in result["points"]] == [64, 512]
    for point in result["points"]:
        assert point["same_member"] and set(point["members_ms"]) == set(result["members"])
        assert point["requests_per_s_per_core"] == pytest.approx(1e3 / point["union_ms"], rel=0.01)
    assert "union ms" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        frontend_validation.main(["--tokens", "0"])
