"""AsyncEP under SGLang's CUDA graphs: every graph capture and replay waits for the weight stream.

SGLang (0.5.17 - 0.5.23) runs prefill and decode batches through CUDA-graph runners
(``PrefillCudaGraphRunner``, ``DecodeCudaGraphRunner``) that hand capture and replay to a
backend (:data:`sglang_zeroprefill.compat.CUDA_GRAPH_BACKENDS`): ``FullCudaGraphBackend`` (one
graph per shape; decode's default), ``BreakableCudaGraphBackend`` (graph segments between eager
attention; prefill's default) or ``TcPiecewiseCudaGraphBackend`` (torch.compile pieces). Every
backend's ``capture_one(shape_key, forward_fn, ...)`` runs ``forward_fn`` eagerly twice and then
captures it; its ``replay(shape_key, batch)`` launches the captured graphs on the current stream.

The streamer is capture-safe by itself (``zeroprefill.common.streamer``: a captured MoE layer
forks its gathers from the capturing stream and joins them back, and a replayed pass ends in
the ring state an eager pass ends in). It asks two things of the engine, and SGLang's backends
give both places:

- **A whole eager pass before the first capture.** Each backend's two warm-up passes run
  every MoE layer eagerly before it captures (TcPiecewise also runs its compile pass eagerly
  first), so nothing is added here; if a release ever captured first, the streamer stops
  start-up with a one-line error naming the layer.
- **Graph launches ordered after the eager gathers still in flight** (the next pass's first
  layers, prefetched by the last eager pass), which a graph cannot see: a ``BEFORE`` hook on
  every backend's ``capture_one`` and ``replay`` calls
  :meth:`~zeroprefill.common.streamer.ExpertWeightStreamer.order_after_side_stream` for this
  process's streamers — one stream wait, no host wait. It is the point vLLM's weight-offloader
  hook marks there (``vllm_zeroprefill/cuda_graphs.py``).

On one GPU the streamer has nothing to gather and the wait is free.
"""

from __future__ import annotations

from typing import Any

from zeroprefill.common.streamer import ExpertWeightStreamer

# The streamers of this process's AsyncEP models (one per model runner; a scheduler has one).
_streamers: list[ExpertWeightStreamer] = []


def order_graph_launches_after(streamer: ExpertWeightStreamer) -> None:
    """Make every CUDA-graph capture and replay of this process wait for ``streamer``'s gathers."""
    if not any(known is streamer for known in _streamers):
        _streamers.append(streamer)


def stop_ordering_graph_launches_after(streamer: ExpertWeightStreamer) -> None:
    _streamers[:] = [known for known in _streamers if known is not streamer]


def order_after_weight_stream(*args: Any, **kwargs: Any) -> None:
    """``BEFORE`` hook on the CUDA-graph backends' ``capture_one`` and ``replay``."""
    for streamer in _streamers:
        streamer.order_after_side_stream()
