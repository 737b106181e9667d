"""A stand-in ``nvidia-smi`` for CPU tests of the benchmarks' GPU telemetry.

:func:`install` writes an executable ``nvidia-smi`` into a folder and puts that folder first on
``PATH``. It answers ``--query-gpu=FIELDS --format=csv,noheader[,nounits]`` from canned
readings: one CSV line per GPU, the fields in the order asked, ``[N/A]`` for a field the
reading lacks. A query naming a field in ``rejects`` is refused as nvidia-smi refuses a field
its driver does not know (exit 2), which is how an older driver answers
``clocks_event_reasons.active``. A telemetry query (one asking for ``clocks.sm``) takes the next
reading; past the last, it fails (exit 15) or, with ``repeat``, gives the last again. Any other
query (memory) is answered from the first reading. Every call's arguments are appended to
``calls.log`` beside the script.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

SCRIPT = '''#!{python}
import json, sys
from pathlib import Path

here = Path(__file__).resolve().parent
config = json.loads((here / "config.json").read_text())
with open(here / "calls.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
fields = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")).split(",")
for field in fields:
    if field in config["rejects"]:
        print(f'Field "{{field}}" is not a valid field to query.')
        sys.exit(2)
readings = config["readings"]
if "clocks.sm" in fields:
    counter = here / "served"
    served = int(counter.read_text()) if counter.exists() else 0
    if served >= len(readings) and not config["repeat"]:
        print("Unable to determine the device handle for GPU0000:00:00.0: Unknown Error")
        sys.exit(15)
    counter.write_text(str(served + 1))
    reading = readings[min(served, len(readings) - 1)]
else:
    reading = readings[0] if readings else {{}}
for index, values in reading.items():
    print(", ".join(index if field == "index" else str(values.get(field, "[N/A]")) for field in fields))
'''


def install(folder: Path, monkeypatch: pytest.MonkeyPatch, readings: list[dict[str, dict]],
            rejects: tuple[str, ...] = (), repeat: bool = False) -> Path:
    """The stand-in in ``folder``, first on PATH; ``readings``: per sample, GPU index -> field ->
    value. Returns ``folder`` (its ``calls.log`` lists the calls)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"readings": readings, "rejects": list(rejects), "repeat": repeat}))
    script = folder / "nvidia-smi"
    script.write_text(SCRIPT.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", os.pathsep.join([str(folder), os.environ.get("PATH", "")]))
    return folder


def calls(folder: Path) -> list[str]:
    """The arguments of every call so far, one string per call."""
    log = folder / "calls.log"
    return log.read_text().splitlines() if log.exists() else []
