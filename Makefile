# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# Both create .venv/ when it is missing and install sotalign (with its C++ extension) and the
# test dependencies. torch is pinned in the same pip command, or pip pulls a CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.sotalign-installed

.PHONY: test test-fast lint format data demo demo-full demo-fashion bench bench-ot bench-gpu bench-distributed gpu-check gpu-wheels kernel-resources align-report install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test]"
	$(PY) -c "import sotalign; print('sotalign backends:', sotalign.available_backends())"
	touch $(STAMP)

# Triton 3.6 (what torch 2.11 ships, the GPU machines' version) beside the pinned one, for
# the sm_90 compile test (tests/kernels/test_kernel_compile.py): a --target folder, no venv.
TRITON36 := $(HOME)/.cache/sotalign/triton-3.6.0
$(TRITON36)/.installed: | $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

# The Debian data packages of sotalign.data.datasets (emoji font, OpenClipArt, Fashion-MNIST,
# WordNet): installed when root and missing, else the command is printed (their tests then skip).
data: $(STAMP)
	$(PY) -m sotalign.data.datasets --install

install: $(STAMP) $(TRITON36)/.installed

test: $(STAMP) $(TRITON36)/.installed data
	$(PY) -m pytest -q tests
	SOTALIGN_BENCH_SMOKE=1 $(PY) -m pytest -q benchmarks --benchmark-disable

# The quick answer while working (no slow tests, no benchmark smoke run; under 2 min).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Style, formatting, types (sotalign/ot, sotalign/kernels) and the import layers of
# ARCHITECTURE.md; the same commands run in .pre-commit-config.yaml and in CI.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .


# Real encoders on real data (emoji; embeddings cached under ~/.cache/sotalign): teacher, SAIL and
# SOTAlign at 100, 300 and 1000 pairs on emoji-hidden, table + plot. `make demo-full`: the whole
# benchmark. `make demo-fashion`: the large-pool zero-shot task (embeds 70,000 Fashion-MNIST images
# once, about 12 min on 2 idle cores, then trains ~25 runs).
demo: $(STAMP) data
	$(PY) -m sotalign.demo

demo-full: $(STAMP) data
	$(PY) -m sotalign.demo --full

demo-fashion: $(STAMP) data
	$(PY) benchmarks/alignment/zeroshot.py final --machine $$($(PY) -m benchmarks.machine)

# The full CPU benchmark run (~15 min on 2 cores) whose results are committed under
# benchmarks/results/<machine>-<suite>.{json,md,png}. Run it on an otherwise idle machine.
bench: $(STAMP)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,bench]"
	machine=$$($(PY) -m benchmarks.machine) && \
	for suite in crossover klot sinkhorn; do \
	  $(PY) -m pytest -q benchmarks/bench_$$suite.py \
	    --benchmark-json=benchmarks/results/$$machine-$$suite.json || exit 1; \
	done && \
	$(PY) -m benchmarks.report benchmarks/results/$$machine-crossover.json \
	  benchmarks/results/$$machine-klot.json benchmarks/results/$$machine-sinkhorn.json

# sotalign against POT (single and batch solver) and GeomLoss on the squared-Euclidean
# problem (~10 min on 2 cores): benchmarks/results/<machine>-ot.{json,md,png}.
bench-ot: $(STAMP)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,bench]"
	machine=$$($(PY) -m benchmarks.machine) && \
	nice $(PY) -m pytest -q benchmarks/bench_ot.py --benchmark-json=benchmarks/results/$$machine-ot.json && \
	$(PY) -m benchmarks.report benchmarks/results/$$machine-ot.json

# The GPU sweep (every shape and peer: the paper's algorithm eager and compiled, POT,
# GeomLoss/KeOps, FlashSinkhorn, each sotalign backend and precision) on a CUDA machine, in
# this venv; what does not fit the budget is skipped with the reason. Same code and output
# layout as gpu-check: benchmarks/results/<gpu>-gpu-sweep.{json,md}.
bench-gpu: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	PYTHON=$(PY) bash benchmarks/gpu_check.sh --sweep --budget 3000

# Weak scaling and bytes per iteration of the global KLOT on 1-4 gloo processes (~5 min on 2 cores):
# benchmarks/results/<machine>-distributed.{md,json}; see docs/distributed.md.
bench-distributed: $(STAMP)
	$(PY) -m benchmarks.distributed_scaling --rows 2048

# The device check in one command, on a GPU machine with no network: its own python3, torch
# and triton, sotalign from this tree; peer wheels from .whl/ (`make gpu-wheels` fetches them
# where pip works). < 6 min on one H100/H200. Output under $$OUT when set (else this tree),
# laid out like the repository: benchmarks/results/<gpu>-gpu-check.{json,md} and the measured
# sotalign/ot/dispatch.json. Next step, from the repository root: `cp -r <that folder>/. .`
# (then review `git diff sotalign/ot/dispatch.json`).
# `bash benchmarks/gpu_check.sh --smoke` runs it on CPU (Triton interpreter, tiny shapes).
gpu-check:
	bash benchmarks/gpu_check.sh

# Peers of gpu-check as wheels for the GPU machine's Python 3.12 (run where pip reaches PyPI).
GPU_PEERS := pot==0.9.7.post1 geomloss==0.3.1 pykeops==2.3 keopscore==2.3 flash-sinkhorn==0.4.1 lion-pytorch==0.2.5
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_PEERS)

# Registers and stack (spill) bytes of every Triton kernel and config, compiled for sm_90
# under both tritons (no GPU): benchmarks/results/sm90-kernel-resources.{md,json}.
kernel-resources: $(STAMP) $(TRITON36)/.installed
	$(PY) -m benchmarks.kernel_resources

# SAIL, its semi-supervised baselines and SOTAlign on the synthetic platonic data, 3 seeds
# (~10 min on 2 idle cores): benchmarks/results/<machine>-alignment.{md,json}.
align-report: $(STAMP)
	$(PY) benchmarks/alignment_report.py

clean:
	rm -rf $(VENV) build *.egg-info sotalign/_C*.so
