"""AsyncEP for a whole model on one rank: its settings, its errors, and the one builder.

Every engine adapter (the vLLM FusedMoE method, the SGLang FusedMoE hook) and every tool
(``zeroprefill selftest``, the benchmark harness) assembles AsyncEP the same way::

    AsyncEPConfig (read once)  ->  make_transport  ->  ExpertWeightStreamer  ->  AsyncEPMoE per layer
                                   (transport.py)      (streamer.py)             (asyncep_moe.py)
                                                   ->  TokenExchange (token_exchange.py, 2+ ranks)

:func:`build_asyncep_model` is that assembly; :class:`AsyncEPConfig` holds the settings a
deployment chooses (transport, prefetch depth, switch point), read from the environment once
per process by :meth:`AsyncEPConfig.from_env` in both engine plugins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeroprefill.common.asyncep_moe import AsyncEPMoE, ExpertsKernel
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.token_exchange import TokenExchange
from zeroprefill.common.transport import GatherTransport, make_transport
from zeroprefill.common.transport_choice import TRANSPORT_SETTINGS

TRANSPORT_ENV = "ZEROPREFILL_ASYNCEP_TRANSPORT"
PREFETCH_DEPTH_ENV = "ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH"
COPY_STREAMS_ENV = "ZEROPREFILL_ASYNCEP_COPY_STREAMS"
SWITCH_TOKENS_ENV = "ZEROPREFILL_ASYNCEP_SWITCH_TOKENS"
MAX_COPY_STREAMS = 8


class AsyncEPConfigError(ValueError):
    """A model, flag or setting AsyncEP cannot run: a user mistake, reported in one line."""


@dataclass(frozen=True)
class AsyncEPConfig:
    """How a deployment streams its experts.

    Attributes:
        transport: ``auto`` (gloo on CPU; on CUDA the copy engine where torch has symmetric
            memory, else NCCL), or one of ``gloo``, ``nccl``, ``copy_engine``.
        prefetch_depth: layers gathered ahead of the one computing; the ring holds
            ``min(prefetch_depth + 1, L)`` layers of experts per GPU.
        copy_streams: the copy-engine transport's concurrent pulls per remote shard (1 to 8).
        switch_tokens: the switch point, in tokens per rank per pass: a pass whose largest
            per-rank token count is below it moves tokens to the resident experts instead of
            streaming weights; 0 always streams. None: the engine plugin takes the planner's
            (where deduplicated EP's predicted step time equals AsyncEP's).
    """

    transport: str = "auto"
    prefetch_depth: int = 1
    copy_streams: int = 1
    switch_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORT_SETTINGS:
            raise AsyncEPConfigError(
                f"{TRANSPORT_ENV}={self.transport!r} is not a transport; choose one of "
                f"{', '.join(TRANSPORT_SETTINGS)}"
            )
        if self.prefetch_depth < 1:
            raise AsyncEPConfigError(f"{PREFETCH_DEPTH_ENV}={self.prefetch_depth} must be at least 1")
        if not 1 <= self.copy_streams <= MAX_COPY_STREAMS:
            raise AsyncEPConfigError(f"{COPY_STREAMS_ENV}={self.copy_streams} must be 1 to {MAX_COPY_STREAMS}")
        if self.switch_tokens is not None and self.switch_tokens < 0:
            raise AsyncEPConfigError(
                f"{SWITCH_TOKENS_ENV}={self.switch_tokens} must be a token count >= 0 (0: always stream weights)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AsyncEPConfig:
        """The settings from ``ZEROPREFILL_ASYNCEP_TRANSPORT`` / ``..._PREFETCH_DEPTH`` /
        ``..._COPY_STREAMS`` / ``..._SWITCH_TOKENS`` (defaults otherwise)."""
        switch = environ.get(SWITCH_TOKENS_ENV, "").strip()
        return cls(transport=environ.get(TRANSPORT_ENV, "auto"),
                   prefetch_depth=_whole_number(environ, PREFETCH_DEPTH_ENV, "1", "layers"),
                   copy_streams=_whole_number(environ, COPY_STREAMS_ENV, "1", "streams"),
                   switch_tokens=_whole_number(environ, SWITCH_TOKENS_ENV, switch, "tokens") if switch else None)


def check_settings() -> AsyncEPConfig:
    """Every ``ZEROPREFILL_*`` setting a serving process reads, checked at once, so that an engine
    plugin refuses a bad one at start-up with :class:`AsyncEPConfigError` instead of failing in a
    worker: AsyncEP's (:meth:`AsyncEPConfig.from_env`, returned) and the experts kernels'
    (``ZEROPREFILL_EXPERTS_KERNEL``, ``ZEROPREFILL_DEEPGEMM_FP8_LAYOUT``)."""
    from zeroprefill.kernels import experts_kernel_setting
    from zeroprefill.kernels.deepgemm import fp8_layout_setting

    config = AsyncEPConfig.from_env()
    for read_setting in (experts_kernel_setting, fp8_layout_setting):
        try:
            read_setting()
        except ValueError as exc:
            raise AsyncEPConfigError(str(exc)) from None
    return config


def _whole_number(environ: Mapping[str, str], name: str, default: str, unit: str) -> int:
    text = environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise AsyncEPConfigError(f"{name}={text!r} is not a whole number of {unit}") from None


@dataclass
class AsyncEPModel:
    """Every MoE layer of one model on one rank, fed by one weight streamer."""

    streamer: ExpertWeightStreamer
    layers: list[AsyncEPMoE]

    @property
    def switch_tokens(self) -> int:
        """Passes below this many tokens per rank move tokens (0: never); every layer's."""
        return self.layers[0].switch_tokens

    def close(self) -> None:
        self.streamer.close()


def build_asyncep_model(
    layer_shards: Sequence[Mapping[str, torch.Tensor]],
    layout: ExpertShardLayout,
    config: AsyncEPConfig,
    *,
    top_k: int,
    renormalize: bool,
    scoring_func: str = "softmax",
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
    experts_kernel: ExpertsKernel | None = None,
    transport: GatherTransport | None = None,
    switch_tokens: int | None = None,
) -> AsyncEPModel:
    """Stream ``layer_shards`` (this rank's shard of each MoE layer, in execution order).

    Collective on ``group`` (some transports register the shards with every peer): call on
    every rank of it, at the same point. ``transport``: one made earlier from ``config`` (an
    engine that hands layers over as it loads them, see ``GatherTransport.adopt``); its group
    also carries the token exchange. ``switch_tokens``: the switch point when
    ``config.switch_tokens`` is None (the plugin's planner figure); 0 if neither is given.
    """
    if transport is None:
        transport = make_transport(config.transport, group, device, config.copy_streams)
    streamer = ExpertWeightStreamer(layer_shards, layout, transport, prefetch_depth=config.prefetch_depth)
    switch = config.switch_tokens if config.switch_tokens is not None else (switch_tokens or 0)
    exchange = None
    if streamer.streams_weights:
        exchange = TokenExchange(layout, streamer.resident(0).row_of_expert, transport.group)
    else:
        switch = 0  # one rank: nothing to stream, nothing to move
    layers = [
        AsyncEPMoE(streamer, index, top_k, renormalize, scoring_func, experts_kernel=experts_kernel,
                   exchange=exchange, switch_tokens=switch)
        for index in range(len(layer_shards))
    ]
    return AsyncEPModel(streamer, layers)
