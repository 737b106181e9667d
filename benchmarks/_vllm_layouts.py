"""``vllm_serve.py``'s choices: the layouts it compares, the models it serves, the machine's GPUs.

- :data:`LAYOUTS`: each way of serving (stock vLLM's parallelism flags, or AsyncEP's, and the
  environment that picks AsyncEP's transport or step budget);
- :class:`ModelChoice` (``--models NAME:LAYERS``): a shipped config cut to its first layers,
  served with dummy weights, and its true-FLOPs spec;
- the GPUs this process may use and their datasheet peaks for MFU (``--peak-tflops`` else).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _serving import nvidia_smi
from vllm_zeroprefill.server import asyncep_args
from zeroprefill.common.hardware import shipped_gpu_for, shipped_profile
from zeroprefill.common.model_spec import MoEModelSpec, stored_weight_dtype
from zeroprefill.tiny_model import write_dummy_checkpoint

REPO = Path(__file__).resolve().parents[1]

TRANSPORT_ENV = "ZEROPREFILL_ASYNCEP_TRANSPORT"
BUDGET_ENV = "ZEROPREFILL_STEP_FLOPS_BUDGET"
#: A FLOPs step budget no step reaches: vLLM's token budget is then the only per-step limit.
UNREACHABLE_FLOPS_BUDGET = 1e30


def is_asyncep_layout(name: str) -> bool:
    """Whether the layout named ``name`` serves AsyncEP: every AsyncEP layout's name starts with
    "asyncep". Decided by the name, not by :data:`LAYOUTS`, so that a results file keeps
    summarizing after one of its layouts was renamed or dropped (``--merge`` into a file that
    holds ``asyncep-fp8-m-indices``, the m_indices variant of the sessions when psum was the
    default)."""
    return name.startswith("asyncep")


@dataclass(frozen=True)
class Layout:
    name: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    token_budget_steps: bool = False  # AsyncEP steps limited by --max-num-batched-tokens alone, as stock's
    dtypes: tuple[str, ...] = ()  # the checkpoint formats it serves (ModelChoice.dtype); empty: any

    def refuses(self, dtype: str) -> str | None:
        """Why this layout does not serve a ``dtype`` checkpoint, or None if it does."""
        if self.dtypes and dtype not in self.dtypes:
            return f"{self.name} serves {' and '.join(self.dtypes)} checkpoints only, not {dtype}"
        return None

    @property
    def is_asyncep(self) -> bool:
        return is_asyncep_layout(self.name)

    @property
    def data_parallel_size(self) -> int:
        return self._size("--data-parallel-size")

    @property
    def gpus(self) -> int:
        return self.data_parallel_size * self._size("--tensor-parallel-size")

    def _size(self, flag: str) -> int:
        return int(self.args[self.args.index(flag) + 1]) if flag in self.args else 1

    def step_budget_policy(self, batched_tokens: int) -> str:
        if not self.is_asyncep:
            return f"vLLM's scheduler: --max-num-batched-tokens {batched_tokens} per step"
        if self.token_budget_steps:
            return (f"prefill-only scheduler, FLOPs budget {UNREACHABLE_FLOPS_BUDGET:.0e} (out of reach): "
                    f"--max-num-batched-tokens {batched_tokens} per step, as stock")
        return "prefill-only scheduler, the plugin's default FLOPs budget (step_budget: its log line)"


# Stock DP=2 + EP runs vLLM's default all-to-all (all-gather / reduce-scatter). The image has
# no DeepEP or pplx, and vLLM 0.26 maps "--all2all-backend naive" to that same default, so no
# other all-to-all backend can be compared here.
LAYOUTS = {
    layout.name: layout
    for layout in [
        # One GPU. AsyncEP at DP=1 stores every expert and gathers nothing from another rank.
        Layout("stock", ()),
        Layout("asyncep", tuple(asyncep_args(1)), token_budget_steps=True),
        # AsyncEP with DeepGEMM's block-FP8 GEMMs on the psum row layout (kernels/deepgemm.py: only
        # real row blocks scheduled), not the default: its server answered 15-18% fewer tokens/s.
        Layout("asyncep-fp8-psum", tuple(asyncep_args(1)), (("ZEROPREFILL_DEEPGEMM_FP8_LAYOUT", "psum"),),
               token_budget_steps=True, dtypes=("fp8",)),
        # Stock with another MoE backend forced. For block FP8 on Hopper, vLLM 0.26-0.32's
        # automatic choice puts TRITON first unless EP > 1 (then FlashInfer CUTLASS;
        # fused_moe/oracle/fp8.py, _get_priority_backends), so DeepGEMM's grouped GEMMs run at
        # one rank only when asked for. "deep_gemm" serves block FP8 only (vLLM's bf16 MoE
        # refuses it); FlashInfer's CUTLASS MoE takes bf16 and block FP8 on Hopper.
        Layout("stock-deepgemm", ("--moe-backend", "deep_gemm"), dtypes=("fp8",)),
        Layout("stock-flashinfer-cutlass", ("--moe-backend", "flashinfer_cutlass")),
        Layout("stock-dp2-ep", ("--data-parallel-size", "2", "--enable-expert-parallel")),
        # vLLM's dual-batch overlap (its two-batch overlap: two micro-batches, one's exchange
        # under the other's compute; steps above --dbo-prefill-token-threshold, 512 tokens).
        # It yields inside the modular MoE kernels' dispatch/combine; whether the default
        # all-gather/reduce-scatter backend overlaps anything is what the run shows.
        Layout("stock-dp2-ep-dbo", ("--data-parallel-size", "2", "--enable-expert-parallel", "--enable-dbo")),
        Layout("stock-tp2", ("--tensor-parallel-size", "2")),
        Layout("stock-tp2-ep", ("--tensor-parallel-size", "2", "--enable-expert-parallel")),
        # TP=2 fuses all-reduce with RMSNorm through FlashInfer, whose "auto" backend picks
        # MNNVL; with NVLink multicast off (shared hosts) stock TP=2 crashed in CUDA-graph
        # profiling on 2 x H200. TRT-LLM's backend is vLLM's single-node alternative.
        Layout("stock-tp2-trtllm-ar", ("--tensor-parallel-size", "2"), (("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "trtllm"),)),
        Layout("asyncep-copy-engine", tuple(asyncep_args(2)), ((TRANSPORT_ENV, "copy_engine"),)),
        Layout("asyncep-copy-engine-token-budget", tuple(asyncep_args(2)), ((TRANSPORT_ENV, "copy_engine"),),
               token_budget_steps=True),
        Layout("asyncep-nccl", tuple(asyncep_args(2)), ((TRANSPORT_ENV, "nccl"),)),
        # CUDA graphs against none, for the batches graphs are captured for (<= 512 tokens).
        Layout("asyncep-copy-engine-eager", (*asyncep_args(2), "--enforce-eager"), ((TRANSPORT_ENV, "copy_engine"),)),
    ]
}


@dataclass(frozen=True)
class ModelChoice:
    name: str  # a config in common/model_configs
    layers: int

    @property
    def key(self) -> str:
        return f"{self.name}:{self.layers}"

    @property
    def config(self) -> dict:
        return json.loads((REPO / "common" / "model_configs" / f"{self.name}.json").read_text())

    @property
    def dtype(self) -> str:
        """The weights' format as the planner names it: ``"fp8"`` for block FP8, else ``"bf16"``."""
        return stored_weight_dtype(self.config) or "bf16"


