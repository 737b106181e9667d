"""Which transport gathers a deployment's expert weights: the names, and the one rule for ``auto``.

====================  ===========================================================  ==========
transport             how one layer's shards are gathered                          where
====================  ===========================================================  ==========
``gloo``              ``all_gather`` over gloo                                     CPU
``nccl``              NCCL all-gather on the side stream (SM kernels)              GPU, nodes
``copy_engine``       peer ``cudaMemcpyAsync`` pulls from symmetric memory (no SM)  one node
====================  ===========================================================  ==========

:func:`resolve_transport` turns a setting (``auto`` or a name) into the transport that runs.
The runtime (:func:`zeroprefill.common.transport.make_transport`) and the planner
(:class:`zeroprefill.common.saturation.Deployment`) both call it, so the transport a plan is
made for is the one the engines gather with. Torch-free: the planner and the router import it.
"""

from __future__ import annotations

#: The CPU transport (tests, CPU serving).
CPU_TRANSPORT = "gloo"
#: The GPU transports, the ones a hardware profile measures (``allgather`` keys).
GPU_TRANSPORTS = ("nccl", "copy_engine")
#: Every transport, by name.
TRANSPORTS = (CPU_TRANSPORT, *GPU_TRANSPORTS)
#: The default setting: the fastest transport the device and the group allow.
AUTO_TRANSPORT = "auto"
#: What a transport setting may say (``ZEROPREFILL_ASYNCEP_TRANSPORT``, ``--transport``).
TRANSPORT_SETTINGS = (AUTO_TRANSPORT, *TRANSPORTS)


def resolve_transport(setting: str, device_type: str = "cuda", nodes: int = 1, symmetric_memory: bool = True) -> str:
    """The transport that gathers for ``setting`` on ``device_type`` (a torch device type; a GPU
    deployment unless told) over ``nodes`` nodes.

    ``auto``: gloo off CUDA; on CUDA the copy engine (about half NCCL's slowdown of the GEMMs it
    hides behind: docs/design.md) when torch has symmetric memory and the group is inside one
    node (the copy engine reads peer memory, which only a node's GPUs share), else NCCL. A
    named transport is returned as it is. ``symmetric_memory``: whether this torch has
    ``torch.distributed._symmetric_memory`` (every torch this package supports, >= 2.6, has it).

    Raises ``ValueError`` for an unknown setting, or the copy engine named across nodes.
    """
    if setting not in TRANSPORT_SETTINGS:
        raise ValueError(f"unknown transport {setting!r}; choose one of {', '.join(TRANSPORT_SETTINGS)}")
    if setting == "copy_engine" and nodes > 1:
        raise ValueError("the copy_engine transport reads peer GPU memory inside one node; use nccl across nodes")
    if setting != AUTO_TRANSPORT:
        return setting
    if device_type != "cuda":
        return CPU_TRANSPORT
    return "copy_engine" if symmetric_memory and nodes == 1 else "nccl"
