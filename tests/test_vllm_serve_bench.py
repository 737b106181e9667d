"""``benchmarks/vllm_serve.py`` end to end on CPU, against a fake OpenAI embeddings server.

The benchmark only runs for real on GPUs (it starts ``vllm serve`` with real model shapes);
here ``VllmServer`` is replaced by an aiohttp app with the same surface, so the load
generator, the open-loop rates derived from the reference layout, the step-budget override,
the per-run JSON, the summary, the table and the plot are all exercised before any device
time is spent on them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("vllm")  # main() records vllm.__version__

from aiohttp import web  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import trace_breakdown as vllm_serve_trace  # noqa: E402
import vllm_serve  # noqa: E402

SERVICE_S = 0.02  # the fake server's time per request


class FakeServer:
    """``VllmServer``'s surface over an in-process aiohttp app.

    ``fail_every``: every n-th request answers 500; ``fail_start``: the server never starts.
    """

    def __init__(self, model, args, log_path, device="cpu", env=None, fail_start=False, fail_every=0) -> None:
        self.args, self.env, self.log_path = list(args), dict(env or {}), Path(log_path)
        self.fail_start, self.fail_every = fail_start, fail_every
        self.port = vllm_serve.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = self  # poll() below: "still running"
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def poll(self) -> None:
        return None

    async def _start_profile(self, request: web.Request) -> web.Response:
        self.profiling = True
        return web.Response()

    async def _stop_profile(self, request: web.Request) -> web.Response:
        # What a worker leaves: a gzipped Chrome trace, here one MoE kernel, one peer copy
        # half hidden under it, and one all-reduce alone on the timeline.
        config = json.loads(self.args[self.args.index("--profiler-config") + 1])
        trace_dir = Path(config["torch_profiler_dir"])
        trace_dir.mkdir(parents=True, exist_ok=True)
        events = [{"cat": "kernel", "name": "fused_moe_kernel", "ts": 0, "dur": 100},
                  {"cat": "gpu_memcpy", "name": "Memcpy PtoP (Device -> Device)", "ts": 50, "dur": 100},
                  {"cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_bf16", "ts": 200, "dur": 50}]
        with gzip.open(trace_dir / "rank0.123.pt.trace.json.gz", "wt") as handle:
            json.dump({"traceEvents": events}, handle)
        return web.Response()

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        number = self.requests
        await asyncio.sleep(SERVICE_S)
        if self.fail_every and number % self.fail_every == 0:
            return web.Response(status=500)
        assert body["encoding_format"] == "base64" and all(3 <= t < 500 for t in body["input"])
        return web.json_response({"data": [{"embedding": "AAAA"}]})

    def start(self) -> FakeServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tile_table = (f"INFO [fused_moe.py:1094] Using configuration from {self.env['VLLM_TUNED_CONFIG_FOLDER']}/E=64.json "
                      "for MoE layer." if "VLLM_TUNED_CONFIG_FOLDER" in self.env else
                      "WARNING [fused_moe.py:1107] Using default MoE config. Performance might be sub-optimal!")
        self.log_path.write_text(f"{tile_table}\n"
                                 "INFO zeroprefill: step budget 1e+12 FLOPs per rank (configured; 8 tokens)\n"
                                 "INFO AsyncEP: streaming 2 layers\nGraph capturing finished in 3 secs\n")
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._embed)
        app.router.add_post("/start_profile", self._start_profile)
        app.router.add_post("/stop_profile", self._stop_profile)
        runner = web.AppRunner(app)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(runner.setup(), self._loop).result()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(site.start(), self._loop).result()
        self._runner = runner
        return self

    def wait_healthy(self, timeout_s, progress=None) -> None:
        if self.fail_start:
            raise vllm_serve.ServerStartError("vLLM server exited with code 1 during start-up")

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


@pytest.fixture
def fake_servers(monkeypatch):
    """TP layouts do not start; the NCCL-transport AsyncEP layout fails some requests."""
    started: list[FakeServer] = []

    def make(model, args, log_path, device="cpu", env=None):
        server = FakeServer(model, args, log_path, device, env, fail_start="--tensor-parallel-size" in args,
                            fail_every=3 if (env or {}).get(vllm_serve.TRANSPORT_ENV) == "nccl" else 0)
        started.append(server)
        return server

    monkeypatch.setattr(vllm_serve, "VllmServer", make)
    monkeypatch.setattr(vllm_serve, "model_dir", lambda work, model: work / model.name)
    return started


def test_closed_and_open_loop_count_what_was_answered_in_the_window(fake_servers, tmp_path):
    server = FakeServer("m", [], tmp_path / "log", fail_every=5).start()
    try:
        closed = asyncio.run(vllm_serve._drive(server.url, "m", 64, concurrency=4, rate=None, duration_s=1.0, seed=0))
        sent_closed = server.requests
        opened = asyncio.run(vllm_serve._drive(server.url, "m", 64, concurrency=None, rate=40.0, duration_s=1.0, seed=0))
    finally:
        server.stop()
    # At most 4 clients x 1 s / 20 ms per request (fewer on a busy machine), every 5th failing.
    assert 20 <= sent_closed <= 210 and closed["failed"] == sent_closed // 5
    assert closed["requests"] + closed["failed"] <= sent_closed
    assert closed["input_tokens_per_s_per_gpu"] == pytest.approx(closed["requests"] * 64 / 1.0 / vllm_serve.NUM_GPUS)
    assert SERVICE_S <= closed["p50_s"] <= closed["p99_s"] < 2.0
    assert 15 <= opened["requests"] + opened["failed"] <= 65  # Poisson at 40/s for 1 s
    assert opened["p99_s"] < 2.0


def test_runs_every_layout_keeps_failures_and_compares_at_equal_offered_load(fake_servers, tmp_path, capsys):
    out = tmp_path / "results" / "serve.json"
    argv = ["--models", "qwen3-30b-a3b:2", "--layouts", "asyncep-copy-engine-token-budget", "stock-tp2",
            "stock-dp2-ep", "asyncep-nccl", "--batched-tokens", "4096", "--concurrency", "8", "--contexts", "64", "--duration-s", "1", "--warmup-s", "0.2",
            "--open-loop-fractions", "0.5", "--out", str(out)]
    assert vllm_serve.main(argv) == 0
    result = json.loads(out.read_text())
    runs = {run["layout"]: run for run in result["runs"]}
    assert [run["layout"] for run in result["runs"]] == [
        "stock-dp2-ep", "asyncep-copy-engine-token-budget", "stock-tp2", "asyncep-nccl"]

    assert runs["stock-tp2"]["started"] is False and "exited with code 1" in runs["stock-tp2"]["error"]
    asyncep = runs["asyncep-copy-engine-token-budget"]
    spec = vllm_serve.model_spec(vllm_serve.parse_model("qwen3-30b-a3b:2"))
    budget = float(asyncep["env"][vllm_serve.BUDGET_ENV])
    assert budget == pytest.approx(2 * 4096 * vllm_serve.matmul_params_per_token(spec), rel=1e-5)
    assert vllm_serve.BUDGET_ENV not in runs["stock-dp2-ep"]["env"]
    assert asyncep["step_budget"] == ["zeroprefill: step budget 1e+12 FLOPs per rank (configured; 8 tokens)"]
    assert asyncep["cudagraphs_captured"] and asyncep["asyncep_log"] == ["AsyncEP: streaming 2 layers"]
    assert (out.parent / "serve-logs" / "qwen3-30b-a3b_2-stock-dp2-ep-4096.log").exists()

    # Both started layouts are offered the same rate: half the reference's closed-loop peak.
    reference_peak = runs["stock-dp2-ep"]["measurements"][0]["closed_loop"]["requests_per_s"]
    for layout in ("stock-dp2-ep", "asyncep-copy-engine-token-budget"):
        (point,) = runs[layout]["measurements"][0]["open_loop"]
        assert point["offered_requests_per_s"] == round(0.5 * reference_peak, 2)
    comparison = result["summary"]["comparisons"]["qwen3-30b-a3b_64"]
    assert comparison["best_stock_layout"] == "stock-dp2-ep"
    # A layout that failed requests is never anyone's peak, however fast it answered the rest.
    assert runs["asyncep-nccl"]["measurements"][0]["closed_loop"]["failed"] > 0
    assert comparison["best_asyncep_layout"] == "asyncep-copy-engine-token-budget"
    ours = runs["asyncep-copy-engine-token-budget"]["measurements"][0]["closed_loop"]["input_tokens_per_s_per_gpu"]
    theirs = runs["stock-dp2-ep"]["measurements"][0]["closed_loop"]["input_tokens_per_s_per_gpu"]
    assert comparison["asyncep_vs_best_stock"] == round(ours / theirs, 3)
    (rate_row,) = comparison["p99_s_at_offered_requests_per_s"].values()
    assert set(rate_row) == {"stock-dp2-ep@4096", "asyncep-copy-engine-token-budget@4096", "asyncep-nccl@4096"}
    assert result["summary"]["asyncep_vs_best_stock_235b_512"] is None  # no such run here

    printed = capsys.readouterr().out
    assert "stock-tp2" in printed and "did not start" in printed and "open loop" in printed
    assert out.with_suffix(".png").stat().st_size > 0


def test_replot_redraws_from_the_json_alone(tmp_path, capsys):
    out = tmp_path / "serve.json"
    committed = REPO / "benchmarks" / "results" / "vllm_serve-h200x2.json"
    out.write_text(committed.read_text())
    assert vllm_serve.main(["--replot", "--out", str(out)]) == 0
    assert "asyncep-copy-engine" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit):
        vllm_serve.main(["--replot", "--out", str(tmp_path / "missing.json")])


def test_merge_keeps_earlier_runs_and_reuses_the_reference_rate(fake_servers, tmp_path):
    out = tmp_path / "serve.json"
    common = ["--models", "qwen3-30b-a3b:2", "--batched-tokens", "4096", "--concurrency", "8", "--contexts", "64", "--duration-s", "1",
              "--warmup-s", "0.1", "--open-loop-fractions", "0.8", "--out", str(out)]
    vllm_serve.main([*common, "--layouts", "stock-dp2-ep"])
    vllm_serve.main([*common, "--layouts", "asyncep-copy-engine", "--merge"])
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["layout"] for r in runs] == ["stock-dp2-ep", "asyncep-copy-engine"]
    assert [c.split("--layouts ")[1].split()[0] for c in result["commands"]] == ["stock-dp2-ep", "asyncep-copy-engine"]
    rates = [r["measurements"][0]["open_loop"][0]["offered_requests_per_s"] for r in runs]
    assert rates[0] == rates[1]


def test_profile_runs_vllms_profiler_and_keeps_the_breakdown_not_the_traces(fake_servers, tmp_path):
    out = tmp_path / "serve.json"
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "stock-dp2-ep", "--batched-tokens", "4096", "--concurrency", "8",
                     "--contexts", "64", "--duration-s", "0.3", "--warmup-s", "0.1", "--open-loop-fractions",
                     "--profile-context", "64", "--profile-s", "0.3", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    config = json.loads(run["server_args"][run["server_args"].index("--profiler-config") + 1])
    assert config["profiler"] == "torch" and Path(config["torch_profiler_dir"]).is_absolute()
    (trace,) = run["profile"]["traces"]
    assert trace["seconds_by_category"] == pytest.approx({"moe_experts": 1e-4, "peer_copy": 1e-4, "communication": 5e-5})
    # Exposed: the copy's 50 us past the MoE kernel and the all-reduce's 50 us, of a 250 us window.
    assert trace["exposed_communication_s"] == pytest.approx(1e-4)
    assert trace["exposed_communication_fraction"] == pytest.approx(0.4)
    assert not list(Path(config["torch_profiler_dir"]).rglob("*.gz"))  # raw traces deleted


def test_profile_context_must_be_measured():
    with pytest.raises(SystemExit):
        vllm_serve.main(["--contexts", "512", "--profile-context", "4096"])


def test_trace_categories_follow_kernel_names():
    categorize = vllm_serve_trace.categorize
    assert categorize("fused_moe_kernel_gptq", "kernel") == "moe_experts"
    assert categorize("_gemm1_gate_up_silu_kernel", "kernel") == "moe_experts"
    assert categorize("flash_fwd_splitkv_kernel", "kernel") == "attention"
    assert categorize("ncclDevKernel_AllGather_RING_LL", "kernel") == "communication"
    assert categorize("cross_device_reduce_1stage", "kernel") == "communication"
    assert categorize("flashinfer::trtllm_allreduce_fusion::allreduce_fusion_kernel_oneshot", "kernel") == "communication"
    assert categorize("flash_fwd_splitkv_combine_kernel", "kernel") == "attention"
    assert categorize("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "kernel") == "gemm"
    assert categorize("Memcpy PtoP (Device -> Device)", "gpu_memcpy") == "peer_copy"
    assert categorize("Memcpy DtoD (Device -> Device)", "gpu_memcpy") == "memcpy"
    assert categorize("triton_red_fused_rms_norm_0", "kernel") == "other"


def test_stock_layouts_get_the_tuned_moe_tiles_and_each_run_says_which_table_it_used(fake_servers, tmp_path):
    out = tmp_path / "serve.json"
    tiles = tmp_path / "tiles"
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "stock-dp2-ep", "asyncep-copy-engine",
                     "--batched-tokens", "4096", "--concurrency", "8", "--contexts", "64", "--duration-s", "1", "--warmup-s", "0.1",
                     "--open-loop-fractions", "--stock-moe-configs", str(tiles), "--out", str(out)])
    stock, asyncep = json.loads(out.read_text())["runs"]
    assert stock["env"]["VLLM_TUNED_CONFIG_FOLDER"] == str(tiles.resolve())
    assert "VLLM_TUNED_CONFIG_FOLDER" not in asyncep["env"]  # AsyncEP runs its own kernel and tables
    assert stock["moe_kernel_configs"] == [f"Using configuration from {tiles.resolve()}/E=64.json for MoE layer."]
    assert asyncep["moe_kernel_configs"] == ["Using default MoE config. Performance might be sub-optimal!"]


def test_tuner_keeps_the_fastest_runnable_tile_per_batch_size_and_records_the_default(tmp_path):
    import tune_vllm_moe

    small, large, broken = {"BLOCK_SIZE_M": 16}, {"BLOCK_SIZE_M": 128}, {"BLOCK_SIZE_M": 256}

    def timer(config, m):  # small tiles win small batches, large ones large; 256 does not run
        if config is broken:
            raise RuntimeError("out of shared memory")
        if config is None:
            return 2.0 * m
        return m * (0.5 if (config["BLOCK_SIZE_M"] == 16) == (m < 1000) else 1.5)

    default = {"BLOCK_SIZE_M": 64}
    result = tune_vllm_moe.tune(timer, [broken, small, large], [16, 4096], budget_s=60,
                                default_config=lambda m: default, log=lambda s: None)
    assert result["tried"] == 3
    assert result["by_tokens"][16]["best"] == small and result["by_tokens"][4096]["best"] == large
    # Where no candidate beats vLLM's default tile, the table keeps the default.
    kept = tune_vllm_moe.tune(lambda config, m: 1.0 if config is None else 2.0, [small], [16], budget_s=60,
                              default_config=lambda m: default, log=lambda s: None)
    assert kept["by_tokens"][16]["best"] == default
    path = tune_vllm_moe.write_configs(tmp_path, "E=64,N=1536,device_name=NVIDIA_H200.json", result, {"gpu": "x"})
    assert json.loads(path.read_text()) == {"16": small, "4096": large}
    record = json.loads((tmp_path / "E=64,N=1536,device_name=NVIDIA_H200.tuning.json").read_text())
    assert record["by_tokens"]["4096"]["speedup"] == pytest.approx(4.0)


def test_tuner_candidates_are_vllms_shipped_tiles_for_the_gpu_most_used_first(tmp_path):
    import tune_vllm_moe

    a, b = {"BLOCK_SIZE_M": 16, "num_warps": 4}, {"BLOCK_SIZE_M": 64, "num_warps": 8}
    (tmp_path / "E=8,N=14336,device_name=NVIDIA_H200.json").write_text(json.dumps({"1": a, "2": b, "4": b}))
    (tmp_path / "E=64,N=640,device_name=NVIDIA_H200.json").write_text(json.dumps({"1": b, "triton_version": "3"}))
    (tmp_path / "E=64,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8.json").write_text(json.dumps({"1": {"x": 1}}))
    (tmp_path / "E=64,N=640,device_name=NVIDIA_H100.json").write_text(json.dumps({"1": {"y": 1}}))
    assert tune_vllm_moe.shipped_candidates(tmp_path, "NVIDIA_H200") == [b, a]


def test_model_argument_names_a_shipped_config_and_a_layer_count():
    assert vllm_serve.parse_model("qwen3-235b-a22b:40").layers == 40
    assert vllm_serve.parse_model("qwen3-30b-a3b").layers == 48
    with pytest.raises(Exception, match="no shipped config"):
        vllm_serve.parse_model("llama:2")
    with pytest.raises(Exception, match="has 48 layers; asked for 49"):
        vllm_serve.parse_model("qwen3-30b-a3b:49")


def test_concurrency_keeps_a_queue_behind_both_gpus():
    assert vllm_serve.concurrency_for(512, 32768, None) == 384
    assert vllm_serve.concurrency_for(32768, 32768, None) == 6
    assert vllm_serve.concurrency_for(4096, 8192, 3) == 3
