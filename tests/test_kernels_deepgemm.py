"""The DeepGEMM experts path (``kernels/deepgemm.py``) and the kernel selection, without DeepGEMM.

A fake ``deep_gemm`` module (plain torch) stands in for sgl-deep-gemm 0.1.3 with the contract
``deepgemm.py`` documents: the FP8 grouped GEMM dequantises ``a`` with its 1x128 group scales
(any strides; it records them) and ``b`` with its 128x128 block scales, takes each row block's
expert from its first row and requires rows marked -1 to be a block's tail; the bf16 one reads
the psum layout (expert e's rows ``[align(psum[e-1], 128), psum[e])``). Rows outside every
expert come back as NaN (DeepGEMM leaves them unspecified), so output that read one would show
it. Everything of ours around the GEMMs (alignment, scatter with 1x128 quantisation, SiLU*mul,
combine) runs for real, in the Triton interpreter on CPU.

Tolerances, as max|out - ref| / max|ref|. Against the reference at the path's precision
(:func:`reference_with_bf16_gemm_outputs`: GEMM outputs rounded to bf16, as DeepGEMM writes
them): 1e-2; 2e-2 for bf16 in the interpreter, whose fp32->bf16 stores truncate where GPUs round
to nearest (SiLU*mul's output, the combine's). Against ``fused_experts_reference`` (fp32
intermediates; FP8: the dequantised weights and the same 1x128 activation quantisation): bf16
2e-2 as in ``test_kernels.py``; FP8 5e-2, because gate/up rounded to bf16 before the e4m3
quantisation flips some activations' rounding (up to 3.4e-2 seen with I=128, top-2; 1.7e-2 in
plain torch at H=4096, I=1536, top-8). Tests that break the fake on purpose check that a wrong
alignment, a wrong scale layout, or a read of a padding row fails.
"""

from __future__ import annotations

import logging
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from zeroprefill.common.asyncep_moe import select_experts
from zeroprefill.kernels import (EXPERTS_KERNEL_ENV, deepgemm_experts, deepgemm_unavailable_reason,
                                 dequantize_fp8_block, experts_kernel_choice, fused_experts, fused_experts_reference,
                                 quantize_weights_fp8_block, quantize_weights_fp8_rowwise)
from zeroprefill.kernels import deepgemm, fused_moe

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
PSUM_ALIGNMENT = 128


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


