# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# Both create .venv/ when it is missing and install sotalign (with its C++ extension) and the
# test dependencies. torch is pinned in the same pip command, or pip pulls a CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.sotalign-installed

.PHONY: test demo bench install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test]"
	$(PY) -c "import sotalign; print('sotalign backends:', sotalign.available_backends())"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests
	SOTALIGN_BENCH_SMOKE=1 $(PY) -m pytest -q benchmarks --benchmark-disable

demo: $(STAMP)
	$(PY) -m sotalign.demo

# The full CPU benchmark run whose results are committed under benchmarks/results/.
bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/results/latest.tmp.json
	$(PY) benchmarks/report.py benchmarks/results/latest.tmp.json

clean:
	rm -rf $(VENV) build *.egg-info sotalign/_C*.so
