"""Hardware profiles: the measured rates the saturation threshold and the planner are made of.

A :class:`HardwareProfile` describes one GPU kind in a group of ``num_gpus`` GPUs of one node:

================================  =============================================================
``gemm_tflops[dtype]``            GEMM rate at MoE shapes (bf16, fp8): the compute rate ``R``
``peak_tflops[dtype]``            datasheet dense peak, the MFU denominator
``hbm_gbps``                      device-to-device copy bandwidth (read + write bytes / time)
``gpu_memory_bytes``              memory the framework sees (``torch.cuda.mem_get_info`` total)
``allgather[transport]``          bus bandwidth vs per-rank message size (table, interpolated)
                                  and the GEMM slowdown while that AllGather runs (overlap tax)
``alltoall_bus_gbps``             NCCL AllToAll bus bandwidth (AllToAll-EP's dispatch/combine)
``internode_gbps_per_node``       network bandwidth out of one node (e.g. 8 x 400 Gb/s)
================================  =============================================================

Bus bandwidth follows nccl-tests: a collective over ``N`` ranks moving ``S`` bytes per rank
takes ``S * (N - 1) / busbw`` (AllGather: ``S`` = shard sent by each rank). The GEMM slowdown
``s`` is the fractional increase of GEMM time while the collective runs, so the rate under
concurrent communication is ``R_eff = R / (1 + s)``.

Every number carries its provenance (``source``): ``"measured: ..."`` (docs/design.md
measurements or ``zeroprefill calibrate``), ``"estimated: ..."`` (derived from a datasheet)
or ``"extrapolated: ..."`` (carried over from a measured neighbour). Shipped profiles live in
``profiles/<gpu>x<num_gpus>.json`` inside this package.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from zeroprefill.common.transport_choice import GPU_TRANSPORTS

#: GPU kinds with shipped profiles and the group sizes shipped for each.
SHIPPED_GPUS = ("h100", "h200")
SHIPPED_GPU_COUNTS = (1, 2, 4, 8)
#: Compute/weight formats a profile rates.
DTYPES = ("bf16", "fp8")


class HardwareProfileError(ValueError):
    """A profile cannot be found, read or used: the message names the bad value."""


@dataclass(frozen=True)
class Quantity:
    """A number and where it comes from."""

    value: float
    source: str


@dataclass(frozen=True)
class BandwidthPoint:
    """Bus bandwidth of a collective at one per-rank message size."""

    message_bytes: int
    bus_gbps: float
    source: str


@dataclass(frozen=True)
class AllGatherProfile:
    """One AllGather transport: bus bandwidth vs message size, and its overlap tax."""

    points: tuple[BandwidthPoint, ...]  # sorted by message_bytes
    gemm_slowdown: Quantity  # fractional GEMM time increase while the gather runs

    def bus_gbps(self, message_bytes: float) -> float:
        """Bus bandwidth at ``message_bytes`` per rank: linear in log(size), clamped at ends."""
        sizes = [p.message_bytes for p in self.points]
        if message_bytes <= sizes[0]:
            return self.points[0].bus_gbps
        if message_bytes >= sizes[-1]:
            return self.points[-1].bus_gbps
        hi = bisect.bisect_left(sizes, message_bytes)
        lo_point, hi_point = self.points[hi - 1], self.points[hi]
        t = math.log(message_bytes / lo_point.message_bytes) / math.log(
            hi_point.message_bytes / lo_point.message_bytes
        )
        return lo_point.bus_gbps + t * (hi_point.bus_gbps - lo_point.bus_gbps)


@dataclass(frozen=True)
class HardwareProfile:
    """Rates of one GPU kind in a group of ``num_gpus`` GPUs (see the module docstring)."""

    name: str
    gpu_name: str
    num_gpus: int
    gpus_per_node: int
    gpu_memory_bytes: Quantity
    peak_tflops: dict[str, Quantity]
    gemm_tflops: dict[str, Quantity]
    hbm_gbps: Quantity
    allgather: dict[str, AllGatherProfile]  # empty for a single GPU
    alltoall_bus_gbps: Quantity | None
    internode_gbps_per_node: Quantity
    notes: tuple[str, ...] = field(default=())

    # -- the rates the planner asks for ---------------------------------------------------
    def compute_tflops(self, dtype: str) -> float:
        """GEMM rate ``R`` at MoE shapes for ``dtype`` compute."""
        return self._dtype_entry(self.gemm_tflops, dtype, "gemm_tflops").value

    def peak(self, dtype: str) -> float:
        return self._dtype_entry(self.peak_tflops, dtype, "peak_tflops").value

    def gather(self, transport: str = "nccl") -> AllGatherProfile:
        if transport not in GPU_TRANSPORTS:
            raise HardwareProfileError(
                f"unknown transport {transport!r}; choose one of {', '.join(GPU_TRANSPORTS)}"
            )
        if transport not in self.allgather:
            have = ", ".join(self.allgather) or "none (single-GPU profile)"
            raise HardwareProfileError(
                f"profile {self.name!r} has no {transport} AllGather measurements (has: {have}); "
                f"use a multi-GPU profile or run `zeroprefill calibrate` on several GPUs"
            )
        return self.allgather[transport]

    def effective_tflops(self, dtype: str, transport: str = "nccl") -> float:
        """``R_eff = R / (1 + s)``: the GEMM rate while ``transport`` gathers concurrently."""
        return self.compute_tflops(dtype) / (1.0 + self.gather(transport).gemm_slowdown.value)

    def _dtype_entry(self, table: dict[str, Quantity], dtype: str, what: str) -> Quantity:
        if dtype not in table:
            raise HardwareProfileError(
                f"profile {self.name!r} has no {what} for dtype {dtype!r}; has {sorted(table)}"
            )
        return table[dtype]

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def q(quantity: Quantity | None) -> dict[str, Any] | None:
            return None if quantity is None else {"value": quantity.value, "source": quantity.source}

        return {
            "name": self.name,
            "gpu_name": self.gpu_name,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "gpu_memory_bytes": q(self.gpu_memory_bytes),
            "peak_tflops": {k: q(v) for k, v in self.peak_tflops.items()},
            "gemm_tflops": {k: q(v) for k, v in self.gemm_tflops.items()},
            "hbm_gbps": q(self.hbm_gbps),
            "allgather": {
                name: {
                    "bus_gbps_by_message_bytes": [
                        {"message_bytes": p.message_bytes, "bus_gbps": p.bus_gbps, "source": p.source}
                        for p in ag.points
                    ],
                    "gemm_slowdown": q(ag.gemm_slowdown),
                }
                for name, ag in self.allgather.items()
            },
            "alltoall_bus_gbps": q(self.alltoall_bus_gbps),
            "internode_gbps_per_node": q(self.internode_gbps_per_node),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "profile") -> HardwareProfile:
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, HardwareProfileError):
                raise
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise HardwareProfileError(f"{origin} is not a valid hardware profile: {detail}") from exc

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        def q(entry: Any) -> Quantity:
            return Quantity(float(entry["value"]), str(entry["source"]))

        allgather = {}
        for name, entry in data["allgather"].items():
            if name not in GPU_TRANSPORTS:
                raise ValueError(f"unknown transport {name!r} in allgather")
            points = sorted(
                (
                    BandwidthPoint(int(p["message_bytes"]), float(p["bus_gbps"]), str(p["source"]))
                    for p in entry["bus_gbps_by_message_bytes"]
                ),
                key=lambda p: p.message_bytes,
            )
            if not points or any(p.message_bytes <= 0 or p.bus_gbps <= 0 for p in points):
                raise ValueError(f"allgather.{name} needs positive (message_bytes, bus_gbps) points")
            allgather[name] = AllGatherProfile(tuple(points), q(entry["gemm_slowdown"]))
        profile = cls(
            name=str(data["name"]),
            gpu_name=str(data["gpu_name"]),
            num_gpus=int(data["num_gpus"]),
            gpus_per_node=int(data["gpus_per_node"]),
            gpu_memory_bytes=Quantity(
                int(data["gpu_memory_bytes"]["value"]), str(data["gpu_memory_bytes"]["source"])
            ),
            peak_tflops={k: q(v) for k, v in data["peak_tflops"].items()},
            gemm_tflops={k: q(v) for k, v in data["gemm_tflops"].items()},
            hbm_gbps=q(data["hbm_gbps"]),
            allgather=allgather,
            alltoall_bus_gbps=q(data["alltoall_bus_gbps"]) if data.get("alltoall_bus_gbps") else None,
            internode_gbps_per_node=q(data["internode_gbps_per_node"]),
            notes=tuple(str(n) for n in data.get("notes", ())),
        )
        for what, table in (("gemm_tflops", profile.gemm_tflops), ("peak_tflops", profile.peak_tflops)):
            if not table or any(v.value <= 0 for v in table.values()):
                raise ValueError(f"{what} needs positive rates, got {data[what]}")
        if profile.num_gpus < 1 or profile.gpus_per_node < 1:
            raise ValueError(f"num_gpus and gpus_per_node must be >= 1, got {profile.num_gpus}")
        return profile

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def shipped_profile_names() -> list[str]:
    """Names of the profiles shipped with the package (``h200x4``, ...)."""
    folder = resources.files("zeroprefill.common") / "profiles"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def shipped_gpu_for(device_name: str) -> str | None:
    """The shipped GPU kind of a CUDA device name (``"NVIDIA H200"`` -> ``"h200"``), else None."""
    name = device_name.lower()
    return next((gpu for gpu in SHIPPED_GPUS if gpu in name), None)


def shipped_profile(gpu: str, num_gpus: int) -> HardwareProfile:
    """The shipped profile for ``gpu`` (``"h100"``/``"h200"``) in a group of ``num_gpus``."""
    gpu = gpu.lower()
    if gpu not in SHIPPED_GPUS:
        raise HardwareProfileError(
            f"no shipped profile for gpu {gpu!r}; choose one of {', '.join(SHIPPED_GPUS)} "
            f"or pass --profile FILE (from `zeroprefill calibrate`)"
        )
    if num_gpus not in SHIPPED_GPU_COUNTS:
        raise HardwareProfileError(
            f"no shipped {gpu} profile for {num_gpus} GPUs; shipped: "
            f"{', '.join(map(str, SHIPPED_GPU_COUNTS))} (per node; use --nodes for more)"
        )
    return load_profile(f"{gpu}x{num_gpus}")


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a shipped profile by name (``"h200x4"``) or a profile JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise HardwareProfileError(f"no profile file at {str(path)!r}")
        text, origin = path.read_text(), str(path)
    else:
        resource = resources.files("zeroprefill.common") / "profiles" / f"{name_or_path}.json"
        if not resource.is_file():
            raise HardwareProfileError(
                f"unknown profile {str(name_or_path)!r}; shipped: {', '.join(shipped_profile_names())}"
            )
        text, origin = resource.read_text(), f"shipped profile {name_or_path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HardwareProfileError(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HardwareProfileError(f"{origin} is not a valid hardware profile: expected an object")
    return HardwareProfile.from_dict(data, origin)