class FakeDeepGEMM(types.ModuleType):
    """``deep_gemm``'s contiguous grouped GEMMs in plain torch, checking what the real one asserts.

    ``alignment`` is what the FP8 GEMM requires of expert segments, ``reported_alignment`` what
    ``get_mk_alignment_for_contiguous_layout`` says (equal unless a test makes it lie);
    ``read_sfa`` maps the activation scales to ``[M, ceil(K/128)]`` values (a test swaps in a
    wrong one).
    """

    def __init__(self, alignment: int = 128, reported_alignment: int | None = None, read_sfa=None,
                 version: str = "0.1.3+fake", fp8_psum: bool = False):
        super().__init__("deep_gemm")
        self.__version__ = version
        self.fp8_psum = fp8_psum  # whether the sm90 FP8 GEMM takes the psum layout (DeepGEMM 2.5.0)
        self.alignment = alignment
        self.reported_alignment = reported_alignment or alignment
        self.read_sfa = read_sfa or (lambda sfa: sfa)
        self.calls: list[str] = []
        self.sfa_strides: list[tuple[int, ...]] = []

    def get_mk_alignment_for_contiguous_layout(self) -> int:
        return self.reported_alignment

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                         compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                         expected_m_for_psum_layout=None) -> None:
        (a, sfa), (b, sfb) = a, b
        if use_psum_layout and not self.fp8_psum:  # a build whose host code asserts it off
            raise RuntimeError("Assertion error (csrc/apis/gemm.hpp): not use_psum_layout")
        assert recipe in (None, (1, 128, 128)) and recipe_a is None and recipe_b is None
        m, k = a.shape
        num_groups, n, k_ = b.shape
        assert a.dtype == b.dtype == torch.float8_e4m3fn and k == k_ and a.stride(-1) == 1 and b.is_contiguous()
        assert sfa.dtype == sfb.dtype == torch.float32
        assert tuple(sfa.shape) == (m, -(-k // 128)), f"sfa shape {tuple(sfa.shape)}"
        assert tuple(sfb.shape) == (num_groups, -(-n // 128), -(-k // 128)) and sfb.is_contiguous()
        self.calls.append("fp8 psum" if use_psum_layout else "fp8")
        self.sfa_strides.append(tuple(sfa.stride()))
        a_f = a.float() * self.read_sfa(sfa).repeat_interleave(128, dim=1)[:, :k]
        experts = (self._experts_of_psum(grouped_layout, m, num_groups) if use_psum_layout
                   else self._experts_of_rows(grouped_layout, m))
        self._grouped_product(a_f, dequantize_fp8_block(b, sfb), d, experts)

    def m_grouped_bf16_gemm_nt_contiguous(self, a, b, d, grouped_layout, compiled_dims="nk", use_psum_layout=False,
                                          expected_m_for_psum_layout=None) -> None:
        m, k = a.shape
        num_groups, _, k_ = b.shape
        assert a.dtype == b.dtype == torch.bfloat16 and k == k_ and a.stride(-1) == 1 and b.is_contiguous()
        assert k % 64 == 0, f"sm90 bf16 grouped GEMM needs K % 64 == 0, got {k}"
        self.calls.append("bf16")
        if use_psum_layout:
            experts = self._experts_of_psum(grouped_layout, m, num_groups)
        else:
            experts = self._experts_of_rows(grouped_layout, m)
        self._grouped_product(a.float(), b.float(), d, experts)

    def _experts_of_rows(self, m_indices: torch.Tensor, m: int) -> torch.Tensor:
        assert m_indices.dtype == torch.int32 and m_indices.is_contiguous() and tuple(m_indices.shape) == (m,)
        assert m % self.alignment == 0, f"M={m} is not a multiple of the alignment {self.alignment}"
        for start in range(0, m, self.alignment):
            block = m_indices[start:start + self.alignment]
            valid = block >= 0
            assert not (valid[1:] & ~valid[:-1]).any(), f"rows marked -1 before real rows in block at {start}"
            assert (block[valid] == block[0]).all(), f"block at row {start} mixes experts {block[valid].unique()}"
        return m_indices.long()

    @staticmethod
    def _experts_of_psum(psum: torch.Tensor, m: int, num_groups: int) -> torch.Tensor:
        assert psum.dtype == torch.int32 and psum.is_contiguous() and tuple(psum.shape) == (num_groups,)
        experts = torch.full((m,), -1, dtype=torch.long, device=psum.device)
        end = 0
        for expert, psum_e in enumerate(psum.tolist()):
            start = -(-end // PSUM_ALIGNMENT) * PSUM_ALIGNMENT
            assert start <= psum_e <= m, f"psum[{expert}]={psum_e} outside [{start}, {m}]"
            experts[start:psum_e] = expert
            end = psum_e
        return experts

    @staticmethod
    def _grouped_product(a_f: torch.Tensor, b_f: torch.Tensor, d: torch.Tensor, experts: torch.Tensor) -> None:
        assert d.dtype == torch.bfloat16 and d.stride(-1) == 1 and tuple(d.shape) == (a_f.shape[0], b_f.shape[1])
        assert experts.min() >= -1 and experts.max() < b_f.shape[0]
        d.fill_(float("nan"))  # rows of no expert: unspecified
        for expert in experts.unique().tolist():
            if expert >= 0:
                rows = experts == expert
                d[rows] = (a_f[rows] @ b_f[expert].T).to(torch.bfloat16)


@pytest.fixture(autouse=True)
def fresh_import(monkeypatch):
    """Every test imports ``deep_gemm`` afresh and starts from the default setting."""
    monkeypatch.delenv(EXPERTS_KERNEL_ENV, raising=False)
    monkeypatch.delenv(deepgemm.FP8_LAYOUT_ENV, raising=False)
    monkeypatch.setattr(deepgemm, "_fp8_psum_refused", None)
    deepgemm._load.cache_clear()
    yield
    deepgemm._load.cache_clear()


@pytest.fixture
def fake_deep_gemm(monkeypatch):
    """Install a :class:`FakeDeepGEMM` as ``deep_gemm`` and let DeepGEMM run on this device."""

    def install(fake: FakeDeepGEMM | None = None) -> FakeDeepGEMM:
        fake = fake or FakeDeepGEMM()
        monkeypatch.setitem(sys.modules, "deep_gemm", fake)
        return fake

    monkeypatch.setattr(deepgemm, "device_unsupported_reason", lambda device: None)
    return install


def make_layer(num_experts: int, hidden: int, inter: int, fp8: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5
    if not fp8:
        return {"w13": w13.bfloat16().to(DEVICE), "w2": w2.bfloat16().to(DEVICE)}
    (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
    return {"w13": w13_q.to(DEVICE), "w2": w2_q.to(DEVICE),
            "w13_scale": w13_s.to(DEVICE), "w2_scale": w2_s.to(DEVICE)}


def make_tokens(num_tokens: int, hidden: int, num_experts: int, top_k: int, idle_experts: tuple[int, ...] = (),
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens and softmax top-k routing; ``idle_experts`` receive no token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().to(DEVICE)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, list(idle_experts)] = float("-inf")
    weights, ids = select_experts(logits.to(DEVICE), top_k, renormalize=True)
    return x, weights.contiguous(), ids.contiguous()


def reference_with_bf16_gemm_outputs(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                                     layer: dict) -> torch.Tensor:
    """``fused_experts_reference`` at the DeepGEMM path's precision: both GEMMs' outputs rounded to
    bf16 (before SiLU*mul, and before the fp32 combine), SiLU*mul's output quantised (FP8: e4m3
    in 1x128 groups; bf16: rounded to bf16)."""
    w13, w2 = layer["w13"], layer["w2"]
    fp8 = "w13_scale" in layer
    if fp8:
        w13, w2 = dequantize_fp8_block(w13, layer["w13_scale"]), dequantize_fp8_block(w2, layer["w2_scale"])

    def activation_quant(a: torch.Tensor) -> torch.Tensor:
        return dequantize_fp8_block(*quantize_weights_fp8_block(a, (1, 128)), (1, 128)) if fp8 else a.bfloat16().float()

    inter = w2.shape[2]
    x = activation_quant(x.float())
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        tokens, slots = torch.nonzero(ids == expert, as_tuple=True)
        gate_up = (x[tokens] @ w13[expert].float().T).bfloat16().float()
        act = activation_quant(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        y = (act @ w2[expert].float().T).bfloat16().float()
        out.index_add_(0, tokens, y * weights[tokens, slots, None])
    return out.bfloat16()


def run(x, weights, ids, layer: dict, kernel=fused_experts) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel``'s output and the reference's."""
    return kernel(x, topk_weights=weights, topk_ids=ids, **layer), fused_experts_reference(x, topk_weights=weights,
                                                                                           topk_ids=ids, **layer)


# ---------------------------------------------------------------------------- the glue, end to end

@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_tokens", [1, 200])
def test_deepgemm_path_matches_reference(fake_deep_gemm, fp8, num_tokens, monkeypatch):
    fake = fake_deep_gemm()
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "deepgemm")  # auto takes DeepGEMM for FP8 only
    num_experts, top_k, hidden, inter = 6, 2, 256, 128
    layer = make_layer(num_experts, hidden, inter, fp8)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, idle_experts=(2, 5))
    out, ref = run(x, weights, ids, layer)
    assert fake.calls == (["fp8", "fp8"] if fp8 else ["bf16", "bf16"])
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, hidden) and not out.isnan().any()
    assert rel_err(out, reference_with_bf16_gemm_outputs(x, weights, ids, layer)) < (1e-2 if fp8 or ON_GPU else 2e-2)
    assert rel_err(out, ref) < (5e-2 if fp8 else 2e-2)
    if fp8:  # the activation scales went in MN-major with a 16-byte aligned stride: no transpose on the GPU
        for stride, rows in zip(fake.sfa_strides, (ids.numel(),) * 2):
            assert stride[0] == 1 and stride[1] % 4 == 0 and stride[1] >= rows


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_deepgemm_path_zero_tokens(fake_deep_gemm, fp8):
    fake = fake_deep_gemm()
    layer = make_layer(4, 128, 128, fp8)
    x = torch.empty(0, 128, dtype=torch.bfloat16, device=DEVICE)
    out = deepgemm_experts(x, topk_weights=torch.empty(0, 2, device=DEVICE),
                           topk_ids=torch.empty(0, 2, dtype=torch.int32, device=DEVICE), **layer)
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16 and fake.calls == []


def test_fp8_follows_the_reported_alignment(fake_deep_gemm):
    """Segments padded to what ``get_mk_alignment_for_contiguous_layout`` says (here 64)."""
    fake = fake_deep_gemm(FakeDeepGEMM(alignment=64))
    layer = make_layer(5, 128, 128, fp8=True)
    x, weights, ids = make_tokens(70, 128, 5, 3, idle_experts=(0,))
    out, ref = run(x, weights, ids, layer, kernel=deepgemm_experts)
    assert fake.calls == ["fp8", "fp8"] and rel_err(out, ref) < 3e-2


def test_fp8_psum_asked_of_a_deepgemm_aligning_to_64_runs_m_indices_and_says_why(fake_deep_gemm, caplog):
    """The psum scheduler assumes segments aligned to 128 rows; a DeepGEMM that reports another
    alignment is answered on m_indices, with one warning."""
    fake = fake_deep_gemm(FakeDeepGEMM(alignment=64, version="2.5.0", fp8_psum=True))
    layer = make_layer(5, 128, 128, fp8=True)
    x, weights, ids = make_tokens(70, 128, 5, 3)
    with caplog.at_level(logging.INFO, logger="zeroprefill.kernels.deepgemm"):
        out = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, fp8_layout="psum", **layer)
    assert fake.calls == ["fp8", "fp8"] and torch.equal(out, deepgemm_experts(x, topk_weights=weights, topk_ids=ids,
                                                                                **layer))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "aligns expert segments to 64 rows, the psum layout to 128" in caplog.records[0].getMessage()


@pytest.mark.parametrize("by", ["setting", "argument"])
def test_fp8_psum_layout_schedules_only_real_rows(fake_deep_gemm, monkeypatch, by):
    """The psum layout (``ZEROPREFILL_DEEPGEMM_FP8_LAYOUT=psum``, or ``fp8_layout="psum"``) on a
    DeepGEMM that takes it: both FP8 GEMMs read it (rows past every expert's real rows come back
    NaN from the fake, so the output would show a read of one), as close to the reference as the
    default m_indices layout."""
    fake = fake_deep_gemm(FakeDeepGEMM(version="2.5.0", fp8_psum=True))
    layer = make_layer(6, 256, 128, fp8=True)
    x, weights, ids = make_tokens(200, 256, 6, 2, idle_experts=(2, 5))
    by_rows = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    assert fake.calls == ["fp8", "fp8"]  # the default
    if by == "setting":
        monkeypatch.setenv(deepgemm.FP8_LAYOUT_ENV, "psum")
        out, ref = run(x, weights, ids, layer, kernel=deepgemm_experts)
    else:
        out = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, fp8_layout="psum", **layer)
    assert fake.calls[2:] == ["fp8 psum", "fp8 psum"] and not out.isnan().any()
    assert rel_err(out, reference_with_bf16_gemm_outputs(x, weights, ids, layer)) < 1e-2
    assert torch.equal(out, by_rows)


@pytest.mark.parametrize(("version", "why"), [("0.1.3", "predates DeepGEMM 2.5"),  # not even tried
                                             ("2.5.0", "not use_psum_layout")])  # tried, its host code refuses
def test_fp8_psum_refused_falls_back_to_m_indices_once(fake_deep_gemm, monkeypatch, caplog, version, why):
    """A DeepGEMM that does not take the psum layout for FP8 (older than 2.5.0, or one whose host
    code asserts it off), asked for it: the first call is answered on m_indices, one warning says
    why, later calls do not try psum."""
    fake = fake_deep_gemm(FakeDeepGEMM(version=version, fp8_psum=False))
    monkeypatch.setenv(deepgemm.FP8_LAYOUT_ENV, "psum")
    layer = make_layer(4, 128, 128, fp8=True)
    x, weights, ids = make_tokens(40, 128, 4, 2)
    with caplog.at_level(logging.INFO, logger="zeroprefill.kernels.deepgemm"):
        first, ref = run(x, weights, ids, layer, kernel=deepgemm_experts)
        second = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, **layer)
        asked = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, fp8_layout="psum", **layer)
    assert torch.equal(asked, first)  # asked for by name after the refusal: m_indices, no second warning
    assert fake.calls == ["fp8"] * 6  # a refused call raises before it is recorded
    assert torch.equal(first, second) and rel_err(first, ref) < 5e-2
    assert why in deepgemm.fp8_psum_refused_reason()
    said = [(r.levelno, r.getMessage().count("does not take the psum layout")) for r in caplog.records]
    assert said == [(logging.WARNING, 1)]
    assert deepgemm.fp8_layout_setting() == "m_indices"


def test_fp8_layout_setting_is_checked(monkeypatch):
    monkeypatch.setenv(deepgemm.FP8_LAYOUT_ENV, " PSUM ")
    assert deepgemm.fp8_layout_setting() == "psum"
    monkeypatch.setenv(deepgemm.FP8_LAYOUT_ENV, "rows")
    with pytest.raises(ValueError, match="ZEROPREFILL_DEEPGEMM_FP8_LAYOUT='rows' is not one of m_indices, psum"):
        deepgemm.fp8_layout_setting()
    with pytest.raises(ValueError, match="fp8_layout='rows'"):
        deepgemm_experts(torch.zeros(1, 128), torch.zeros(1, 256, 128), torch.zeros(1, 128, 128),
                         torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), fp8_layout="rows")


# ---------------------------------------------------------------------------- the checks can fail

def test_wrong_alignment_is_caught(fake_deep_gemm):
    """A deep_gemm that needs 128-row segments but reports 64: the glue's layout is rejected."""
    fake_deep_gemm(FakeDeepGEMM(alignment=128, reported_alignment=64))
    layer = make_layer(4, 128, 128, fp8=True)
    x, weights, ids = make_tokens(40, 128, 4, 2)
    with pytest.raises(AssertionError, match="alignment 128|mixes experts|before real rows"):
        deepgemm_experts(x, topk_weights=weights, topk_ids=ids, **layer)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter on garbled scales: inf, NaN
def test_wrong_scale_layout_is_caught(fake_deep_gemm):
    """A GEMM that read the activation scales row-major (ignoring their MN-major strides) is off."""
    fake_deep_gemm(FakeDeepGEMM(read_sfa=lambda sfa: torch.as_strided(sfa, sfa.shape, (sfa.shape[1], 1))))
    layer = make_layer(4, 256, 128, fp8=True)
    x, weights, ids = make_tokens(50, 256, 4, 2)
    out, ref = run(x, weights, ids, layer, kernel=deepgemm_experts)
    assert not rel_err(out, ref) < 5e-2  # what the end-to-end test accepts (NaN, from unwritten scales, fails too)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # SiLU*mul's amax over the NaN rows
def test_reading_a_padding_row_is_caught(fake_deep_gemm, monkeypatch):
    """Rows marked -1 come back NaN: a layout that hides real rows (expert 0's) poisons the output."""
    fake_deep_gemm()
    real_layout = deepgemm.grouped_layout
    monkeypatch.setattr(deepgemm, "grouped_layout",
                        lambda alignment: torch.where(real_layout(alignment) == 0, -1, real_layout(alignment)))
    layer = make_layer(4, 128, 128, fp8=True)
    x, weights, ids = make_tokens(30, 128, 4, 2)
    out = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    assert out[(ids == 0).any(dim=1)].isnan().all() and not out[~(ids == 0).any(dim=1)].isnan().any()


# ---------------------------------------------------------------------------- selection

@pytest.fixture
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(fused_moe, "_logged_choices", set())
    caplog.set_level(logging.INFO, logger=fused_moe.__name__)
    return caplog


def test_invalid_setting_is_one_line_value_error(monkeypatch):
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "cutlass")
    layer = make_layer(4, 64, 64, fp8=False)
    x, weights, ids = make_tokens(3, 64, 4, 2)
    with pytest.raises(ValueError) as info:
        fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    assert str(info.value) == "ZEROPREFILL_EXPERTS_KERNEL='cutlass' is not one of auto, triton, deepgemm"


def test_auto_falls_back_to_ours_for_good_when_deepgemm_raises(fake_deep_gemm, monkeypatch, fresh_log):
    """A DeepGEMM whose entry point has another signature (or whose JIT build fails) raises at the
    first call: auto answers with ours, warns once, and never calls DeepGEMM again; forced raises."""
    fake = fake_deep_gemm()

    def other_signature(*args, **kwargs):
        fake.calls.append("fp8")
        raise TypeError("m_grouped_fp8_gemm_nt_contiguous(): incompatible function arguments")

    monkeypatch.setattr(fake, "m_grouped_fp8_gemm_nt_contiguous", other_signature)
    monkeypatch.setattr(deepgemm, "_failed_at_first_use", None)
    layer = make_layer(4, 128, 128, fp8=True)
    x, weights, ids = make_tokens(5, 128, 4, 2)
    ours = fused_experts(x, topk_weights=weights, topk_ids=ids, config=fused_moe.get_config(5, 2, 4, 128, 128, True, x.device), **layer)
    for _ in range(2):
        assert torch.equal(fused_experts(x, topk_weights=weights, topk_ids=ids, **layer), ours)
    assert fake.calls == ["fp8"]
    assert "failed at first use: TypeError" in deepgemm_unavailable_reason()
    assert sum("MoE experts on ours from now on" in r.getMessage() for r in fresh_log.records) == 1
    monkeypatch.setattr(deepgemm, "_failed_at_first_use", None)
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "deepgemm")
    with pytest.raises(TypeError, match="incompatible function arguments"):
        fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)


def test_auto_takes_deepgemm_for_block_fp8_and_logs_each_choice_once(fake_deep_gemm, fresh_log):
    fake = fake_deep_gemm()
    fp8, bf16 = make_layer(4, 128, 128, fp8=True), make_layer(4, 128, 128, fp8=False)
    x, weights, ids = make_tokens(5, 128, 4, 2)
    for _ in range(2):
        fused_experts(x, topk_weights=weights, topk_ids=ids, **fp8)
        fused_experts(x, topk_weights=weights, topk_ids=ids, **bf16)
    assert fake.calls == ["fp8"] * 4
    fp8_choice = "DeepGEMM (deep_gemm 0.1.3+fake), block FP8 on m_indices rows (ZEROPREFILL_EXPERTS_KERNEL=auto)"
    bf16_choice = ("ours: bf16 (ZEROPREFILL_EXPERTS_KERNEL=auto takes DeepGEMM for block FP8 only; "
                   "deepgemm forces it)")
    assert [r.getMessage() for r in fresh_log.records] == [
        f"zeroprefill.kernels: MoE experts on {fp8_choice}", f"zeroprefill.kernels: MoE experts on {bf16_choice}"]
    assert experts_kernel_choice(torch.bfloat16, fp8["w13"], fp8["w2"], fp8["w13_scale"], fp8["w2_scale"]) == fp8_choice
    assert experts_kernel_choice(torch.bfloat16, bf16["w13"], bf16["w2"]) == bf16_choice


@pytest.mark.parametrize("case,reason", [
    ("unaligned_hidden", "H=96, I=128: DeepGEMM's bf16 grouped GEMM needs both divisible by 64"),
    ("fp8_unaligned_inter", "H=128, I=64: DeepGEMM's block-FP8 grouped GEMM needs both divisible by 128"),
    ("fp32_activations", "activations are torch.float32"),
    ("fp8_rowwise", "FP8-rowwise weights"),
])
def test_layers_deepgemm_cannot_take(fake_deep_gemm, monkeypatch, fresh_log, case, reason):
    """auto: ours, with the reason logged; deepgemm: a one-line error with the same reason."""
    fake = fake_deep_gemm()
    hidden, inter = {"unaligned_hidden": (96, 128), "fp8_unaligned_inter": (128, 64)}.get(case, (128, 128))
    layer = make_layer(4, hidden, inter, fp8=case == "fp8_unaligned_inter")
    x, weights, ids = make_tokens(6, hidden, 4, 2)
    if case == "fp32_activations":
        x, layer = x.float(), {name: w.float() for name, w in layer.items()}
    if case == "fp8_rowwise":
        (w13, w13_s), (w2, w2_s) = (quantize_weights_fp8_rowwise(layer[n].float()) for n in ("w13", "w2"))
        layer = {"w13": w13, "w2": w2, "w13_scale": w13_s, "w2_scale": w2_s}
        monkeypatch.setattr(fused_moe, "grouped_mm_experts", lambda x, *args, **kw: torch.zeros_like(x))  # CUDA-only
    fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    assert fake.calls == []
    assert len(fresh_log.records) == 1
    message = fresh_log.records[0].getMessage()
    fp8_weights = layer["w13"].dtype == torch.float8_e4m3fn
    expected = f"ours, not DeepGEMM: {reason}" if fp8_weights else "ours: bf16"  # auto leaves bf16 to ours
    assert message.startswith(f"zeroprefill.kernels: MoE experts on {expected}")
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "deepgemm")
    with pytest.raises(RuntimeError, match=re.escape(f"ZEROPREFILL_EXPERTS_KERNEL=deepgemm, but DeepGEMM cannot "
                                                     f"run this MoE layer: {reason}")) as info:
        fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    assert "\n" not in str(info.value)


def test_triton_setting_and_explicit_config_run_ours(fake_deep_gemm, monkeypatch):
    fake = fake_deep_gemm()
    layer = make_layer(4, 128, 128, fp8=False)
    x, weights, ids = make_tokens(5, 128, 4, 2)
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "triton")
    ours = fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "deepgemm")
    config = fused_moe.get_config(5, 2, 4, 128, 128, False, x.device)
    assert torch.equal(fused_experts(x, topk_weights=weights, topk_ids=ids, config=config, **layer), ours)
    assert fake.calls == []
    with pytest.raises(ValueError, match="DeepGEMM picks its own"):
        deepgemm_experts(x, topk_weights=weights, topk_ids=ids, config=config, **layer)


def test_forced_deepgemm_says_why_it_cannot_load(monkeypatch, tmp_path):
    monkeypatch.setenv(EXPERTS_KERNEL_ENV, "deepgemm")
    layer = make_layer(4, 128, 128, fp8=False)
    x, weights, ids = make_tokens(3, 128, 4, 2)
    if not ON_GPU:  # the real device check: no CUDA here
        assert deepgemm_unavailable_reason() == "CUDA is not available"
        with pytest.raises(RuntimeError, match="cannot run this MoE layer: tensors are on cpu; DeepGEMM runs on CUDA"):
            fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)

    monkeypatch.setattr(deepgemm, "device_unsupported_reason", lambda device: None)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # not installed
    monkeypatch.delitem(sys.modules, "vllm", raising=False)  # not a vLLM process: vLLM's copy is not looked for
    with pytest.raises(RuntimeError, match=r"deep_gemm is not installed; vllm.third_party.deep_gemm: vllm is not loaded "
                                           r"here \(pip install 'zeroprefill\[deepgemm\]', or serve with a vLLM that ships it\)$"):
        fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)

    broken = tmp_path / "deep_gemm"  # installed, but its library does not load
    broken.mkdir()
    (broken / "__init__.py").write_text('raise OSError("libcudart.so.13: cannot open shared object file:\\n'
                                        '  No such file or directory")\n')
    monkeypatch.delitem(sys.modules, "deep_gemm")
    monkeypatch.syspath_prepend(str(tmp_path))
    deepgemm._load.cache_clear()
    with pytest.raises(RuntimeError, match="import deep_gemm failed: OSError: libcudart.so.13: cannot open shared "
                                           "object file: No such file or directory; "):
        fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)

    old = types.ModuleType("deep_gemm")  # an upstream deep_gemm without these entry points
    old.get_mk_alignment_for_contiguous_layout = lambda: 128
    monkeypatch.setitem(sys.modules, "deep_gemm", old)
    deepgemm._load.cache_clear()
    with pytest.raises(RuntimeError, match="lacks m_grouped_bf16_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_contiguous"):
        fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)


