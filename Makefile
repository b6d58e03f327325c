# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# Both create .venv/ when it is missing and install sotalign (with its C++ extension) and the
# test dependencies. torch is pinned in the same pip command, or pip pulls a CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.sotalign-installed

.PHONY: test data demo demo-full bench bench-gpu align-report install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test]"
	$(PY) -c "import sotalign; print('sotalign backends:', sotalign.available_backends())"
	touch $(STAMP)

install: $(STAMP)

# The Debian data packages of sotalign.data.datasets (emoji font, OpenClipArt, Fashion-MNIST,
# WordNet): installed when root and missing, else the command is printed (their tests then skip).
data: $(STAMP)
	$(PY) -m sotalign.data.datasets --install

test: $(STAMP) data
	$(PY) -m pytest -q tests
	SOTALIGN_BENCH_SMOKE=1 $(PY) -m pytest -q benchmarks --benchmark-disable

# Real encoders on real data (emoji, OpenClipArt, WordNet; embeddings cached under ~/.cache/sotalign):
# teacher, SAIL and SOTAlign at 100 and 300 pairs, table + plot. `make demo-full`: the whole benchmark.
demo: $(STAMP) data
	$(PY) -m sotalign.demo

demo-full: $(STAMP) data
	$(PY) -m sotalign.demo --full

# The full CPU benchmark run (~15 min on 2 cores) whose results are committed under
# benchmarks/results/<machine>-<suite>.{json,md,png}. Run it on an otherwise idle machine.
bench: $(STAMP)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,bench]"
	machine=$$($(PY) benchmarks/report.py --machine) && \
	for suite in crossover klot sinkhorn; do \
	  $(PY) -m pytest -q benchmarks/bench_$$suite.py \
	    --benchmark-json=benchmarks/results/$$machine-$$suite.json || exit 1; \
	done && \
	$(PY) benchmarks/report.py benchmarks/results/$$machine-*.json

# The GPU harness (Triton, the paper's algorithm eager and compiled, POT, GeomLoss/KeOps,
# FlashSinkhorn) on a CUDA machine; ~20 min on an H100. Suites one by one:
# `bash benchmarks/run_gpu.sh sinkhorn|klot|scale`.
bench-gpu: $(STAMP)
	VENV=$(VENV) INSTALL=1 bash benchmarks/run_gpu.sh

# SAIL, its semi-supervised baselines and SOTAlign on the synthetic platonic data, 3 seeds
# (~10 min on 2 idle cores): benchmarks/results/<machine>-alignment.{md,json}.
align-report: $(STAMP)
	$(PY) benchmarks/alignment_report.py

clean:
	rm -rf $(VENV) build *.egg-info sotalign/_C*.so
