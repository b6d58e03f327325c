r"""The GPU benchmark: a budgeted device check, or with ``--sweep`` every shape and peer.

    python -m benchmarks.gpu                 # the device check (make gpu-check), < 6 min
    python -m benchmarks.gpu --sweep         # the sweep (make bench-gpu), within --budget
    python -m benchmarks.gpu --smoke [--sweep]   # CPU, Triton in its interpreter, tiny shapes

It needs torch and triton, sotalign from this source tree (``PYTHONPATH``; the C++
extension is not needed), and no network. Peers (:mod:`benchmarks.peers`) that do not
import are skipped with the reason. Sections, in this order, each row skipped with its
reason once the time budget (``--budget``) cannot fit its compilation and autotuning
warm-up plus one call (the roofline bound × an assumed slowdown), or once its memory is
over 60 % of the GPU's:

1. ``tests``: ``tests/kernels/test_triton_gpu.py`` in pytest (first autotune config only);
2. ``sinkhorn``: 100 iterations at n = m = 16384, d = 512: the paper's loop, ``auto``, the
   dense path, POT, FlashSinkhorn and the online path at every precision, with the error of
   the potentials against the paper's;
3. ``crossover``: 20 iterations at n = 16384, d in {32, 64, 128, 256}, dense fp32 against
   online at the faster fp32-accurate flag of section 2; written, with that flag, as the
   measured ``dispatch.json`` (what ``backend="auto"`` reads) as soon as it is done;
4. ``klot``: the KLOT step (forward + backward, n = m = 32768, d = 256, teacher 128,
   100 + 100 iterations): the paper's algorithm, ``auto``, dense, online at every precision;
5. ``scale``: online Sinkhorn iterations at n = m = 262144, d = 512 (fp16, then the
   fp32-accurate default).

``--sweep`` adds shapes (Sinkhorn n up to 262144 with d in {64, 512, 1024}; KLOT n up to
32768 with (d, d*) in {(256, 128), (1024, 512)}; a KLOT step at n = 262144) and providers
(the paper's loop under ``torch.compile``, GeomLoss/KeOps, sotalign's ``torch`` and ``keops``
backends, CUDA graphs). KeOps is probed (up to minutes of compilation) only in the sweep.

Timing (:func:`measure`): one warm-up call (compilation, autotuning: reported), then the
median of up to 3 calls (1 when the warm-up took over 4 s), each started only while the
budget still holds the last call's duration; peak memory is CUDA ``max_memory_allocated``
beyond what was allocated before. Every figure comes from this one run on this one device.

Output (written after every section, so a run stopped early keeps what it measured), under
``--out`` (default ``$OUT``; else, for a measured run, this repository; for a smoke run, a
new temporary folder), laid out like the repository so that copying the folder over it puts
everything in place: ``benchmarks/results/<machine>-gpu-{check,sweep}.{json,md}`` and the
measured ``sotalign/ot/dispatch.json``. The exit status is 1 when the tests section failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import sotalign  # noqa: E402
from sotalign.kernels import PRECISIONS, backend_error  # noqa: E402
from sotalign.ot import dispatch  # noqa: E402
from sotalign.rundir import atomic_write, write_json  # noqa: E402

from . import roofline  # noqa: E402
from .machine import machine_slug, this_machine  # noqa: E402
from .peers import PEERS, Peer, paper_klot_loss, potential_error  # noqa: E402
from .problems import Problem, klot_step, make_problem  # noqa: E402
from .report import GPU_FORMAT, crossover_dim, gpu_markdown, relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/kernels/test_triton_gpu.py"
EPS, EPS_TEACHER = 0.05, 0.01
#: The online precisions in the order they are timed: fp32-accurate first, IEEE fp32 (the
#: slowest) last, so a spent budget drops the least useful rows.
BY_PRIORITY = ("fp16x3", "tf32x3", "fp16", "tf32", "fp32")
ACCURATE = ("fp16x3", "tf32x3")
#: Timed calls after the warm-up (one in smoke runs), and the warm-up seconds above which
#: one call is enough.
REPEATS, SLOW_CALL_S = (1 if SMOKE else 3), 4.0
#: Seconds of the tests section before pytest is stopped (the module is sized for 90 s).
TEST_TIMEOUT_S = 150
#: Rows whose estimated memory is above this fraction of the GPU's are skipped.
MEMORY_FRACTION = 0.6


@dataclass(frozen=True)
class Shapes:
    """The cases of one run: (n, d, iterations) of Sinkhorn, (n, d, d*, iterations) of KLOT."""

    sinkhorn: list[tuple[int, int, int]]
    klot: list[tuple[int, int, int, int]]
    crossover: tuple[int, tuple[int, ...], int]  # n, ds, iterations
    scale_sinkhorn: tuple[int, int, int]
    scale_klot: list[tuple[int, int, int, int]] = field(default_factory=list)


def sweep_iterations(n: int) -> int:
    """100 iterations up to n = 32768, fewer beyond (the budget)."""
    return 100 if n <= 32768 else 20 if n <= 65536 else 5


CHECK = Shapes(
    sinkhorn=[(16384, 512, 100)],
    klot=[(32768, 256, 128, 100)],
    crossover=(16384, (32, 64, 128, 256), 20),
    scale_sinkhorn=(262144, 512, 3),
)
SWEEP = Shapes(
    sinkhorn=CHECK.sinkhorn
    + [
        (n, d, sweep_iterations(n))
        for n in (4096, 16384, 32768, 65536, 262144)
        for d in (64, 512, 1024)
        if (n, d) != (16384, 512)
    ],
    klot=[(32768, 256, 128, 100), (32768, 1024, 512, 100)]
    + [(n, d, d_t, 100) for n in (4096, 16384) for d, d_t in ((256, 128), (1024, 512))],
    crossover=CHECK.crossover,
    scale_sinkhorn=CHECK.scale_sinkhorn,
    scale_klot=[(262144, 512, 256, 10)],
)
SMOKE_CHECK = Shapes(
    sinkhorn=[(40, 32, 4)],
    klot=[(48, 32, 16, 4)],
    crossover=(40, (8, 16, 32), 3),
    scale_sinkhorn=(96, 16, 2),
)
SMOKE_SWEEP = Shapes(
    sinkhorn=SMOKE_CHECK.sinkhorn + [(64, 16, 4)],
    klot=SMOKE_CHECK.klot,
    crossover=SMOKE_CHECK.crossover,
    scale_sinkhorn=SMOKE_CHECK.scale_sinkhorn,
    scale_klot=[(96, 16, 8, 2)],
)


# --------------------------------------------------------------------------- timing


class Budget:
    """The wall-clock budget of the whole run."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, budget: Budget, warmup_s: float, call_s: float):
    """Time ``fn``: a warm-up call, then up to :data:`REPEATS` calls while the budget holds the
    last one's duration. Returns the row's timing fields and fn's last output (None if none).

    ``warmup_s`` and ``call_s`` are the assumed seconds of the warm-up (compilation and
    autotuning) and of one call: the row is skipped unless the budget holds both.
    """
    if warmup_s + call_s > budget.left():
        needed = f"about {warmup_s:.0f} s of warm-up + {call_s:.0f} s per call"
        return {"skipped": f"time budget: {budget.left():.0f} s left, {needed}"}, None
    try:
        start = time.perf_counter()
        output = fn()
        synchronize(device)
        warm = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times: list[float] = []
        while len(times) < (1 if warm > SLOW_CALL_S else REPEATS):
            if budget.left() < (times[-1] if times else min(warm, call_s or warm)):
                break
            del output
            start = time.perf_counter()
            output = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        if not times:
            return {"warmup_seconds": warm, "skipped": "time budget spent after the warm-up"}, output
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        timing = {"seconds": statistics.median(times), "times": times, "warmup_seconds": warm}
        return {**timing, "peak_extra_bytes": peak}, output
    except Exception as error:  # one failing provider must not stop the run
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return {"error": f"{type(error).__name__}: {message}"}, None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- providers

