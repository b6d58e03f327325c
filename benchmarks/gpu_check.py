r"""The device check: one short run on one H100/H200 that measures the GPU kernels.

    make gpu-check                     # = bash benchmarks/gpu_check.sh
    bash benchmarks/gpu_check.sh --smoke   # CPU, Triton in its interpreter, tiny shapes

It uses the machine's own python3, torch and triton, and sotalign from this source tree
(``PYTHONPATH``; the C++ extension is not needed). Peers (POT, GeomLoss/KeOps,
FlashSinkhorn) come from wheels in ``.whl/`` when present (gpu_check.sh installs them with
``pip install --no-index --target``); a missing peer is skipped with its reason. Sections,
in this order (and, inside each, the most useful rows first), each skipped with a reason
once the time budget (``--budget``, 330 s) runs short:

1. environment: devices, versions, ``available_backends()`` and why any backend is missing;
2. ``tests/test_triton_gpu.py`` (pytest, its own time recorded; the first autotune config
   only, ``SOTALIGN_TRITON_CONFIGS=first``, so that tuning does not dominate);
3. the headline Sinkhorn (n = m = 16384, d = 512, 100 iterations): the paper's loop,
   ``auto``, the dense path, POT ``sinkhorn_log``, FlashSinkhorn (fp32, tf32), and the online
   path at every precision, with the potentials' error against the paper's;
4. the headline KLOT step (forward + backward, n = m = 32768, d = 256, teacher 128, 100 +
   100 iterations): the paper's algorithm (:mod:`sotalign.ot.paper`), ``auto``, the dense
   path and the online path at every precision, with value and gradient errors against it;
5. the dense/online crossover: 20 iterations at n = 16384 for d in {32, 64, 128, 256} on
   both paths (online at the faster fp32-accurate flag of section 3), written as a
   measured ``dispatch.json`` (what ``backend="auto"`` reads);
6. scale: one Sinkhorn iteration (two half-steps, timed alone) at n = m = 262144, d = 512,
   online (fp16, then the fp32-accurate default).

Timing: one warm-up call (compilation and autotuning; its time is reported as the warm-up),
then the median of 3 timed calls, or 1 when the warm-up took over 4 s; peak memory is
``max_memory_allocated`` beyond what was allocated before the call. Every figure is from
this one run on this one device.

Writes ``<out>/<machine>-gpu-check.{json,md}`` and ``<out>/<machine>-gpu-check-dispatch.json``
with ``<out>`` = ``--out``, else ``$OUT`` when set, else benchmarks/results; outside ``$OUT``
a non-smoke run also writes the measured crossover into sotalign/ot/dispatch.json. The smoke
mode (``--smoke``) runs every section on CPU in Triton's interpreter with tiny shapes, in
well under a minute: its times mean nothing, it checks the harness.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sotalign  # noqa: E402
from sotalign.kernels import BACKEND_NAMES, Affinity, backend_error  # noqa: E402
from sotalign.ot import dispatch  # noqa: E402
from sotalign.ot.paper import paper_klot_features, paper_sinkhorn  # noqa: E402

EPS, EPS_TEACHER = 0.05, 0.01
#: The online precisions in the order they are timed: fp32-accurate first, IEEE fp32 (the
#: slowest, measured in the baseline) last, so a spent budget drops the least useful rows.
BY_PRIORITY = ("fp16x3", "tf32x3", "fp16", "tf32", "fp32")
#: Shapes: (n, d, teacher d) of the KLOT step, (n, d) of the Sinkhorn, crossover n and ds,
#: scale (n, d), iterations of (headline, crossover, scale).
FULL = dict(
    klot=(32768, 256, 128),
    sinkhorn=(16384, 512),
    crossover_n=16384,
    crossover_d=(32, 64, 128, 256),
    scale=(262144, 512),
    iters=(100, 20, 1),
)
TINY = dict(
    klot=(48, 32, 16),
    sinkhorn=(40, 32),
    crossover_n=40,
    crossover_d=(8, 16, 32),
    scale=(96, 16),
    iters=(4, 3, 1),
)
#: Seconds of the tests section before pytest is stopped (the target is 90 s).
TEST_TIMEOUT_S = 150
PEERS = ("ot", "geomloss", "pykeops", "flash_sinkhorn")


class Budget:
    """The wall-clock budget of the whole check."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clustered(n: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    """Unit-norm rows around 32 shared centres, fp32 (so plans are far from uniform)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(32, d, generator=generator), dim=1)
    labels = torch.randint(0, 32, (n,), generator=generator)
    noise = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    return torch.nn.functional.normalize(centres[labels] + 0.6 * noise, dim=1).to(device)


