"""What vLLM itself logged as its prompt throughput, beside what ``vllm_serve.py`` measured.

A vLLM server logs, every 10 s, the prompt tokens its engine scheduled ("Engine 000: Avg prompt
throughput: N tokens/s, ...") and, per answered request, an access-log line. For every one-GPU
run of a ``vllm_serve.py`` results file whose server log is kept beside it (``<out>-logs/``),
this lists those 10-s rates and finds the ones that lie wholly inside the closed loop's timed
window: counted in answers (failures included), an interval lies inside when the answers
before it include all that came before the window (the warm-up's, ``warmup.requests``, and
where the run had one, its lead-in's, ``closed_loop.lead``) and the answers up to its end are
no more than those plus the window's (``closed_loop.requests`` and ``failed``). Their mean,
the rate the engine sustained in the
window by its own count, is set beside the window's measured ``input_tokens_per_s_per_gpu``. A
window that measured well under it lost time inside the window to something the engine's own
rate does not show.

    python benchmarks/logged_throughput.py benchmarks/results/vllm_fp8-h100x1.json \\
        benchmarks/results/vllm_fp8-h100x1-run5.json --out logged_throughput.json

Prints a table; ``--out`` writes it as JSON. Reads only the files: no GPU, no server.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serving import write_json  # noqa: E402
from _vllm_report import window_of  # noqa: E402

LOGGED_RATE = re.compile(r"(\d\d-\d\d \d\d:\d\d:\d\d) \[loggers\.py:\d+\] Engine 0+: Avg prompt throughput: "
                         r"([\d.]+) tokens/s")
ANSWER = '"POST /v1/embeddings HTTP/1.1"'


def logged_rates(log_text: str) -> list[dict]:
    """Each 10-s rate the server logged: when, tokens/s, and the requests answered before the
    interval began and by its end (access-log lines from the server's start)."""
    rates = []
    answered = 0
    for line in log_text.splitlines():
        if ANSWER in line:
            answered += 1
        match = LOGGED_RATE.search(line)
        if match:
            begun = rates[-1]["answered_by_end"] if rates else 0
            rates.append({"at": match[1], "prompt_tokens_per_s": float(match[2]),
                          "answered_before": begun, "answered_by_end": answered})
    return rates


def compare(results: Path) -> list[dict]:
    """Per one-GPU run with a kept log: its closed-loop rate, what its server logged, and the
    logged rates inside the window against the measured one."""
    data = json.loads(results.read_text())
    logs = results.parent / f"{results.stem}-logs"
    rows = []
    for run in data.get("runs", []):
        name = f"{run['model']}-{run['layout']}-{run['max_num_batched_tokens']}".replace(":", "_")
        log = logs / f"{name}.log"
        measurements = run.get("measurements") or []
        if not log.exists() or not measurements or run.get("gpus") != 1:
            continue
        closed = measurements[0]["closed_loop"]
        lead = closed.get("lead", {})
        before = measurements[0]["warmup"]["requests"] + sum(lead.get("answers_by_second", [])) + lead.get("failed", 0)
        rates = logged_rates(log.read_text(errors="replace"))
        inside = [r["prompt_tokens_per_s"] for r in rates if r["answered_before"] >= before
                  and r["answered_by_end"] <= before + closed["requests"] + closed["failed"]]
        logged = sum(inside) / len(inside) if inside else None
        measured = closed["input_tokens_per_s_per_gpu"]
        rows.append({"file": str(results), "model": run["model"], "layout": run["layout"], "window": window_of(run),
                     "measured_tokens_per_s": round(measured),
                     "logged_inside_window_tokens_per_s": round(logged) if logged else None,
                     "measured_vs_logged": round(measured / logged, 3) if logged else None, "logged": rates})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="vllm_serve.py results files (their -logs/ beside them)")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.results if not path.exists()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        rows = [row for path in args.results for row in compare(path)]
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a vllm_serve.py results file
        parser.error(f"not a vllm_serve.py results file: {type(exc).__name__}: {exc}")
    if not rows:
        parser.error("no run with a kept server log on one GPU in these files")
    widths = {key: 2 + max(len(title), *(len(Path(row[key]).name if key == "file" else row[key]) for row in rows))
              for key, title in (("file", "file"), ("model", "model"), ("layout", "layout"))}
    print(f"{'file':<{widths['file']}}{'model':<{widths['model']}}{'layout':<{widths['layout']}}"
          f"{'measured':>10}{'logged':>10}{'ratio':>7}  all 10-s rates logged")
    for row in rows:
        logged = ", ".join(f"{r['prompt_tokens_per_s']:,.0f}" for r in row["logged"])
        ratio = f"{row['measured_vs_logged']:.3f}" if row["measured_vs_logged"] else "-"
        inside = f"{row['logged_inside_window_tokens_per_s']:,}" if row["logged_inside_window_tokens_per_s"] else "-"
        print(f"{Path(row['file']).name:<{widths['file']}}{row['model']:<{widths['model']}}"
              f"{row['layout']:<{widths['layout']}}{row['measured_tokens_per_s']:>10,}{inside:>10}{ratio:>7}  {logged}")
    print("logged: the mean of the 10-s rates vLLM logged wholly inside the timed window ('-': none was)")
    if args.out:
        write_json(args.out, {"command": " ".join(["python", "benchmarks/logged_throughput.py",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
