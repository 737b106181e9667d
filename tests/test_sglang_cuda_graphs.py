"""CUDA-graph launches wait for the weight stream, at SGLang's own capture and replay points.

On CPU there is no graph to capture, so the backends' real methods (as our plugin patched them)
run on stand-in state: graphs that record their replay, a device module whose ``graph`` context
records the capture, and streamers that record ``order_after_side_stream``. What is checked is
the order of those events — the property the streamer's CUDA-graph contract needs — through
SGLang's code, on whichever release is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import import_sglang  # noqa: E402

import_sglang()

from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from sglang_zeroprefill import compat, cuda_graphs, launch_server  # noqa: E402

launch_server.load_plugins_with_ours()


class RecordingStreamer:
    """Stands in for an ExpertWeightStreamer: records when the engine orders its stream."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def order_after_side_stream(self) -> None:
        self.events.append("stream ordered")


class RecordingGraph:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def replay(self) -> None:
        self.events.append("graph replayed")


@pytest.fixture
def events() -> Any:
    """An event log, with a recording streamer registered for the test's duration."""
    log: list[str] = []
    streamer = RecordingStreamer(log)
    cuda_graphs.order_graph_launches_after(streamer)
    yield log
    cuda_graphs.stop_ordering_graph_launches_after(streamer)


def _backend_class(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("backend", compat.CUDA_GRAPH_BACKENDS)
def test_every_backends_capture_and_replay_are_hooked(backend: str) -> None:
    assert {f"{backend}.capture_one", f"{backend}.replay"} <= HookRegistry._patched


@pytest.mark.parametrize("backend", compat.CUDA_GRAPH_BACKENDS)
def test_replay_orders_the_stream_before_the_graph_launches(backend: str, events: list[str]) -> None:
    cls = _backend_class(backend)
    state = object.__new__(cls)  # what replay reads: the captured graph and its output (or compiled fn)
    state._graphs = {"shape": RecordingGraph(events)}
    state._outputs = {"shape": "captured output"}
    state._compiled_fn = lambda *args, **kwargs: events.append("graph replayed")
    batch = SimpleNamespace(input_ids=None, positions=None)
    cls.replay(state, "shape", batch)
    assert events == ["stream ordered", "graph replayed"]


def test_a_whole_eager_pass_runs_before_the_capture_and_after_the_stream_is_ordered(
    events: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGLang's FullCudaGraphBackend.capture_one: two eager warm-ups, then the capture."""
    import torch

    cls = _backend_class(compat.CUDA_GRAPH_BACKENDS[0])
    capturing = [False]

    @contextlib.contextmanager
    def graph(**kwargs: Any) -> Any:
        capturing[0] = True
        yield
        capturing[0] = False

    @contextlib.contextmanager
    def measure() -> Any:
        yield

    state = object.__new__(cls)
    state.__dict__.update(
        _graphs={}, _outputs={}, _pool=None, _capture_stream=None, _memory_saver_adapter=None,
        _device_module=SimpleNamespace(synchronize=lambda: None, graph=graph),
        _tp_group=SimpleNamespace(barrier=lambda: None),
        _cuda_graph_runner=SimpleNamespace(), _reuse_output_buffer=False, _output_buffer=None,
        _precarve=SimpleNamespace(measure=measure, mint=lambda: None),
    )
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *args, **kwargs: SimpleNamespace())

    def forward() -> str:
        events.append("captured pass" if capturing[0] else "eager pass")
        return "output"

    cls.capture_one(state, "shape", forward)
    assert events == ["stream ordered", "eager pass", "eager pass", "captured pass"]


def test_each_streamer_is_ordered_once_until_removed() -> None:
    streamer = RecordingStreamer([])
    cuda_graphs.order_graph_launches_after(streamer)
    cuda_graphs.order_graph_launches_after(streamer)  # once per streamer
    cuda_graphs.order_after_weight_stream()
    assert streamer.events == ["stream ordered"]
    cuda_graphs.stop_ordering_graph_launches_after(streamer)
    cuda_graphs.order_after_weight_stream()
    assert streamer.events == ["stream ordered"]