def measure(fn, device: torch.device, budget: Budget, predicted_s: float = 0.0) -> dict:
    """Warm-up, then the median of 3 timed calls (1 if the warm-up took over 4 s), peak extra
    memory, and the last call's output under "output"."""
    if predicted_s > budget.left():
        return {"skipped": f"time budget: {budget.left():.0f} s left, about {predicted_s:.0f} s needed"}
    try:
        start = time.perf_counter()
        fn()
        synchronize(device)
        warm = time.perf_counter() - start
        times = []
        for _ in range(1 if warm > 4 else 3):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            start = time.perf_counter()
            output = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        return {
            "seconds": statistics.median(times),
            "warmup_seconds": warm,
            "peak_extra_bytes": peak,
            "output": output,
        }
    except Exception as error:  # one failing provider must not stop the check
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return {"error": f"{type(error).__name__}: {message}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def relative(value: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((value.double() - expected).norm() / expected.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------- sections


def environment(device: torch.device) -> dict:
    import triton

    peers = {}
    for name in PEERS:
        try:
            module = importlib.import_module(name)
            peers[name] = getattr(module, "__version__", "imported")
        except Exception as error:
            peers[name] = f"missing: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "available_backends": sotalign.available_backends(),
        "backend_errors": {name: backend_error(name) for name in BACKEND_NAMES if backend_error(name)},
        "peers": peers,
        "dispatch_json": dispatch.TUNING,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(sms=properties.multi_processor_count, memory_gib=properties.total_memory / 2**30)
    return info


def run_tests(budget: Budget) -> dict:
    """tests/test_triton_gpu.py in a subprocess, its wall time recorded."""
    env = dict(
        os.environ,
        SOTALIGN_TRITON_CONFIGS="first",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    if not SMOKE:
        env.pop("TRITON_INTERPRET", None)
    timeout = min(TEST_TIMEOUT_S, max(10.0, budget.left() - 60))
    start = time.perf_counter()
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests/test_triton_gpu.py",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
        status = {0: "passed", 5: "no test ran (skipped)"}.get(
            run.returncode, f"failed (pytest exit status {run.returncode})"
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        tail, status = output.strip().splitlines()[-15:], f"stopped after {timeout:.0f} s"
    return {"status": status, "seconds": time.perf_counter() - start, "target_seconds": 90, "summary": tail}


def klot_section(shape, n_iters: int, device: torch.device, budget: Budget) -> dict:
    n, d, d_teacher = shape
    x, y = clustered(n, d, 1, device), clustered(n, d, 2, device)
    x_t = torch.nn.functional.normalize(clustered(n, d_teacher, 3, device) + 0.5 * x[:, :d_teacher], dim=1)
    y_t = torch.nn.functional.normalize(clustered(n, d_teacher, 4, device) + 0.5 * y[:, :d_teacher], dim=1)
    backend = "triton" if SMOKE else "auto"

    def step(loss_fn):
        def run():
            xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
            value = loss_fn(xs, ys)
            grad_x, grad_y = torch.autograd.grad(value, (xs, ys))
            return value.detach(), grad_x, grad_y

        return run

    def sotalign_step(**options):
        route = {}

        def loss_fn(xs, ys):
            value, route["taken"] = sotalign.klot(
                xs,
                ys,
                x_t,
                y_t,
                eps=EPS,
                eps_teacher=EPS_TEACHER,
                n_iters=n_iters,
                return_route=True,
                **options,
            )
            return value

        return step(loss_fn), route

    providers = [
        (
            "paper (authors' dense algorithm)",
            step(
                lambda xs, ys: paper_klot_features(
                    xs, ys, x_t, y_t, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=n_iters
                )
            ),
            None,
            4.2,
        ),
        ("sotalign auto", *sotalign_step(), 1.4),
    ]
    if SMOKE:  # on CPU "auto" picks the C++/torch backend; the Triton rows run interpreted
        providers.append(("sotalign auto (triton)", *sotalign_step(backend="triton"), 1.4))
    providers.append(
        ("sotalign dense fp32", *sotalign_step(backend=backend, path="dense", precision="fp32"), 1.4)
    )
    slow = {"fp32": 8.7, "tf32x3": 2.7, "fp16x3": 1.5, "tf32": 1.0, "fp16": 1.3}
    for precision in BY_PRIORITY:
        providers.append(
            (
                f"sotalign online {precision}",
                *sotalign_step(backend=backend, path="online", precision=precision),
                slow[precision],
            )
        )
    return compare(providers, device, budget, "step")


def compare(providers, device, budget, unit: str) -> dict:
    """Time each provider; errors of value and gradient (or potentials) against the first."""
    rows, reference = [], None
    for name, fn, route, predicted in providers:
        result = measure(fn, device, budget, 0 if SMOKE else 2 * predicted)
        output = result.pop("output", None)
        row = {"provider": name, **result}
        if route is not None and route.get("taken") is not None:
            taken = route["taken"]
            row["route"] = {
                "backend": taken.name,
                "path": taken.path,
                "precision": taken.precision,
                "reason": taken.reason,
            }
        if output is not None:
            if reference is None:
                reference = output
            elif unit == "step":  # (value, grad x, grad y)
                row["value_rel_error"] = relative(output[0], reference[0])
                row["grad_rel_error"] = relative(
                    torch.cat([t.flatten() for t in output[1:]]),
                    torch.cat([t.flatten() for t in reference[1:]]),
                )
            else:  # potentials (f, g) in the units of K
                row["potential_rel_error"] = relative(torch.cat(output), torch.cat(reference))
        if reference is not None and "seconds" in row and rows and "seconds" in rows[0]:
            row["speedup_vs_first"] = rows[0]["seconds"] / row["seconds"]
        rows.append(row)
    return {"rows": rows}


def sinkhorn_section(shape, n_iters: int, device: torch.device, budget: Budget) -> dict:
    n, d = shape
    x, y = clustered(n, d, 5, device), clustered(n, d, 6, device)
    backend = "triton" if SMOKE else "auto"

    def paper():
        K = x @ y.T
        _, u, v = paper_sinkhorn(K, EPS, n_iters)
        return EPS * u, EPS * v  # (f, g) in the units of K: log P = (f + g + K)/ε

    def ours(**options):
        route = {}

        def run():
            result = sotalign.sinkhorn(x, y, eps=EPS, n_iters=n_iters, **options)
            route["taken"] = result.route
            return result.f, result.g

        return run, route

    providers = [
        ("paper (authors' dense loop)", paper, None, 0.6),
        ("sotalign auto", *ours(), 0.2),
        ("sotalign dense fp32", *ours(backend=backend, path="dense", precision="fp32"), 0.2),
    ]
    providers += peer_providers(x, y, n_iters, device)
    slow = {"fp32": 2.7, "tf32x3": 0.8, "fp16x3": 0.5, "tf32": 0.3, "fp16": 0.35}
    for precision in BY_PRIORITY:
        providers.append(
            (
                f"sotalign online {precision}",
                *ours(backend=backend, path="online", precision=precision),
                slow[precision],
            )
        )
    return compare(providers, device, budget, "solve")


def peer_providers(x, y, n_iters, device) -> list:
    """POT's sinkhorn_log and FlashSinkhorn (GPU only), or a row saying why not."""
    rows = []
    try:
        import ot

        def pot():
            M = -(x @ y.T)
            a = torch.full((x.shape[0],), 1.0 / x.shape[0], device=device)
            b = torch.full((y.shape[0],), 1.0 / y.shape[0], device=device)
            ot.bregman.sinkhorn_log(a, b, M, EPS, numItermax=n_iters, stopThr=0, warn=False)

        rows.append(("POT sinkhorn_log (torch)", pot, None, 0.6))
    except ImportError as error:
        rows.append(("POT sinkhorn_log (torch)", _missing(error), None, 0))
    for tf32 in (False, True):
        name = f"FlashSinkhorn {'tf32' if tf32 else 'fp32'}"
        try:
            if device.type != "cuda":
                raise ImportError("FlashSinkhorn runs on CUDA only")
            import flash_sinkhorn

            solver = flash_sinkhorn.SamplesLoss(
                "sinkhorn",
                backend="alternating",
                half_cost=True,
                eps=EPS,
                n_iters=n_iters,
                use_epsilon_scaling=False,
                debias=False,
                potentials=True,
                allow_tf32=tf32,
            )
            rows.append((name, lambda solver=solver: solver(x, y) and None, None, 2.7 if not tf32 else 0.3))
        except ImportError as error:
            rows.append((name, _missing(error), None, 0))
    return rows


def _missing(error: BaseException):
    def skip():
        raise ImportError(f"skipped: {str(error).splitlines()[0][:120]}")

    return skip


def crossover_section(n: int, ds, n_iters: int, online_precision: str, device, budget) -> dict:
    """Per d: dense vs online Sinkhorn time; the crossover is the smallest measured d from
    which the dense path is never slower."""
    backend = "triton" if SMOKE else "auto"
    rows = []
    for d in ds:
        x, y = clustered(n, d, 7, device), clustered(n, d, 8, device)
        row = {"d": d}
        for path, precision in (("dense", "fp32"), ("online", online_precision)):
            result = measure(
                functools.partial(
                    sotalign.sinkhorn,
                    x,
                    y,
                    eps=EPS,
                    n_iters=n_iters,
                    backend=backend,
                    path=path,
                    precision=precision,
                ),
                device,
                budget,
                0 if SMOKE else 3.0,
            )
            result.pop("output", None)
            row[path] = result
        rows.append(row)
    timed = [r for r in rows if "seconds" in r["dense"] and "seconds" in r["online"]]
    crossover = None
    for i, row in enumerate(timed):
        if all(r["dense"]["seconds"] <= r["online"]["seconds"] for r in timed[i:]):
            crossover = row["d"]
            break
    if crossover is None and timed:
        crossover = 2 * timed[-1]["d"]  # online won everywhere measured
    return {
        "rows": rows,
        "online_precision": online_precision,
        "crossover_d": crossover,
        "complete": len(timed) == len(rows),
    }


def scale_section(shape, device, budget) -> dict:
    """One Sinkhorn iteration (a row and a column half-step) on the online path, timed alone."""
    n, d = shape
    x, y = clustered(n, d, 9, device), clustered(n, d, 10, device)
    K = Affinity.from_features(x, y)
    log_w = torch.full((n,), -math.log(n), device=device)
    rows = []
    for precision in ("fp16", dispatch.ONLINE_PRECISION):
        route = sotalign.plan_route(
            n, n, d, device=device, backend="triton" if SMOKE else "auto", path="online", precision=precision
        )

        def iteration(backend=route.backend):
            f = backend.row_update(K, torch.zeros_like(log_w), EPS, log_w)
            return backend.column_update(K, f, EPS, log_w)

        result = measure(iteration, device, budget, 0 if SMOKE else 4.0)
        result.pop("output", None)
        rows.append(
            {
                "provider": f"sotalign online {precision}, 1 iteration",
                **result,
                "route": {
                    "backend": route.name,
                    "path": route.path,
                    "precision": route.precision,
                    "reason": route.reason,
                },
            }
        )
    return {"rows": rows}


# --------------------------------------------------------------------------- output


def fastest_accurate(sinkhorn: dict) -> str:
    """The faster of the fp32-accurate online flags in the headline Sinkhorn (else the default)."""
    times = {
        row["provider"].rsplit(" ", 1)[1]: row["seconds"]
        for row in sinkhorn["rows"]
        if row["provider"] in ("sotalign online tf32x3", "sotalign online fp16x3") and "seconds" in row
    }
    return min(times, key=times.get) if times else dispatch.ONLINE_PRECISION


def measured_dispatch(report: dict, results_name: str) -> dict:
    tuning = json.loads(json.dumps(dispatch.TUNING))
    provenance = "smoke (CPU interpreter: times meaningless)" if SMOKE else "measured"
    where = f"{report['environment']['device_name']}, {report['date']}"
    crossover = report["crossover"]
    if crossover.get("crossover_d") is not None and crossover.get("complete"):
        ds = [row["d"] for row in crossover["rows"]]
        tuning["dense_min_dim"]["cuda"] = {
            "value": crossover["crossover_d"],
            "provenance": provenance,
            "source": results_name,
            "note": f"{where}: Sinkhorn n = m = {report['shapes']['crossover_n']}, d in {ds}, dense fp32 "
            f"vs online {crossover['online_precision']}; the smallest d from which dense is "
            "never slower (if online won everywhere, twice the largest d).",
        }
    times = {row["provider"]: row["seconds"] for row in report["sinkhorn"]["rows"] if "seconds" in row}
    if "sotalign online tf32x3" in times and "sotalign online fp16x3" in times:
        tuning["online_precision"]["cuda"] = {
            "value": fastest_accurate(report["sinkhorn"]),
            "provenance": provenance,
            "source": results_name,
            "note": f"{where}: the faster fp32-accurate flag at the headline Sinkhorn "
            f"(tf32x3 {times['sotalign online tf32x3']:.3g} s, fp16x3 "
            f"{times['sotalign online fp16x3']:.3g} s per solve).",
        }
    return tuning


def fmt_bytes(size) -> str:
    return "—" if size is None else f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def table(rows: list[dict], per: str, iters: int | None) -> list[str]:
    head = (
        ["provider", f"s / {per}"]
        + (["ms / iter"] if iters else [])
        + ["speed × first row", "warm-up s", "peak extra", "value err", "grad / potential err", "route"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in rows:
        if "seconds" not in row:
            cells = [row.get("error") or row.get("skipped")] + [""] * (len(head) - 2)
        else:
            error = row.get("grad_rel_error", row.get("potential_rel_error"))
            route = row.get("route")
            cells = (
                [f"{row['seconds']:.4g}"]
                + ([f"{1e3 * row['seconds'] / iters:.3g}"] if iters else [])
                + [
                    f"{row.get('speedup_vs_first', 1.0):.2f}",
                    f"{row['warmup_seconds']:.3g}",
                    fmt_bytes(row["peak_extra_bytes"]),
                    f"{row['value_rel_error']:.1e}" if "value_rel_error" in row else "—",
                    f"{error:.1e}" if error is not None else "—",
                    f"{route['backend']} {route['path']} {route['precision']}" if route else "—",
                ]
            )
        lines.append("| " + " | ".join([row["provider"]] + cells) + " |")
    return lines


def markdown(report: dict) -> str:
    env, shapes = report["environment"], report["shapes"]
    lines = [f"# gpu-check: {env['device_name']} ({report['date']})", ""]
    if SMOKE:
        lines += [
            "**CPU smoke run**: Triton in its interpreter, tiny shapes. The times mean "
            "nothing; this checks that every section of the harness runs.",
            "",
        ]
    lines += [
        f"torch {env['torch']}, triton {env['triton']}, python {env['python']}; backends "
        f"{env['available_backends']}; missing: "
        + (", ".join(f"{k} ({v})" for k, v in env["backend_errors"].items()) or "none")
        + "; peers: "
        + ", ".join(f"{k} {v}" for k, v in env["peers"].items()),
        "",
        f"Total {report['seconds']:.0f} s. Errors are relative to the first row of each table "
        "(the paper's algorithm, fp32).",
        "",
        f"## tests/test_triton_gpu.py: {report['tests']['status']} in {report['tests']['seconds']:.0f} s "
        f"(target ≤ {report['tests']['target_seconds']} s)",
        "",
        "```",
        *report["tests"]["summary"],
        "```",
        "",
    ]
    n, d, d_t = shapes["klot"]
    lines += [
        f"## KLOT step, n = m = {n}, d = {d}, teacher {d_t}, {shapes['iters'][0]} + "
        f"{shapes['iters'][0]} iterations, forward + backward",
        "",
    ]
    lines += table(report["klot"]["rows"], "step", None)
    n, d = shapes["sinkhorn"]
    lines += ["", f"## Sinkhorn, n = m = {n}, d = {d}, {shapes['iters'][0]} iterations", ""]
    lines += table(report["sinkhorn"]["rows"], "solve", shapes["iters"][0])
    crossover = report["crossover"]
    lines += [
        "",
        f"## Dense/online crossover, Sinkhorn n = m = {shapes['crossover_n']}, "
        f"{shapes['iters'][1]} iterations (online at {crossover['online_precision']})",
        "",
        "| d | dense s | online s | online / dense |",
        "|---:|---:|---:|---:|",
    ]
    for row in crossover["rows"]:
        dense, online = row["dense"].get("seconds"), row["online"].get("seconds")
        ratio = f"{online / dense:.2f}" if dense and online else "—"
        lines.append(
            f"| {row['d']} | {dense if dense is None else f'{dense:.4g}'} | "
            f"{online if online is None else f'{online:.4g}'} | {ratio} |"
        )
    lines += [
        "",
        f"Measured crossover: d = {crossover['crossover_d']} "
        f"({'all d timed' if crossover['complete'] else 'incomplete: not written to dispatch.json'}).",
        "",
    ]
    n, d = shapes["scale"]
    lines += [f"## Scale, n = m = {n}, d = {d}, one online iteration", ""]
    lines += table(report["scale"]["rows"], "iteration", None)
    return "\n".join(lines) + "\n"


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--budget", type=float, default=330.0, help="wall seconds for the whole check")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results)")
    args = parser.parse_args()
    started = time.monotonic()
    budget = Budget(args.budget)
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (--smoke runs the CPU smoke mode)")
    device = torch.device("cuda" if not SMOKE else "cpu")
    shapes = TINY if SMOKE else FULL
    headline_iters, crossover_iters, _ = shapes["iters"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": SMOKE, "shapes": shapes}
    report["environment"] = environment(device)
    print(json.dumps(report["environment"], indent=1, default=str), flush=True)
    sections = [
        ("tests", lambda: run_tests(budget)),
        ("sinkhorn", lambda: sinkhorn_section(shapes["sinkhorn"], headline_iters, device, budget)),
        ("klot", lambda: klot_section(shapes["klot"], headline_iters, device, budget)),
        (
            "crossover",
            lambda: crossover_section(
                shapes["crossover_n"],
                shapes["crossover_d"],
                crossover_iters,
                fastest_accurate(report["sinkhorn"]),
                device,
                budget,
            ),
        ),
        ("scale", lambda: scale_section(shapes["scale"], device, budget)),
    ]
    for name, run in sections:
        print(f"== {name} ({budget.left():.0f} s left)", flush=True)
        report[name] = run()
        print(json.dumps(jsonable(report[name]), indent=1, default=str)[:4000], flush=True)
    report["seconds"] = time.monotonic() - started

    machine = "cpu-smoke" if SMOKE else "-".join(report["environment"]["device_name"].lower().split()[:2])
    out = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"{machine}-gpu-check"
    results_name = f"benchmarks/results/{prefix.name}.md"
    tuning = measured_dispatch(report, results_name)
    Path(f"{prefix}.json").write_text(json.dumps(jsonable(report), indent=1, default=str) + "\n")
    Path(f"{prefix}.md").write_text(markdown(report))
    Path(f"{prefix}-dispatch.json").write_text(json.dumps(tuning, indent=2) + "\n")
    if not SMOKE and not args.out and not os.environ.get("OUT"):
        dispatch.TUNING_FILE.write_text(json.dumps(tuning, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {prefix}.json, {prefix}.md, {prefix}-dispatch.json ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
