# Set-up and the two everyday commands. Each target first makes .venv/ (once; seconds afterwards):
#
#   make pretrain            set up, then pretrain the small model on the shipped corpus (python train.py --mode pretrain)
#   make test                set up, then run the test suite (python -m pytest)
#   make pretrain ARGS="--max_steps 50"   extra flags for the command
#
# The environment is reinstalled when requirements.txt, bench/requirements.txt (TRL, for bench/peers.py and its
# test) or this file changes (the stamp's name is their hash).
# Use it for everything else with `source .venv/bin/activate`, or as .venv/bin/python.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt bench/requirements.txt Makefile | cksum | cut -d' ' -f1)

# PyPI's Linux torch wheel is the CUDA build: right where an NVIDIA driver is installed, gigabytes of unused
# libraries elsewhere, so Linux without one takes the CPU build from PyTorch's own index (macOS wheels are CPU).
# Only torch comes from there; its dependencies and ours come from PyPI.
ifeq ($(shell uname -s)-$(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),Linux-)
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu
endif

.PHONY: setup pretrain test

# sweeps (wandb's sweep engine) is installed with --no-deps: it declares numpy<2, a stale pin (README, Sweeps),
# and requirements.txt lists the dependencies it really has.
setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-deps $(TORCH) $(TORCH_INDEX)
	$(PY) -m pip install $(TORCH) -r requirements.txt -r bench/requirements.txt
	$(PY) -m pip install --no-deps sweeps==0.3.0
	rm -f $(VENV)/.installed-*
	touch $@

pretrain: setup
	$(PY) train.py --mode pretrain $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)