Run = Callable[[Problem, int], tuple[object, object]]  # (problem, iterations) -> (output, route)


@dataclass(frozen=True)
class Provider:
    """One timed configuration and what the budget and memory rules assume about it.

    ``path``/``precision``: the roofline it is held to (``auto``: the route sotalign took);
    ``slowdown``: its assumed time over that bound; ``warmup_s``: its assumed first-call
    compilation and autotuning; ``dense_matrices``: the n×m fp32 matrices it stores;
    ``missing``: why it does not run here.
    """

    name: str
    run: Run
    path: str
    precision: str = "fp32"
    slowdown: float = 3.0
    warmup_s: float = 1.0
    dense_matrices: int = 0
    missing: str | None = None
    note: str = ""


def sotalign_sinkhorn(**options) -> Run:
    def run(problem: Problem, n_iters: int):
        result = sotalign.sinkhorn(problem.x, problem.y, eps=EPS, n_iters=n_iters, **options)
        return (result.f, result.g), result.route

    return run


def peer_sinkhorn(peer: Peer) -> Run:
    solvers: dict = {}  # per iteration count, built by the first (warm-up) call

    def run(problem: Problem, n_iters: int):
        if n_iters not in solvers:
            solvers[n_iters] = peer.make(EPS, n_iters)
        return solvers[n_iters](problem.x, problem.y), None

    return run


