# ddc-bench: the two commands of the README, and their set-up.
#   make quickstart   set up everything, then run an offline DDC vs AdamW comparison
#   make test         set up everything (every extra a test needs), then run the test suite
#                     (slow tests excluded; skipped tests are listed with their reason)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision are pinned to the builds this project is tested with.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install quickstart test test-slow bench clean-quickstart figures paper-cpu

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test,wandb,cluster,hf,zoo]'
	touch $@

quickstart: install
	$(BIN)/ddc-bench --multirun experiment=quickstart
	$(BIN)/ddc-bench-report results/quickstart

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/ddc-bench-perf

# The DDC paper's claims (configs/experiment/{lm_overtrain,vit_scratch,grok_depth,dead_rates}).
# figures: redraw every figure and the README table from the committed results/paper/ (no training).
figures: install
	$(BIN)/python -m ddc_bench.paper figures

# paper-cpu: the four experiments at cpu scale (runs in results/paper-runs/), each lr grid
# extended by factors of 2 while a selection sits at its edge (ddc_bench.sweep_extend, with
# the claim's selection statistic and cap), then collect + figures.
paper-cpu: install
	$(BIN)/ddc-bench --multirun experiment=lm_overtrain
	$(BIN)/python -m ddc_bench.sweep_extend results/paper-runs/lm_overtrain/cpu --stat best --launch -- experiment=lm_overtrain
	$(BIN)/ddc-bench --multirun experiment=vit_scratch
	$(BIN)/python -m ddc_bench.sweep_extend results/paper-runs/vit_scratch/cpu --launch -- experiment=vit_scratch
	$(BIN)/ddc-bench --multirun experiment=grok_depth
	$(BIN)/ddc-bench --multirun experiment=grok_depth lr_mult=16,32 seed=2,3,4
	$(BIN)/python -m ddc_bench.sweep_extend results/paper-runs/grok_depth/cpu --cap 64 --choice ddc_muon=ddc_muon_ns --launch -- experiment=grok_depth
	$(BIN)/ddc-bench --multirun experiment=dead_rates
	$(BIN)/python -m ddc_bench.sweep_extend results/paper-runs/dead_rates/cpu --launch -- experiment=dead_rates
	$(BIN)/python -m ddc_bench.paper collect --scale cpu