def parse_model(text: str) -> ModelChoice:
    name, _, layers = text.partition(":")
    config = REPO / "common" / "model_configs" / f"{name}.json"
    if not config.exists():
        shipped = sorted(p.stem for p in config.parent.glob("*.json"))
        raise argparse.ArgumentTypeError(f"no shipped config {name!r}; choose one of {shipped}")
    full = json.loads(config.read_text())["num_hidden_layers"]
    count = int(layers) if layers else full
    if not 1 <= count <= full:
        raise argparse.ArgumentTypeError(f"{name} has {full} layers; asked for {count}")
    return ModelChoice(name, count)


def model_dir(work: Path, model: ModelChoice) -> Path:
    """The shipped config plus a generated tokenizer (requests send token ids below 500)."""
    out = work / model.name
    if not (out / "config.json").exists():
        write_dummy_checkpoint(REPO / "common" / "model_configs" / f"{model.name}.json", out)
    return out


def model_spec(model: ModelChoice) -> MoEModelSpec:
    config = model.config
    config["num_hidden_layers"] = model.layers
    return MoEModelSpec.from_hf_config(config)


# -- the machine ------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """Names of the GPUs this process may use: nvidia-smi's, in ``CUDA_VISIBLE_DEVICES``' order
    where that lists indices. No CUDA context is created here (it would take memory from the
    servers' budgets)."""
    try:
        out = nvidia_smi("index,name", timeout_s=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = dict(line.split(", ", 1) for line in out.splitlines() if ", " in line)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(names.values())
    wanted = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if all(entry.isdigit() for entry in wanted):
        return [names[entry] for entry in wanted if entry in names]
    return list(names.values())[: len(wanted)]  # UUIDs: as many as listed


def datasheet_peak(gpu_name: str, dtype: str) -> tuple[float, str] | None:
    """Dense peak TFLOP/s of one GPU for ``dtype`` ("bf16", "fp8") and where it comes from, from
    the shipped hardware profiles; None for a GPU without one."""
    gpu = shipped_gpu_for(gpu_name)
    if gpu is None:
        return None
    quantity = shipped_profile(gpu, 1).peak_tflops[dtype]
    return quantity.value, f"{gpu} {dtype}, {quantity.source}"


def peaks_for(gpu_name: str, override: float | None) -> dict[str, tuple[float, str]]:
    """Peak TFLOP/s per weight format (and its source) for MFU: ``--peak-tflops``, else the datasheet's."""
    if override is not None:
        return {dtype: (override, "--peak-tflops") for dtype in ("bf16", "fp8")}
    found = {dtype: datasheet_peak(gpu_name, dtype) for dtype in ("bf16", "fp8")}
    return {dtype: peak for dtype, peak in found.items() if peak is not None}
