#!/usr/bin/env bash
# The GPU benchmark harness of sotalign in one command:
#
#   bash benchmarks/run_gpu.sh                 # sinkhorn, klot and scale suites, then the report
#   bash benchmarks/run_gpu.sh sinkhorn        # one suite (each stays under ~8 minutes), then
#   bash benchmarks/run_gpu.sh klot            #   the report over every suite JSON present
#   bash benchmarks/run_gpu.sh scale
#   bash benchmarks/run_gpu.sh iterations      # iteration counts (device-independent; the
#                                              #   committed ones come from a CPU run)
#   bash benchmarks/run_gpu.sh report          # only rebuild the report
#
# Suites write pytest-benchmark JSON to benchmarks/results/<gpu>-<suite>.json, where <gpu> is
# torch.cuda.get_device_name() in lower case (e.g. nvidia-h100-80gb-hbm3); the report
# (benchmarks/gpu_report.py) writes benchmarks/results/<gpu>-gpu-harness.{csv,json,md,png}.
#
# Environment:
#   VENV=path        the virtual environment to run in (default .venv); it needs a CUDA build
#                    of torch with triton, and sotalign installed in it
#   INSTALL=1        first pip-install sotalign and the benchmark peers (POT, GeomLoss/KeOps,
#                    FlashSinkhorn: `pip install -e .[bench]`) into that venv, nothing else;
#                    without it, missing peers are skipped with the reason in the report
#   SOTALIGN_BENCH_SMOKE=1   a CPU smoke run of the harness itself: tiny shapes, Triton in its
#                    interpreter, outputs named <cpu>-gpu-harness-smoke*; the times mean nothing
#   SOTALIGN_GPU_BUDGET_SECONDS   wall seconds per suite before it skips its remaining cases
#                    (default 420: a device command is killed at 10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
RESULTS=benchmarks/results
if [ ! -x "$PY" ]; then
    echo "run_gpu.sh: no python at $PY (set VENV=path/to/venv)" >&2
    exit 2
fi
if [ "${INSTALL:-0}" = 1 ]; then
    "$PY" -m pip install --quiet -e ".[bench]"
fi

SMOKE=${SOTALIGN_BENCH_SMOKE:-0}
export SOTALIGN_GPU_BUDGET_SECONDS=${SOTALIGN_GPU_BUDGET_SECONDS:-420}
if [ "$SMOKE" = 1 ]; then
    export SOTALIGN_BENCH_SMOKE=1 TRITON_INTERPRET=1
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
'run_gpu.sh: torch sees no CUDA device (SOTALIGN_BENCH_SMOKE=1 runs the CPU smoke run)')"
fi
"$PY" - <<'EOF'
import importlib
for module in ("sotalign", "triton", "ot", "geomloss", "pykeops", "flash_sinkhorn"):
    try:
        importlib.import_module(module)
    except Exception as error:  # reported, the cases of that peer are skipped
        print(f"run_gpu.sh: {module} does not import ({type(error).__name__}: {error})")
EOF

MACHINE=$("$PY" benchmarks/gpu_report.py --machine)
if [ "$SMOKE" = 1 ]; then
    RAW="$RESULTS/$MACHINE-gpu-harness-smoke"   # raw suite JSON: $RAW-<suite>.json
    REPORT="$RESULTS/$MACHINE-gpu-harness-smoke"
else
    RAW="$RESULTS/$MACHINE"
    REPORT="$RESULTS/$MACHINE-gpu-harness"
fi

status=0
run_suite() {  # run_suite <suite> <pytest args...>
    local suite=$1
    shift
    echo "== $suite ($(date -u +%H:%M:%S) UTC)"
    "$PY" -m pytest -q -rs -p no:cacheprovider "$@" --benchmark-json="$RAW-$suite.json" || status=1
}

suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(sinkhorn klot scale)
for suite in "${suites[@]}"; do
    case $suite in
        sinkhorn) run_suite sinkhorn benchmarks/bench_gpu_sinkhorn.py ;;
        klot) run_suite klot benchmarks/bench_gpu_klot.py -k test_klot_step ;;
        scale) run_suite scale benchmarks/bench_gpu_klot.py -k test_klot_scale ;;
        iterations)
            run_suite iterations benchmarks/bench_iterations.py
            "$PY" benchmarks/gpu_report.py "$RAW-iterations.json" ;;
        report) ;;
        *) echo "run_gpu.sh: unknown suite '$suite' (sinkhorn, klot, scale, iterations, report)" >&2
           exit 2 ;;
    esac
done

shopt -s nullglob
jsons=("$RAW"-sinkhorn.json "$RAW"-klot.json "$RAW"-scale.json)
present=()
for file in "${jsons[@]}"; do [ -f "$file" ] && present+=("$file"); done
if [ ${#present[@]} -gt 0 ]; then
    "$PY" benchmarks/gpu_report.py --out "$REPORT" "${present[@]}"
fi
exit $status