def test_device_check(monkeypatch):
    assert deepgemm.device_unsupported_reason(torch.device("cpu")) == "tensors are on cpu; DeepGEMM runs on CUDA GPUs"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(deepgemm, "device_capability", lambda index: (8, 0))
    assert deepgemm.device_unsupported_reason(torch.device("cuda")) == \
        "cuda:0 is sm80; this path runs DeepGEMM's sm90 kernels (H100/H200) only"
    assert deepgemm_unavailable_reason() == "cuda:0 is sm80; this path runs DeepGEMM's sm90 kernels (H100/H200) only"
    monkeypatch.setattr(deepgemm, "device_capability", lambda index: (9, 0))
    assert deepgemm.device_unsupported_reason(torch.device("cuda", 1)) is None


def test_info_says_whether_deepgemm_is_usable_here(monkeypatch):
    from zeroprefill.environment import collect_environment, format_environment

    report = collect_environment()
    assert report["backends"]["deepgemm"] == deepgemm.deepgemm_unavailable_reason()  # CPU: why not
    assert "deepgemm" in format_environment(report)
    monkeypatch.setattr("zeroprefill.kernels.deepgemm_unavailable_reason", lambda: None)
    usable = collect_environment()["backends"]["deepgemm"]
    assert usable.startswith("usable") and "FP8 row layout m_indices, ZEROPREFILL_DEEPGEMM_FP8_LAYOUT" in usable
    monkeypatch.setenv(deepgemm.FP8_LAYOUT_ENV, "bogus")  # a wrong setting is reported, not raised
    assert "'bogus' is not one of m_indices, psum" in collect_environment()["backends"]["deepgemm"]


def test_the_copy_vllm_ships_is_used_when_the_package_is_absent(monkeypatch):
    """vLLM 0.26+ ships DeepGEMM inside its wheel; a vLLM server needs no other package."""
    vendored = types.ModuleType("vllm.third_party.deep_gemm")
    vendored.__version__ = "2.5.0+fake"
    for name in deepgemm.REQUIRED_FUNCTIONS:
        setattr(vendored, name, lambda *args, **kwargs: None)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # a vLLM process
    monkeypatch.setitem(sys.modules, "vllm.third_party.deep_gemm", vendored)
    assert deepgemm._load() == (vendored, None)
    assert deepgemm.deepgemm_source() == "vllm.third_party.deep_gemm 2.5.0+fake"