def leaves(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    return problem.x.clone().requires_grad_(), problem.y.clone().requires_grad_()


def sotalign_klot(**options) -> Run:
    def run(problem: Problem, n_iters: int):
        x, y = leaves(problem)
        taken = {}

        def loss(*features):
            value, taken["route"] = sotalign.klot(
                *features, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=n_iters, return_route=True, **options
            )
            return value

        value = klot_step(loss, x, y, problem.x_teacher, problem.y_teacher)
        return (value, x.grad, y.grad), taken["route"]

    return run


def paper_klot(compiled: bool) -> Run:
    def run(problem: Problem, n_iters: int):
        x, y = leaves(problem)
        loss = paper_klot_loss(EPS, EPS_TEACHER, n_iters, compiled=compiled)
        value = klot_step(loss, x, y, problem.x_teacher, problem.y_teacher)
        return (value, x.grad, y.grad), None

    return run


#: Assumed time over the roofline bound of sotalign's online path per precision, and of the
#: peers (from the H200 baseline of the previous kernels; they only size the budget gate).
ONLINE_SLOWDOWN = {"fp32": 4.0, "tf32x3": 3.0, "fp16x3": 4.0, "tf32": 3.0, "fp16": 6.0}
TRITON_WARMUP_S = 20.0
COMPILE_WARMUP_S = 60.0


def backend_missing(name: str, device: torch.device) -> str | None:
    if name == "keops" and device.type != "cuda":
        return "sotalign's keops backend is timed on CUDA only (on CPU it compiles C++ for minutes)"
    return backend_error(name)


def providers(section: str, device: torch.device, sweep: bool, n: int) -> list[Provider]:
    """The rows of a ``sinkhorn`` or ``klot`` case, the most useful first."""
    klot = section == "klot"
    ours = sotalign_klot if klot else sotalign_sinkhorn
    # On CPU "auto" takes the C++ or torch backend; the explicit rows then run Triton interpreted.
    backend = "triton" if SMOKE else "auto"
    rows = [
        Provider(
            "paper-dense",
            paper_klot(False) if klot else peer_sinkhorn(PEERS["paper-dense"]),
            "dense",
            slowdown=12.0,
            dense_matrices=9 if klot else 5,
        ),
        Provider("sotalign-auto", ours(), "auto", warmup_s=TRITON_WARMUP_S, dense_matrices=3),
    ]
    rows.append(
        Provider(
            "sotalign-dense-fp32",
            ours(backend=backend, path="dense", precision="fp32"),
            "dense",
            warmup_s=TRITON_WARMUP_S,
            dense_matrices=3 if klot else 2,
        )
    )
    peers = [] if klot else ["pot-sinkhorn_log", "flashsinkhorn-fp32", "flashsinkhorn-tf32"]
    if sweep and not klot:
        peers += ["paper-dense-compiled", "geomloss-keops"]
    for name in peers:
        peer = PEERS[name]
        precision = "tf32" if name.endswith("tf32") else "fp32"
        dense = name.startswith(("pot", "paper"))
        rows.append(
            Provider(
                name,
                peer_sinkhorn(peer),
                "dense" if dense else "online",
                precision,
                slowdown=12.0 if name.startswith("pot") else 6.0 if dense else 4.0,
                warmup_s=COMPILE_WARMUP_S if "compiled" in name or "keops" in name else 5.0,
                dense_matrices=7 if dense else 0,
                missing=peer.missing(device),
                note=peer.note,
            )
        )
    if sweep and klot:
        rows.append(
            Provider(
                "paper-dense-compiled",
                paper_klot(True),
                "dense",
                slowdown=6.0,
                warmup_s=COMPILE_WARMUP_S,
                dense_matrices=9,
                missing=PEERS["paper-dense-compiled"].missing(device),
            )
        )
    rows += [online_provider(ours, precision) for precision in BY_PRIORITY]
    if sweep:
        rows += [
            Provider("sotalign-torch", ours(backend="torch"), "auto", slowdown=15.0, dense_matrices=1),
            Provider(
                "sotalign-keops",
                ours(backend="keops", path="online"),
                "online",
                slowdown=10.0,
                warmup_s=COMPILE_WARMUP_S,
                missing=backend_missing("keops", device),
            ),
        ]
        if not klot and n <= 4096:  # where launch overhead matters
            rows.append(
                Provider(
                    "sotalign-online-fp32-graph",
                    ours(backend=backend, path="online", cuda_graph=True),
                    "online",
                    slowdown=ONLINE_SLOWDOWN["fp32"],
                    warmup_s=TRITON_WARMUP_S,
                    missing=None if device.type == "cuda" else "cuda_graph=True needs CUDA",
                )
            )
    return rows


def scale_providers(section: str, device: torch.device) -> list[Provider]:
    """Online only (a stored K at n = 262144 would take 256 GiB): fp16, then the default."""
    ours = sotalign_klot if section == "klot" else sotalign_sinkhorn
    return [online_provider(ours, p) for p in dict.fromkeys(("fp16", dispatch.ONLINE_PRECISION))]


def online_provider(ours: Callable[..., Run], precision: str) -> Provider:
    """sotalign's online path at one dot precision (Triton; interpreted in smoke runs)."""
    run = ours(backend="triton" if SMOKE else "auto", path="online", precision=precision)
    slowdown = ONLINE_SLOWDOWN[precision]
    return Provider(f"sotalign-online-{precision}", run, "online", precision, slowdown, TRITON_WARMUP_S)


# --------------------------------------------------------------------------- roofline


def gpu_model(device_name: str) -> tuple[str, str]:
    """(roofline.GPUS key, label): an H100 SXM stands in for unknown devices and the CPU."""
    key = roofline.gpu_key(device_name)
    return (key, key) if key else ("h100-sxm", "h100-sxm (stand-in)")


def bound(section: str, case: tuple, path: str, precision: str, gpu: str) -> float:
    """The roofline lower bound of one call of a case on ``path`` at ``precision``."""
    if section == "klot":
        n, d, d_t, n_iters = case
        return roofline.klot_step_bound(n, n, d, d_t, path, gpu, precision, n_iters)
    n, d, n_iters = case
    seconds = n_iters * roofline.sinkhorn_iteration_bound(n, n, d, path, gpu, precision)
    if path == "dense":  # the K build, once per call
        spec = roofline.GPUS[gpu]
        seconds += max(2 * n * n * d / spec.flops(precision), n * n * 4 / spec.hbm_bytes)
    return seconds


def predicted_call(provider: Provider, section: str, case: tuple, gpu: str) -> float:
    """The roofline bound × the provider's slowdown (``auto``: the faster path it may take)."""
    if provider.path == "auto":
        options = (("dense", "fp32"), ("online", dispatch.ONLINE_PRECISION))
        return provider.slowdown * min(bound(section, case, p, q, gpu) for p, q in options)
    return provider.slowdown * bound(section, case, provider.path, provider.precision, gpu)


def memory_skip(provider: Provider, case: tuple, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    n, d = case[0], case[1]
    estimate = provider.dense_matrices * n * n * 4 + 8 * n * d * 4
    limit = MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
    if estimate > limit:
        return f"estimated peak {estimate / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of GPU memory"
    return None


# --------------------------------------------------------------------------- sections


def run_case(section: str, case: tuple, rows: list[Provider], ctx: Context, errors: bool = True) -> dict:
    """Time every provider of one case; with ``errors``, the error of each output against the
    first row's (the paper's algorithm)."""
    device, budget, gpu = ctx.device, ctx.budget, ctx.gpu
    n, d = case[0], case[1]
    problem = make_problem(n, n, d, case[2] if section == "klot" else 1, device=device)
    n_iters = case[-1]
    out, reference = [], None
    for provider in rows:
        row: dict = {"provider": provider.name}
        if provider.note:
            row["note"] = provider.note
        reason = provider.missing or memory_skip(provider, case, device)
        if reason:
            out.append({**row, "skipped": reason})
            continue
        taken: dict = {}

        def call(provider=provider, taken=taken):
            output, taken["route"] = provider.run(problem, n_iters)
            return output

        warmup, call_s = (
            (0.0, 0.0) if SMOKE else (provider.warmup_s, predicted_call(provider, section, case, gpu))
        )
        timing, output = measure(call, device, budget, warmup, call_s)
        row.update(timing)
        route = taken.get("route")
        if route is not None:
            row["route"] = {
                "backend": route.name,
                "path": route.path,
                "precision": route.precision,
                "reason": route.reason,
            }
        path, precision = (
            (route.path, route.precision) if route is not None else (provider.path, provider.precision)
        )
        if "seconds" in row and path in roofline.PATHS:
            row["bound_seconds"] = bound(
                section, case, path, precision if precision in PRECISIONS else "fp32", gpu
            )
        if output is not None and errors:
            if reference is None:
                reference = output
            elif section == "klot":  # (value, grad x, grad y)
                row["value_error"] = relative_error(output[0], reference[0])
                row["grad_error"] = relative_error(
                    torch.cat([t.flatten() for t in output[1:]]),
                    torch.cat([t.flatten() for t in reference[1:]]),
                )
            else:
                row["potential_error"] = potential_error(output, reference)
        out.append(row)
    return {"case": list(case), "rows": out}


def fastest_accurate(report: dict) -> str:
    """The faster fp32-accurate online flag at the first Sinkhorn case (else the default)."""
    cases = report.get("sinkhorn", {}).get("cases") or [{"rows": []}]
    times = {
        row["provider"].rsplit("-", 1)[1]: row["seconds"]
        for row in cases[0]["rows"]
        if row["provider"] in {f"sotalign-online-{p}" for p in ACCURATE} and "seconds" in row
    }
    return min(times, key=times.get) if times else dispatch.ONLINE_PRECISION


def crossover_section(ctx: Context, report: dict) -> dict:
    """Per d: dense and online Sinkhorn times; the crossover is the smallest timed d from
    which dense is never slower (twice the largest timed d when online always won)."""
    n, ds, n_iters = ctx.shapes.crossover
    precision = fastest_accurate(report)
    backend = "triton" if SMOKE else "auto"
    rows, times = [], {}
    for d in ds:
        problem = make_problem(n, n, d, device=ctx.device)
        row: dict = {"d": d}
        for path, flag in (("dense", "fp32"), ("online", precision)):
            call_s = 0.0 if SMOKE else 3.0 * bound("sinkhorn", (n, d, n_iters), path, flag, ctx.gpu)

            def solve(path=path, flag=flag, problem=problem):
                return sotalign.sinkhorn(
                    problem.x, problem.y, eps=EPS, n_iters=n_iters, backend=backend, path=path, precision=flag
                )

            timing, _ = measure(solve, ctx.device, ctx.budget, 0.0 if SMOKE else TRITON_WARMUP_S, call_s)
            row[path] = timing
            if "seconds" in timing:
                times[(d, path)] = timing["seconds"]
        rows.append(row)
    timed = sorted({d for d, path in times if (d, "dense") in times and (d, "online") in times})
    crossover = crossover_dim(times) if timed else None
    if timed and crossover is None:
        crossover = 2 * timed[-1]
    return {
        "n": n,
        "n_iters": n_iters,
        "online_precision": precision,
        "rows": rows,
        "timed_d": timed,
        "crossover_d": crossover,
    }


def tests_section(ctx: Context) -> dict:
    """The GPU test module in pytest, in a subprocess with a timeout; its wall time recorded."""
    env = dict(
        os.environ,
        SOTALIGN_TRITON_CONFIGS="first",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    if not SMOKE:
        env.pop("TRITON_INTERPRET", None)
    timeout = min(TEST_TIMEOUT_S, max(10.0, ctx.budget.left() - 60))
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", ctx.tests]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        tail = output.strip().splitlines()[-15:]
        status = "passed" if result.returncode == 0 else f"failed (pytest exit status {result.returncode})"
        if result.returncode == 5 and SMOKE and "skipped" in output:  # the module skips without CUDA
            status = "skipped"
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        tail, status = output.strip().splitlines()[-15:], f"failed (stopped after {timeout:.0f} s)"
    return {
        "file": ctx.tests,
        "status": status,
        "seconds": time.perf_counter() - start,
        "target_seconds": 90,
        "summary": tail,
    }


def environment(device: torch.device, sweep: bool) -> dict:
    import triton

    peers = {}
    for peer in PEERS.values():
        for module in peer.modules:
            if module not in peers:
                try:
                    peers[module] = getattr(__import__(module), "__version__", "imported")
                except Exception as error:
                    peers[module] = f"missing ({type(error).__name__})"
    backends = {name: backend_error(name) or "runs" for name in ("cpu", "triton")}
    backends["keops"] = (
        (backend_error("keops") or "runs")
        if sweep
        else ("not probed in the device check (its probe compiles for up to minutes)")
    )
    info = {
        **this_machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": str(device),
        "backends": backends,
        "peers": peers,
        "dispatch_json": dispatch.TUNING,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            sms=properties.multi_processor_count, memory_gib=round(properties.total_memory / 2**30, 1)
        )
    return info


def measured_dispatch(report: dict) -> dict:
    """dispatch.json with the crossover and the online precision this run measured."""
    tuning = dispatch.TUNING | {
        key: dict(dispatch.TUNING[key]) for key in ("dense_min_dim", "online_precision")
    }
    provenance = "smoke (CPU interpreter: times meaningless)" if SMOKE else "measured"
    where = f"{report['machine'].get('gpu_name', 'CPU')}, {report['date']}"
    source = f"benchmarks/results/{report['name']}.md"
    crossover = report.get("crossover")
    if crossover and crossover["crossover_d"] is not None:
        tuning["dense_min_dim"]["cuda"] = {
            "value": crossover["crossover_d"],
            "provenance": provenance,
            "source": source,
            "note": f"{where}: Sinkhorn n = m = {crossover['n']}, {crossover['n_iters']} iterations, d in "
            f"{crossover['timed_d']} timed, dense fp32 against online {crossover['online_precision']}; the "
            "smallest d from which dense is never slower (twice the largest d if online always won).",
        }
    cases = report.get("sinkhorn", {}).get("cases", [])
    times = {
        row["provider"]: row["seconds"] for row in (cases[0]["rows"] if cases else []) if "seconds" in row
    }
    accurate = {p: times.get(f"sotalign-online-{p}") for p in ACCURATE}
    if all(accurate.values()):
        tuning["online_precision"]["cuda"] = {
            "value": fastest_accurate(report),
            "provenance": provenance,
            "source": source,
            "note": f"{where}: the faster fp32-accurate flag at the first Sinkhorn case ("
            + ", ".join(f"{p} {t:.3g} s" for p, t in accurate.items())
            + " per solve).",
        }
    return tuning


@dataclass
class Context:
    """What every section of one run shares."""

    device: torch.device
    budget: Budget
    gpu: str
    shapes: Shapes
    tests: str


def write(report: dict, out: Path) -> Path:
    """The report's JSON and Markdown under out/benchmarks/results/ (atomic); returns the .md."""
    results = out / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"{report['name']}.json", report)
    markdown = results / f"{report['name']}.md"
    atomic_write(markdown, gpu_markdown(report).encode())
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--sweep", action="store_true", help="every shape and peer, not only the headlines")
    parser.add_argument(
        "--budget", type=float, default=3600.0 if SMOKE else 330.0, help="wall seconds of the whole run"
    )
    parser.add_argument("--out", type=Path, help="output folder, laid out like the repository")
    parser.add_argument(
        "--sections",
        default="tests,sinkhorn,crossover,klot,scale",
        help="comma-separated sections to run, in this order",
    )
    parser.add_argument("--tests", default=TESTS, help=argparse.SUPPRESS)  # the smoke test's failing case
    args = parser.parse_args(argv)
    started = time.monotonic()
    if not SMOKE and not torch.cuda.is_available():
        parser.exit(2, "benchmarks.gpu: torch sees no CUDA device (--smoke runs the CPU smoke mode)\n")
    unknown = set(args.sections.split(",")) - {"tests", "sinkhorn", "crossover", "klot", "scale"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="sotalign-gpu-smoke-")) if SMOKE else ROOT
    device = torch.device("cpu" if SMOKE else "cuda")
    shapes = {
        (False, False): CHECK,
        (False, True): SWEEP,
        (True, False): SMOKE_CHECK,
        (True, True): SMOKE_SWEEP,
    }[(SMOKE, args.sweep)]
    machine = environment(device, args.sweep)
    gpu, gpu_label = gpu_model(machine.get("gpu_name", ""))
    report = {
        "format": GPU_FORMAT,
        "name": f"{'smoke-' * SMOKE}{machine_slug(machine)}-gpu-{'sweep' if args.sweep else 'check'}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "smoke": SMOKE,
        "sweep": args.sweep,
        "budget_seconds": args.budget,
        "roofline_gpu": gpu_label,
        "machine": machine,
    }
    print(f"benchmarks.gpu: {report['name']}, budget {args.budget:.0f} s, output under {out}", flush=True)
    ctx = Context(device, Budget(args.budget), gpu, shapes, args.tests)
    for section in args.sections.split(","):
        print(f"== {section} ({ctx.budget.left():.0f} s left)", flush=True)
        if section == "tests":
            report["tests"] = tests_section(ctx)
        elif section == "crossover":
            report["crossover"] = crossover_section(ctx, report)
            tuning = out / "sotalign" / "ot" / "dispatch.json"
            tuning.parent.mkdir(parents=True, exist_ok=True)
            write_json(tuning, measured_dispatch(report))
            print(f"wrote {tuning}", flush=True)
        elif section == "scale":
            cases = [("sinkhorn", shapes.scale_sinkhorn)] + [("klot", case) for case in shapes.scale_klot]
            report["scale"] = {
                "cases": [
                    {
                        "section": kind,
                        **run_case(kind, case, scale_providers(kind, device), ctx, errors=False),
                    }
                    for kind, case in cases
                ]
            }
        else:
            cases = shapes.sinkhorn if section == "sinkhorn" else shapes.klot
            report[section] = {
                "cases": [
                    run_case(section, case, providers(section, device, args.sweep, case[0]), ctx)
                    for case in cases
                ]
            }
        report["seconds"] = time.monotonic() - started
        markdown = write(report, out)
    print(gpu_markdown(report))
    print(f"wrote {markdown} and its .json ({report['seconds']:.0f} s)")
    return 0 if report.get("tests", {}).get("status", "passed") in ("passed", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
