"""Report of the GPU harness: CSV, JSON, Markdown tables and a PNG from pytest-benchmark JSON.

    python benchmarks/gpu_report.py --out benchmarks/results/<gpu>-gpu-harness \\
        benchmarks/results/<gpu>-{sinkhorn,klot,scale}.json
    python benchmarks/gpu_report.py benchmarks/results/<machine>-iterations.json
    python benchmarks/gpu_report.py --machine      # the <gpu> (or CPU) name used in file names

GPU suites (``gpu-sinkhorn``, ``gpu-klot``, ``gpu-scale`` in ``extra_info["suite"]``) go to
``<out>.csv`` (one row per case), ``<out>.json`` (the rows, the targets, the machine),
``<out>.md`` and ``<out>.png``. For every case: the median, p10/p90 (from the raw rounds) and
IQR of the call time, the per-iteration time (Sinkhorn: call / n_iters), the roofline bound
of the provider's own path and dot precision (:mod:`roofline`, for the GPU the run was on;
an H100 SXM stands in for unknown devices), the % of that bound reached, the ratio to the
best bound of the shape (fp16-online or fp32-dense, docs/design.md's roofline), the peak memory
beyond the inputs, and speed-ups over the paper's dense algorithm and over FlashSinkhorn at
the same dot precision. The speed targets (targets.json) are checked in a table of their own.

An ``iterations`` JSON gives ``<json stem>.md``: the iteration-count table.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import roofline
from report import curves, local_machine, machine_slug, plot_lines, pyplot, save_figure

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SUITES = ("gpu-sinkhorn", "gpu-klot", "gpu-scale")
#: The GPU speed targets, kept as data in targets.json next to this file.
TARGETS = json.loads((Path(__file__).resolve().parent / "targets.json").read_text())
SINKHORN_HEADLINE = tuple(TARGETS["sinkhorn"]["headline"])
SINKHORN_MAX_X_BEST_BOUND = TARGETS["sinkhorn"]["max_x_best_bound"]
KLOT_HEADLINES = {tuple(t["shape"]): t["min_x_paper"] for t in TARGETS["klot"]["headlines"]}
KLOT_MAX_X_BOUND = TARGETS["klot"]["max_x_bound"]
ONLINE_MAX_EXTRA_MIB = TARGETS["online_max_extra_mib"]


# --------------------------------------------------------------------------- names


def gpu_slug(name: str) -> str:
    """``nvidia-h100-80gb-hbm3`` from ``torch.cuda.get_device_name()``."""
    return "-".join(re.findall(r"[a-z0-9]+", name.lower()))


def this_machine() -> str:
    """The GPU's slug when CUDA is present, else the CPU's (``cpu-amd-epyc-2core``)."""
    import torch

    if torch.cuda.is_available():
        return gpu_slug(torch.cuda.get_device_name())
    return machine_slug(local_machine())


# --------------------------------------------------------------------------- rows


def fmt_time(seconds: float) -> str:
    """Three significant digits in s, ms or µs."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            value = seconds / scale
            return f"{value:.{max(0, 2 - int(math.floor(math.log10(max(value, 1e-12)))))}f} {unit}"
    raise AssertionError("unreachable")


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of the raw round times."""
    values = sorted(values)
    position = q * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def route_path(info: dict) -> str:
    """The path the case ran: sotalign's reported route for ``auto``, else the provider's."""
    path = info.get("roofline_path", info.get("path", "online"))
    if path == "auto":
        path = info.get("path", "online")
    return path if path in roofline.PATHS else "online"


def bounds(info: dict) -> tuple[float, float, str]:
    """(bound of this case's path and precision, best bound of the shape, GPU of the model)."""
    key = roofline.gpu_key(info.get("gpu_name", "")) or "h100-sxm"
    label = key if info.get("gpu_name") and roofline.gpu_key(info["gpu_name"]) else f"{key} (stand-in)"
    n, m, d, iters = info["n"], info["m"], info["d"], info["n_iters"]
    path, precision = route_path(info), info.get("precision", "fp32")
    if info["suite"] == "gpu-sinkhorn":
        own = iters * roofline.sinkhorn_iteration_bound(n, m, d, path, key, precision)
        if path == "dense":  # the K build, once per call
            spec = roofline.GPUS[key]
            own += max(2 * n * m * d / spec.flops(precision), n * m * 4 / spec.hbm_bytes)
        best = iters * roofline.best_iteration_bound(n, m, d, key)
    else:
        d_t = info["d_teacher"]
        own = roofline.klot_step_bound(n, m, d, d_t, path, key, precision, iters)
        best = min(
            roofline.klot_step_bound(n, m, d, d_t, "online", key, "fp16", iters),
            roofline.klot_step_bound(n, m, d, d_t, "dense", key, "fp32", iters),
        )
    return own, best, label


def load_skipped(paths: list[Path]) -> list[dict]:
    """The skipped cases and their reasons that conftest.py writes into the JSON."""
    return [
        {**case, "source": path.name}
        for path in paths
        for case in json.loads(path.read_text()).get("skipped", [])
    ]


def load_rows(paths: list[Path]) -> tuple[dict, list[dict], list[dict]]:
    """(machine info, GPU-suite rows, iterations rows) from pytest-benchmark JSON files."""
    machine, gpu_rows, iteration_rows = {}, [], []
    for path in paths:
        data = json.loads(path.read_text())
        machine = {
            **(data.get("machine_info", {}).get("sotalign") or local_machine()),
            "datetime": data.get("datetime", ""),
            **machine,
        }
        for bench in data.get("benchmarks", []):
            info, stats = bench.get("extra_info", {}), bench.get("stats")
            if not stats or info.get("suite") not in (*GPU_SUITES, "iterations"):
                continue
            row = {
                **info,
                "source": path.name,
                "median_s": stats["median"],
                "min_s": stats["min"],
                "q1_s": stats["q1"],
                "q3_s": stats["q3"],
                "iqr_s": stats["iqr"],
                "rounds": stats["rounds"],
            }
            data_points = stats.get("data") or [stats["median"]]
            row["p10_s"], row["p90_s"] = quantile(data_points, 0.1), quantile(data_points, 0.9)
            if info["suite"] == "iterations":
                iteration_rows.append(row)
                continue
            row["path"] = route_path(info)
            own, best, label = bounds(info)
            row.update(
                bound_s=own,
                best_bound_s=best,
                bound_gpu=label,
                pct_of_bound=100 * own / row["median_s"],
                x_best_bound=row["median_s"] / best,
            )
            if info["suite"] == "gpu-sinkhorn":
                row["per_iter_ms"] = 1e3 * row["median_s"] / info["n_iters"]
            gpu_rows.append(row)
    add_speedups(gpu_rows)
    return machine, gpu_rows, iteration_rows


def shape_key(row: dict) -> tuple:
    return row["suite"], row["n"], row["d"], row.get("d_teacher", 0), row["n_iters"]


def add_speedups(rows: list[dict]) -> None:
    """× vs the paper's dense algorithm, and vs FlashSinkhorn at the same dot precision."""
    by_shape = defaultdict(dict)
    for row in rows:
        by_shape[shape_key(row)][row["provider"]] = row
    for shape_rows in by_shape.values():
        paper = shape_rows.get("paper-dense")
        flash = {r["precision"]: r for name, r in shape_rows.items() if name.startswith("flashsinkhorn")}
        for row in shape_rows.values():
            if paper:
                row["x_vs_paper"] = paper["median_s"] / row["median_s"]
            if row["precision"] in flash:
                row["x_vs_flash"] = flash[row["precision"]]["median_s"] / row["median_s"]


# --------------------------------------------------------------------------- targets


def find(rows, suite, shape, provider):
    for row in rows:
        if (
            row["suite"] == suite
            and (row["n"], row["d"], row.get("d_teacher")) == shape
            and row["provider"] == provider
        ):
            return row
    return None


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")


def goal(target: str, measured: str | None, met: bool | None) -> dict:
    return {"target": target, "measured": measured or "–", "met": met}


def targets(rows: list[dict]) -> list[dict]:
    """The speed targets, each with the measured figure and whether it was met (None: not run)."""
    out = []
    n, d = SINKHORN_HEADLINE
    where = f"Sinkhorn n={n}, d={d}"
    ours = [
        r
        for r in rows
        if r["suite"] == "gpu-sinkhorn"
        and (r["n"], r["d"]) == (n, d)
        and r["provider"].startswith("sotalign-triton")
    ]
    best = min(ours, key=lambda r: r["median_s"], default=None)
    measured = best and (
        f"{best['provider']}: {best['per_iter_ms']:.3f} ms/iter = "
        f"{best['x_best_bound']:.2f}× "
        f"{1e3 * best['best_bound_s'] / best['n_iters']:.3f} ms"
    )
    out.append(
        goal(
            f"{where}: fastest sotalign-triton ≤ {SINKHORN_MAX_X_BEST_BOUND}× the best "
            "roofline bound per iteration",
            measured,
            best and best["x_best_bound"] <= SINKHORN_MAX_X_BEST_BOUND,
        )
    )
    for precision in ("fp32", "tf32"):
        mine = [r for r in ours if r["precision"] == precision and "x_vs_flash" in r]
        top = min(mine, key=lambda r: r["median_s"], default=None)
        out.append(
            goal(
                f"{where}: sotalign-triton faster than FlashSinkhorn ({precision} dots)",
                top and f"{top['provider']}: {top['x_vs_flash']:.2f}× FlashSinkhorn",
                top and top["x_vs_flash"] > 1,
            )
        )
    for shape, minimum in KLOT_HEADLINES.items():
        auto = find(rows, "gpu-klot", shape, "sotalign-auto")
        label = f"KLOT n=m={shape[0]}, d={shape[1]}, d*={shape[2]}"
        paper = auto and auto.get("x_vs_paper")
        out.append(
            goal(
                f"{label}: sotalign-auto ≥ {minimum:g}× the paper's dense step",
                paper and f"{paper:.2f}×",
                paper and paper >= minimum,
            )
        )
        ratio = auto and auto["median_s"] / auto["bound_s"]
        out.append(
            goal(
                f"{label}: sotalign-auto ≤ {KLOT_MAX_X_BOUND}× the bound of its path",
                auto and f"{auto['path']} {auto['precision']}: {ratio:.2f}× {fmt_time(auto['bound_s'])}",
                auto and ratio <= KLOT_MAX_X_BOUND,
            )
        )
    online = [
        r
        for r in rows
        if r["suite"] in ("gpu-klot", "gpu-scale")
        and r["path"] == "online"
        and r["provider"].startswith("sotalign")
        and r.get("peak_mem_delta_mib") is not None
        and "cuda" in r.get("memory_kind", "")
    ]
    worst = max(online, key=lambda r: r["peak_mem_delta_mib"], default=None)
    out.append(
        goal(
            f"KLOT online paths: peak ≤ {ONLINE_MAX_EXTRA_MIB} MiB beyond the inputs",
            worst
            and (
                f"worst {worst['peak_mem_delta_mib']:.0f} MiB ({worst['provider']}, "
                f"n={worst['n']}, d={worst['d']}; inputs {worst['input_mib']:.0f} MiB)"
            ),
            worst and worst["peak_mem_delta_mib"] <= ONLINE_MAX_EXTRA_MIB,
        )
    )
    return out


# --------------------------------------------------------------------------- markdown


def fmt_x(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def case_table(rows: list[dict]) -> list[str]:
    lines = []
    by_shape = defaultdict(list)
    for row in rows:
        by_shape[shape_key(row)].append(row)
    for (suite, n, d, d_t, iters), shape_rows in sorted(by_shape.items()):
        teacher = f", d*={d_t}" if d_t else ""
        lines += [
            f"### {suite}: n=m={n}, d={d}{teacher}, {iters} iterations per solve",
            "",
            "| provider | backend / path | dot | median | p10–p90 | IQR | per iter | bound "
            "| % of bound | × best bound | peak mem Δ | × vs paper | × vs Flash |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(shape_rows, key=lambda r: r["median_s"]):
            per_iter = f"{r['per_iter_ms']:.3f} ms" if "per_iter_ms" in r else "–"
            memory = r.get("peak_mem_delta_mib")
            lines.append(
                f"| {r['provider']} | {r.get('backend', '?')} / {r['path']} | {r['precision']} | "
                f"{fmt_time(r['median_s'])} | {fmt_time(r['p10_s'])}–{fmt_time(r['p90_s'])} | "
                f"{fmt_time(r['iqr_s'])} | {per_iter} | {fmt_time(r['bound_s'])} | "
                f"{r['pct_of_bound']:.0f} % | {r['x_best_bound']:.2f} | "
                f"{'–' if memory is None else f'{memory:.0f} MiB'} | {fmt_x(r.get('x_vs_paper'))} | "
                f"{fmt_x(r.get('x_vs_flash'))} |"
            )
        lines.append("")
    return lines


def markdown(
    machine: dict,
    rows: list[dict],
    goals: list[dict],
    skipped: list[dict],
    sources: list[str],
    png: str | None,
) -> str:
    smoke = machine.get("smoke")
    device = machine.get("gpu_name") or f"{machine.get('cpu_model', '?')} (CPU)"
    title = (
        "SMOKE RUN of the GPU benchmark harness on CPU — the times mean nothing"
        if smoke
        else f"sotalign GPU benchmarks — {device}"
    )
    bound_gpus = sorted({r["bound_gpu"] for r in rows})
    lines = [f"# {title}", ""]
    if smoke:
        lines += [
            "> Tiny shapes, Triton kernels in its CPU interpreter, CUDA-only peers skipped. "
            "This file only shows that the harness runs end to end and what it reports; "
            "no number in it is a measurement of anything.",
            "",
        ]
    if png:
        lines += [f"![timings]({png})", ""]
    lines += [
        f"Device: {device}; torch {machine.get('torch', '?')}, triton "
        f"{machine.get('triton', '?')}, CUDA {machine.get('cuda', '–')}. Sources: "
        + ", ".join(f"`{s}`" for s in sources)
        + f" ({machine.get('datetime', '')}).",
        "",
        "fp32 features in, ε = 0.05 (student) / 0.01 (teacher). Times: median over the timed "
        "rounds after an untimed first call (compilation, autotuning); p10–p90 and IQR of the "
        "rounds. *bound*: roofline.py's lower bound of the call on the case's own path and "
        "dot precision (fp32 = CUDA-core FMA, tf32/fp16 = tensor cores; dense = a stored fp32 "
        "K read twice per iteration at HBM bandwidth), for "
        + ", ".join(bound_gpus)
        + "; *% of bound* = bound / median; *× best bound* = median / "
        "the shape's best bound (min of fp16-online and fp32-dense: docs/design.md's 0.56 ms per "
        "iteration at n = 16384, d = 512). *per iter* = call / iterations, including the "
        "call's fixed work. *peak mem Δ*: CUDA max_memory_allocated over the timed rounds "
        "minus what was allocated before (the inputs); the peak RSS increase on CPU. "
        "× vs Flash compares at the same dot precision. GeomLoss anneals ε (not the same fixed-ε problem).",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {g['target']} | {g['measured']} | {verdict(g['met'])} |" for g in goals]
    lines += ["", "## All cases", "", *case_table(rows)]
    if skipped:
        lines += ["## Skipped cases", "", "| case | reason |", "|---|---|"]
        lines += [f"| `{case['name']}` | {case['reason']} |" for case in skipped]
        lines.append("")
    return "\n".join(lines)


def iteration_count(row: dict, key: str) -> str:
    """An iteration count of the table, marked when the solve hit the iteration cap."""
    reached = row[key] < row["max_iters"]
    return f"{row[key]}" if reached else f"≥ {row[key]} (not reached)"


def iterations_markdown(machine: dict, rows: list[dict], source: str) -> str:
    r0 = rows[0]
    lines = [
        f"# Sinkhorn iterations a KLOT step needs — {machine.get('cpu_model', '?')}, "
        f"backend {r0['backend']} ({r0['path']})",
        "",
        f"Source: `{source}` ({machine.get('datetime', '')}). Features: n = m unpaired rows "
        f"from 32 clusters in a rank-16 latent space, mapped to d = {r0['d']} (student) and "
        f"d* = {r0['d_teacher']} (teacher) plus noise (bench_iterations.py). Teacher "
        f"ε* = {r0['eps_teacher']}. Tolerance {r0['tol']:g} on the L1 marginal error, checked "
        f"every iteration, at most {r0['max_iters']} iterations; ε-scaling iterations count. "
        f"The baseline is the default step of {r0['fixed_iters']} fixed iterations per solve. "
        "Iteration counts do not depend on the device.",
        "",
        "| n = m | student ε | ε-scaling | student iters | teacher iters | KLOT step iters "
        "| marginal error after 100 fixed (student / teacher) | KLOT value change | "
        "gradient change | step time (tol; median of 5) |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["n"], -r["eps"], r["eps_scaling"] or 0)):
        count = functools.partial(iteration_count, r)
        scaling = "off" if r["eps_scaling"] is None else f"×{r['eps_scaling']}"
        lines.append(
            f"| {r['n']} | {r['eps']} | {scaling} | {count('student_iters')} | "
            f"{count('teacher_iters')} | {r['total_iters']} | {r['fixed_error']:.1e} / "
            f"{r['fixed_error_teacher']:.1e} | {r['value_change']:.1e} | "
            f"{r['grad_change']:.1e} | {fmt_time(r['median_s'])} |"
        )
    lines += [
        "",
        "*KLOT value change* = |KLOT(tol) − KLOT(100 fixed)| / |KLOT(tol)|; *gradient "
        "change* = ‖∇(tol) − ∇(100 fixed)‖ / ‖∇(tol)‖ over both feature gradients.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plotted_seconds(row: dict, per_iteration: bool) -> float:
    """The plotted time of a case: per Sinkhorn iteration, or per KLOT step."""
    return row["per_iter_ms"] / 1e3 if per_iteration else row["median_s"]


def plot(rows: list[dict], title: str, path: Path) -> None:
    plt = pyplot()

    order = {"gpu-sinkhorn": 0, "gpu-klot": 1}
    panels = sorted(
        {(r["suite"], r["d"], r.get("d_teacher", 0)) for r in rows if r["suite"] in order},
        key=lambda panel: (order[panel[0]], *panel[1:]),
    )
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (suite, d, d_t) in zip(axes[0], panels, strict=True):
        panel = [r for r in rows if (r["suite"], r["d"], r.get("d_teacher", 0)) == (suite, d, d_t)]
        sinkhorn = suite == "gpu-sinkhorn"
        value = functools.partial(plotted_seconds, per_iteration=sinkhorn)

        best = sorted({(r["n"], r["best_bound_s"] / (r["n_iters"] if sinkhorn else 1)) for r in panel})
        ax.plot(*zip(*best, strict=True), color="black", linestyle=":", label="best roofline bound")
        plot_lines(
            ax,
            curves(panel, "provider", "n", value),
            lambda provider: not provider.startswith("sotalign"),
            xlabel="n = m",
            ylabel="seconds per iteration" if sinkhorn else "seconds per step",
            title=f"{'Sinkhorn' if sinkhorn else 'KLOT step'} d={d}" + (f", d*={d_t}" if d_t else ""),
            legend_size=6,
        )
    save_figure(plt, fig, title, path, title_size=9, dpi=110)


# --------------------------------------------------------------------------- main

CSV_FIELDS = [
    "suite",
    "provider",
    "backend",
    "path",
    "precision",
    "n",
    "m",
    "d",
    "d_teacher",
    "n_iters",
    "median_s",
    "p10_s",
    "p90_s",
    "q1_s",
    "q3_s",
    "iqr_s",
    "min_s",
    "rounds",
    "per_iter_ms",
    "bound_s",
    "pct_of_bound",
    "best_bound_s",
    "x_best_bound",
    "bound_gpu",
    "peak_mem_delta_mib",
    "memory_kind",
    "input_mib",
    "x_vs_paper",
    "x_vs_flash",
    "first_call_seconds",
    "gpu_name",
    "torch",
    "triton",
    "cuda",
    "note",
    "source",
]


def write_gpu_report(paths: list[Path], out: Path) -> list[Path]:
    machine, rows, _ = load_rows(paths)
    if not rows:
        return []
    skipped = load_skipped(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    goals = targets(rows)
    csv_path, json_path, md_path, png_path = (
        out.parent / f"{out.name}.{ext}" for ext in ("csv", "json", "md", "png")
    )
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(
        json.dumps(
            {
                "machine": machine,
                "sources": [p.name for p in paths],
                "targets": goals,
                "rows": rows,
                "skipped": skipped,
            },
            indent=1,
            default=str,
        )
    )
    title = (
        "SMOKE RUN on CPU (times mean nothing)"
        if machine.get("smoke")
        else f"sotalign GPU harness — {machine.get('gpu_name', '?')}"
    )
    plot(rows, title, png_path)
    written = [csv_path, json_path]
    if png_path.exists():
        written.append(png_path)
    md_path.write_text(
        markdown(
            machine,
            rows,
            goals,
            skipped,
            [p.name for p in paths],
            png_path.name if png_path.exists() else None,
        )
    )
    for goal in goals:
        print(f"{verdict(goal['met']).strip('*'):>12}  {goal['target']}: {goal['measured']}")
    return written + [md_path]


def write_iterations_report(path: Path) -> list[Path]:
    machine, _, rows = load_rows([path])
    if not rows:
        return []
    md_path = path.with_suffix(".md")
    md_path.write_text(iterations_markdown(machine, rows, path.name))
    return [md_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument(
        "--out", type=Path, help="stem of the GPU report files (default: results/<machine>-gpu-harness)"
    )
    parser.add_argument(
        "--machine", action="store_true", help="print this machine's name for result files and exit"
    )
    args = parser.parse_args()
    if args.machine:
        print(this_machine())
        return
    iteration_files = [p for p in args.json if load_rows([p])[2]]
    gpu_files = [p for p in args.json if p not in iteration_files]
    written = []
    for path in iteration_files:
        written += write_iterations_report(path)
    if gpu_files:
        out = args.out or RESULTS / f"{this_machine()}-gpu-harness"
        written += write_gpu_report(gpu_files, out)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
