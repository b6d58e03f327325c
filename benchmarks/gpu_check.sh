#!/usr/bin/env bash
# `make gpu-check` / `make bench-gpu`: the GPU benchmark (python -m benchmarks.gpu) with the
# machine's own python3, torch and triton, and sotalign from this source tree; no network.
# Peer wheels in .whl/ (`make gpu-wheels`: POT, GeomLoss, pykeops + keopscore, flash-sinkhorn,
# lion-pytorch), when present, are installed with no index into a folder put on PYTHONPATH;
# a missing peer is skipped with the reason.
#   bash benchmarks/gpu_check.sh [--smoke] [--sweep] [--budget SECONDS] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    PEERS=${TMPDIR:-/tmp}/sotalign-peers
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$PEERS" .whl/*.whl
    export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! why=$("$PY" -c "import sotalign" 2>&1); then
    echo "gpu_check.sh: sotalign does not import here: ${why##*$'\n'}" >&2
    echo "  (a missing dependency can travel as a wheel: make gpu-wheels, then carry .whl)" >&2
    exit 2
fi
exec "$PY" -m benchmarks.gpu "$@"
