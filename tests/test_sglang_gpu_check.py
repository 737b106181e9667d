"""``benchmarks/sglang_gpu_check.py`` on CPU, against stand-in SGLang servers.

Run as ``python -m tests.test_sglang_gpu_check --model-path ... --port ...`` this module is the
stand-in: a stdlib HTTP server that answers ``/health``, ``/generate`` (prompt log-probabilities)
and ``/v1/embeddings`` with values derived from the token ids (:func:`reference_logprobs`,
:func:`reference_embedding`) plus a per-launcher offset, writes SGLang-shaped log lines (KV size,
CUDA-graph capture, prefill batches), and fails as SGLang does where the real one fails: stock
with ``--is-embedding`` (it prints its error and then lingers, as a crashed SGLang server waits
for core dumps). The plugin serves the block-FP8 checkpoint too. The tests give the script the same
functions as its float32 reference, so every distance it reports is known here exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from zeroprefill import accuracy

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 256  # the tiny checkpoint's hidden size, which the script checks embeddings against
LOGPROB_OFFSET = {"stock": 0.01, "plugin": 0.015}
RESULT = "sglang_gpu_check-h100x1.json"  # the name the script gives the result on one H100
EMBEDDING_TILT = {"stock": 0.0, "plugin": 0.01}
SCORE_TILT = {"stock": 0.0, "plugin": 0.02}  # added to the first label's log-probability


def reference_logprobs(ids: list[int]) -> list[float]:
    return [-((ids[i] * 7 + i) % 13) / 4 for i in range(1, len(ids))]


def reference_last_logprobs(ids: list[int], vocab: int = 512) -> list[float]:
    logits = [math.sin(sum(ids) * 0.1 + k) * 3 for k in range(vocab)]
    top = max(logits)
    log_total = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - log_total for x in logits]


def reference_embedding(ids: list[int], tilt: float = 0.0) -> list[float]:
    vector = [math.sin(sum(ids) + k) for k in range(HIDDEN)]
    vector[0] += tilt
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


# -- the stand-in server --------------------------------------------------------------------


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path")
    parser.add_argument("--port", type=int)
    parser.add_argument("--is-embedding", action="store_true")
    parser.add_argument("--moe-a2a-backend")
    args, _ = parser.parse_known_args(argv)
    side = "plugin" if args.moe_a2a_backend == "asyncep" else "stock"
    say = lambda line: print(line, flush=True)  # noqa: E731
    if side == "plugin":
        say("ZeRO-Prefill AsyncEP on one GPU: every expert is local, nothing is streamed")
    say("max_total_num_tokens=4096, chunked_prefill_size=8192")
    say("Capture target prefill CUDA graph end. elapsed=1.00 s, mem usage=0.10 GB")
    say("Capture target decode cuda graph end. elapsed=1.00 s, mem usage=0.10 GB.")
    if side == "stock" and args.is_embedding:
        say("TypeError: Qwen3MoeForCausalLM.forward() got an unexpected keyword argument 'get_embedding'")
        say("Received sigquit from a child process. It usually means the child failed.")
        time.sleep(120)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer({})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            say(f"Prefill batch, #new-seq: 1, cuda graph: {len(body.get('input_ids', body.get('input', []))) < 64}, ")
            if self.path == "/v1/embeddings":
                self._answer({"data": [{"embedding": reference_embedding(body["input"], EMBEDDING_TILT[side])}]})
                return
            if self.path == "/v1/score":
                last = reference_last_logprobs(body["query"] + body["items"][0])
                last[body["label_token_ids"][0]] += SCORE_TILT[side]
                picked = [math.exp(last[i]) for i in body["label_token_ids"]]
                self._answer({"scores": [[x / sum(picked) for x in picked]]})
                return
            ids = body["input_ids"]
            values = [None] + [x + LOGPROB_OFFSET[side] for x in reference_logprobs(ids)]
            self._answer({"meta_info": {"input_token_logprobs": [[v, i, None] for v, i in zip(values, ids)]}})

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1:])
    raise SystemExit(0)


# -- the tests ------------------------------------------------------------------------------

sys.path.insert(0, str(REPO / "benchmarks"))
import sglang_gpu_check as check  # noqa: E402

from tests.fake_nvidia_smi import install as install_nvidia_smi  # noqa: E402


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The script's argv with stand-in launchers; its GPU-only steps answered here."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(check, "gpu_names", lambda: ["NVIDIA H100 80GB HBM3"])
    monkeypatch.setattr(check, "gpu_memory_used_mib", lambda: [])
    monkeypatch.setattr(check, "prepare_tiny_models",
                        lambda work_dir: {"bf16": tmp_path / "tiny-bf16", "fp8": tmp_path / "tiny-fp8"})
    monkeypatch.setattr(check, "fp32_reference", lambda model_dir, prompts, device, dtype="float32": {
        "logprobs": [reference_logprobs(ids) for ids in prompts],
        "embeddings": [reference_embedding(ids) for ids in prompts],
        "last_logprobs": [reference_last_logprobs(ids) for ids in prompts],
    })
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    monkeypatch.setattr(check, "prepare_30b_model", lambda work_dir, layers: big)
    return ["--results-dir", str(tmp_path), "--work-dir", str(tmp_path), "--start-timeout-s", "30",
            "--stock-launcher", "tests.test_sglang_gpu_check", "--plugin-launcher", "tests.test_sglang_gpu_check",
            "--requests", "40", "--reference-device", "cpu",
            "--prompt-tokens", "16", "--concurrency", "4", "--duration-s", "1", "--warmup-s", "0.5"]


def test_both_parts_against_stand_in_servers(stand_ins: list[str], tmp_path: Path) -> None:
    started = time.monotonic()
    assert check.main(["--parts", "tiny", "30b", *stand_ins]) == 0
    assert time.monotonic() - started < 25  # failed servers are given up at their log's fatal line
    result = json.loads((tmp_path / RESULT).read_text())
    tiny, summary = result["parts"]["tiny"], result["summary"]

    logprobs = tiny["comparisons"]["bf16/logprobs"]
    assert logprobs["stock"]["distance"] == pytest.approx(0.01) and logprobs["plugin"]["distance"] == pytest.approx(0.015)
    assert logprobs["plugin_vs_stock_distance"] == pytest.approx(0.005)
    assert logprobs["plugin"]["error_percentiles"]["50%"] == pytest.approx(0.015)
    assert logprobs["plugin_passes"] is True  # median 0.015 <= 2 x 0.01, tail 0.015 <= 0.01 + the 0.05 margin

    embeddings = tiny["comparisons"]["bf16/embeddings"]
    assert embeddings["stock"]["served"] is False and "get_embedding" in embeddings["stock"]["reason"]
    assert 0.99 < embeddings["plugin"]["similarity"] < 1.0 and embeddings["plugin_passes"] is True

    fp8 = tiny["comparisons"]["fp8/logprobs"]
    assert fp8["stock"]["distance"] == pytest.approx(0.01) and fp8["plugin"]["distance"] == pytest.approx(0.015)
    assert fp8["plugin_passes"] is True and tiny["servers"]["plugin-fp8"]["served"] is True

    score = tiny["comparisons"]["fp8/score"]
    assert score["stock"]["distance"] < 1e-12 and 0 < score["plugin"]["distance"] < 0.01  # the first label tilted
    assert score["plugin_passes"] is True and score["stock"]["error_percentiles"]["count"] == 7 * check.SCORE_LABELS
    labels = tiny["score_labels"]["bf16"]
    assert all(len(set(row)) == check.SCORE_LABELS and 0 not in row for row in labels)

    assert tiny["mixed_requests"]["sent"] == 40 and tiny["mixed_requests"]["failed"] == 0
    assert tiny["mixed_requests"]["to /v1/score"] > 0
    assert summary["requests_failed"] == 0
    assert summary["min_cosine_vs_fp32_stock"] == pytest.approx(0.99)  # 1 - 0.01 on both checkpoints
    assert summary["min_cosine_vs_fp32_plugin"] == pytest.approx(0.985)  # logprobs: 1 - 0.015
    assert summary["plugin_passes"] is True
    assert summary["servers_failed"] == ["stock-bf16-embedding"]
    graphs = summary["cudagraphs"]["plugin-bf16"]
    assert graphs["prefill_captured"] and graphs["decode_captured"]
    assert 0 < graphs["prefill_batches_in_graph"] < graphs["prefill_batches"]
    assert tiny["servers"]["plugin-bf16"]["asyncep_active"] and not tiny["servers"]["stock-bf16"]["asyncep_active"]

    big = result["parts"]["30b"]["servers"]
    for side in ("stock", "plugin"):
        assert big[side]["requests"] > 0 and big[side]["failed"] == 0 and big[side]["max_total_num_tokens"] == 4096
        assert sum(big[side]["answers_by_second"]) == big[side]["requests"]
    assert summary["plugin_vs_stock_30b_2k"] == pytest.approx(big["plugin"]["tokens_per_s"] / big["stock"]["tokens_per_s"],
                                                             rel=1e-3)
    assert (tmp_path / "sglang_gpu_check-h100x1-logs" / "plugin-fp8.log").is_file()


def test_a_cut_short_run_keeps_the_parts_it_finished(stand_ins: list[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "prepare_30b_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check.main(["--parts", "tiny", "30b", *stand_ins, "--requests", "4"])
    saved = json.loads((tmp_path / RESULT).read_text())
    assert saved["parts"]["tiny"]["mixed_requests"]["sent"] == 4
    assert saved["summary"]["plugin_vs_stock_30b_2k"] is None


def test_a_later_call_adds_its_layouts_to_the_30b_part(stand_ins: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    short = ["--duration-s", "0.3", "--warmup-s", "0.1"]
    install_nvidia_smi(tmp_path / "broken", monkeypatch, [])  # the first call's nvidia-smi fails: no matter
    check.main(["--parts", "30b", "--layouts", "stock", *stand_ins, *short])
    # The second call's GPU (a stand-in nvidia-smi) is held at 1410 MHz by its power cap.
    capped = {"clocks.sm": 1410, "clocks.max.sm": 1980, "power.draw": "349.50", "power.limit": "350.00",
              "clocks_event_reasons.active": "0x0000000000000004", "memory.used": 1000, "memory.total": 81559}
    install_nvidia_smi(tmp_path / "bin", monkeypatch, [{"0": capped}], repeat=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    check.main(["--parts", "30b", "--layouts", "plugin", *stand_ins, *short, "--concurrency", "2"])
    servers = json.loads((tmp_path / RESULT).read_text())["parts"]["30b"]["servers"]
    assert [servers[name]["settings"]["concurrency"] for name in ("stock", "plugin")] == [4, 2]
    assert servers["stock"]["requests"] > 0 and "Unknown Error" in servers["stock"]["gpu_telemetry"]["unavailable"]
    (gpu,) = servers["plugin"]["gpu_telemetry"].values()
    assert gpu["samples"] >= 1 and gpu["sm_clock_mhz_median"] == 1410 and gpu["power_w_mean"] == 349.5
    assert gpu["clock_event_reasons"] == {"sw_power_cap": 1.0}
    assert "plugin: GPU0 SM 1410/1980 MHz, 350/350 W, sw_power_cap 100%" in capsys.readouterr().out


def test_a_second_call_adds_its_part_to_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    first = check.Results(out, "NVIDIA H200")
    first.new_part("30b", {})["servers"] = {"stock": {"tokens_per_s": 100.0}, "plugin": {"tokens_per_s": 120.0}}
    first.save()
    second = check.Results(out, "NVIDIA H200")
    second.new_part("tiny", {})["mixed_requests"] = {"sent": 500, "failed": 0}
    second.save()
    summary = json.loads(out.read_text())["summary"]
    assert summary["plugin_vs_stock_30b_2k"] == 1.2 and summary["requests_failed"] == 0
    assert summary["min_cosine_vs_fp32_plugin"] is None  # no comparison ran


def _errors(median: float, worst: float, count: int = 10) -> dict:
    """A served side with ``count`` errors: half at ``median``, one at ``worst``."""
    return {"error_percentiles": accuracy.error_summary([median] * (count - 1) + [worst])}


@pytest.mark.parametrize(("plugin", "stock", "margin", "bf16", "passes"), [
    (_errors(0.01, 0.06), _errors(0.01, 0.02), 0.05, None, True),
    (_errors(0.01, 0.08), _errors(0.01, 0.02), 0.05, None, False),  # the worst of 10 is the tail
    (_errors(0.01, 0.08), _errors(0.01, 0.02), 0.05, _errors(0.01, 0.5), False),  # stock first, when it serves
    (_errors(0.01, 9.0, 2000), _errors(0.01, 1.0, 2000), 0.05, None, True),  # from 1,000 values the 99th percentile
    (_errors(0.03, 0.03, 2000), _errors(0.01, 0.01, 2000), 0.05, None, False),  # median over twice stock's
    (_errors(0.0, 0.012), {"served": False, "reason": "died"}, 1e-3, _errors(0.0, 0.0115), True),
    (_errors(0.0, 0.012), {"served": False, "reason": "died"}, 1e-3, _errors(0.0, 0.01), False),
    (_errors(0.0, 0.002), {"served": False, "reason": "died"}, 0.05, None, None),
    ({"served": False, "reason": "refused"}, _errors(0.01, 0.02), 0.05, None, None),
])
def test_judge(plugin: dict, stock: dict, margin: float, bf16: dict | None, passes: bool | None) -> None:
    verdict = check.judge(plugin, stock, margin, bf16)
    assert verdict["plugin_passes"] is passes, verdict["why"]


def test_distances() -> None:
    assert max(check.absolute_errors([[-1.0, -2.0], [-0.5]], [[-1.1, -2.0], [-0.25]])) == pytest.approx(0.25)
    assert check.cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(math.sqrt(0.5))
    assert max(check.embedding_errors([[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 - math.sqrt(0.5))
    with pytest.raises(ValueError):  # a prompt with a token missing is an error, not a shorter comparison
        check.absolute_errors([[-1.0]], [[-1.0, -2.0]])


def test_score_labels_and_reference() -> None:
    last = [math.log(p) for p in (0.5, 0.05, 0.2, 0.1, 0.15)]  # ids 0 and 4 are never labels (SGLang clips them)
    assert check.score_labels(last, count=2) == [2, 3]
    assert check.score_reference(last, [2, 3]) == pytest.approx([2 / 3, 1 / 3])  # /v1/score's apply_softmax


def test_log_reading() -> None:
    log = "\n".join([
        "max_total_num_tokens=1000", "max_total_num_tokens=73728, chunked_prefill_size=8192",
        "Capture target prefill CUDA graph end. elapsed=3.1 s", "Disable decode ...",
        "Prefill batch, #new-seq: 3, cuda graph: True, input throughput", "Prefill batch, cuda graph: False, ",
        "Traceback (most recent call last):", "  File x", "ValueError: first", "RuntimeError: the last one",
    ])
    facts = check.log_facts(log)
    assert facts["max_total_num_tokens"] == 73728
    assert facts["cuda_graphs"] == {"prefill_captured": True, "decode_captured": False, "prefill_batches": 2,
                                    "prefill_batches_in_graph": 1}
    assert check.failure_reason(log) == "RuntimeError: the last one"
    assert check.failure_reason("x\nzeroprefill.common.asyncep_model.AsyncEPConfigError: --x: y\nRuntimeError: z") == "--x: y"
    assert check.gpu_tag("NVIDIA H100 80GB HBM3") == "h100" and check.gpu_tag("NVIDIA H200") == "h200"
    assert check.gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"


def test_two_gpu_layouts_need_two_gpus(stand_ins: list[str]) -> None:
    with pytest.raises(SystemExit, match="need 2 GPUs, nvidia-smi names 1"):
        check.main(["--parts", "30b", "--layouts", "plugin-asyncep2", "stock-dp2-ep2", *stand_ins])


@pytest.mark.parametrize(("argv", "message"), [
    (["--parts", "tiny", "big"], "invalid choice: 'big'"),
    (["--requests", "0"], "must be positive, got 0"),
    (["--tiny-mem-fraction", "1.5"], "must be below 1, got 1.5"),
    (["--duration-s", "soon"], "'soon' is not a float"),
    (["--layouts", "stock-tp8"], "invalid choice: 'stock-tp8'"),
])
def test_bad_arguments_are_one_line_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_float32_reference_on_generated_checkpoints(tmp_path: Path) -> None:
    """transformers' own logits give the same prompt log-probabilities; FP8 is read dequantised."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe, quantize_checkpoint_block_fp8

    shapes = TinyMoEConfig(num_layers=1, hidden_size=128, expert_intermediate_size=128, num_attention_heads=2,
                           num_kv_heads=2, head_dim=64, num_experts=4)
    bf16 = generate_tiny_moe(tmp_path / "bf16", shapes)
    fp8 = quantize_checkpoint_block_fp8(shutil.copytree(bf16, tmp_path / "fp8"))
    prompts = [[5, 9, 2, 77], [3, 3]]
    reference = check.fp32_reference(bf16, prompts, "cpu")
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    for ids, got in zip(prompts, reference["logprobs"]):
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        torch.testing.assert_close(torch.tensor(got), torch.stack([logits[i - 1, ids[i]] for i in range(1, len(ids))]))
    assert all(abs(sum(x * x for x in vector) - 1) < 1e-5 for vector in reference["embeddings"])
    for ids, last in zip(prompts, reference["last_logprobs"]):  # what /v1/score reads: the next token's
        torch.testing.assert_close(torch.tensor(last), model(torch.tensor([ids])).logits[0, -1].log_softmax(-1))

    quantized = check.fp32_reference(fp8, prompts, "cpu")  # the checkpoint's own (dequantised) model
    assert [len(x) for x in quantized["logprobs"]] == [3, 1]
    assert 0 < max(check.absolute_errors(quantized["logprobs"], reference["logprobs"])) < 5  # FP8 rounding, not noise
    assert json.loads((tmp_path / "fp8-dequantized-fp32" / "config.json").read_text()).get("quantization_config") is None


def test_prompt_tokens_avoid_the_id_sglang_reports_as_zero() -> None:
    """SGLang returns ids >= vocab_size - 1 as 0 in input_token_logprobs: prompts never use them."""
    import random

    rng = random.Random(0)
    drawn = {check.prompt_token(rng, 8) for _ in range(500)}
    assert drawn == set(range(1, 7))
    assert all(max(prompt) < 511 for prompt in check.comparison_prompts(512))
