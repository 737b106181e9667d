"""AsyncEP under vLLM's CUDA graphs: order every capture and replay after the eager gathers.

vLLM captures MoE layers into its CUDA graphs (piecewise graphs between attention ops for
pooling models; whole-model graphs for decode batches of generative ones). The streamer is
capture-safe by itself (``zeroprefill.common.streamer``: a captured layer forks its gathers
from the capturing stream and joins them back, and a replayed pass ends in the same ring
state as an eager one). What a graph cannot see is an eager pass's gathers still in flight
on the streamer's side stream when the replay starts: the next pass's first layers, which
the eager pass prefetched. Something must order the replay after them, on the host, just
before every capture and replay.

vLLM has that seam for its own weight prefetcher: every CUDA-graph wrapper (V1's
``CUDAGraphWrapper``, Model Runner V2's graph manager, the micro-batch wrapper, 0.34's
breakable graphs) calls ``get_offloader().sync_prev_onload()`` right before it captures or
replays, and ``join_after_forward()`` before a capture ends. :class:`StreamerOrderingOffloader`
wraps the offloader vLLM configured (usually the no-op one), delegates everything to it, and adds
``streamer.order_after_side_stream()`` to ``sync_prev_onload``: one event record and one
stream wait per graph launch, no host wait. Present and called the same way in vLLM
0.26-0.34 (``vllm.model_executor.offloader.base``).
"""

from __future__ import annotations

from collections.abc import Generator

import torch.nn as nn
from vllm.model_executor.offloader.base import BaseOffloader, get_offloader, set_offloader

from zeroprefill.common.streamer import ExpertWeightStreamer


class StreamerOrderingOffloader(BaseOffloader):
    """vLLM's offloader, plus: a graph launch waits for the streamer's eager gathers."""

    def __init__(self, inner: BaseOffloader, streamer: ExpertWeightStreamer) -> None:
        self.inner = inner
        self.streamer = streamer

    def wrap_modules(self, modules_generator: Generator[nn.Module, None, None]) -> list[nn.Module]:
        return self.inner.wrap_modules(modules_generator)

    def post_init(self) -> None:
        self.inner.post_init()

    def sync_prev_onload(self) -> None:
        self.inner.sync_prev_onload()
        self.streamer.order_after_side_stream()

    def join_after_forward(self) -> None:
        self.inner.join_after_forward()

    def _wait_for_layer(self, layer_idx: int) -> None:
        self.inner._wait_for_layer(layer_idx)

    def _start_prefetch(self, layer_idx: int) -> None:
        self.inner._start_prefetch(layer_idx)

    def __getattr__(self, name: str):
        # Anything else a vLLM release asks of its offloader is the wrapped one's.
        return getattr(self.inner, name)


def order_graph_launches_after(streamer: ExpertWeightStreamer) -> None:
    """Install :class:`StreamerOrderingOffloader` around this process's vLLM offloader."""
    current = get_offloader()
    if isinstance(current, StreamerOrderingOffloader):
        current.streamer = streamer
        return
    set_offloader(StreamerOrderingOffloader(current, streamer))
