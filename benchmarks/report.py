"""The report writer of the benchmarks: Markdown tables and plots of the CPU suites, and the
Markdown of a GPU run (:mod:`benchmarks.gpu`).

    python -m benchmarks.report benchmarks/results/cpu-amd-epyc-2core-sinkhorn.json
    python -m benchmarks.report benchmarks/results/<gpu>-gpu-check.json   # rewrites its .md

For each suite found in the JSON (``extra_info["suite"]``: sinkhorn, klot, crossover) writes
``<machine>-<suite>.md`` and ``<machine>-<suite>.png`` into ``--out`` (default: the folder
of this script's ``results/``), where ``<machine>`` is e.g. ``cpu-amd-epyc-2core`` (CPU model
and core count recorded by the suite's conftest, else read from this machine).

* sinkhorn / klot: per shape, the median time of every provider, its speed-up over the
  paper's dense algorithm and over POT (where timed), memory and the backend/path used;
  the plot is median time against n (log-log), one line per provider, one panel per d.
* crossover: dense vs online time per d and the crossover d; the plot is time against d.
* iterations (bench_iterations.py): the table of iteration counts, no plot.

A GPU run's JSON (``"format": GPU_FORMAT``) gives ``<name>.md`` next to it
(:func:`gpu_markdown`: a table per case with roofline bounds, and the targets of
``targets.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from . import roofline
from .machine import local_machine, machine_slug

RESULTS = Path(__file__).resolve().parent / "results"
#: The "format" of the JSON report of benchmarks.gpu.
GPU_FORMAT = "sotalign benchmarks.gpu report"
#: The GPU targets, kept as data next to this file.
TARGETS = json.loads((Path(__file__).resolve().parent / "targets.json").read_text())
BASELINES = {"paper-dense": "paper", "pot-sinkhorn_log": "POT"}
#: The CPU suites this report handles.
SUITES = ("sinkhorn", "klot", "crossover", "iterations", "ot")
HEADLINE = {"sinkhorn": (4096, 64), "klot": (2048, 256)}


# --------------------------------------------------------------------------- loading


def load(path: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(machine, {suite: [row, ...]}) with one flat row per benchmark."""
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {}).get("sotalign") or local_machine()
    machine = {**machine, "datetime": data.get("datetime", "")}
    suites: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("suite") not in SUITES or not bench.get("stats"):
            continue
        stats = bench["stats"]
        suites[info["suite"]].append(
            {
                **info,
                "median": stats["median"],
                "min": stats["min"],
                "rounds": stats["rounds"],
                "name": bench["name"],
                "group": bench.get("group"),
            }
        )
    return machine, suites


# --------------------------------------------------------------------------- tables


def fmt_time(seconds: float) -> str:
    """Three significant digits in s, ms or µs."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            value = seconds / scale
            return f"{value:.{max(0, 2 - int(math.floor(math.log10(max(value, 1e-12)))))}f} {unit}"
    raise AssertionError("unreachable")


def shape_key(row: dict) -> tuple:
    return (row["n"], row["d"], row.get("d_teacher", 0))


def shape_label(key: tuple) -> str:
    n, d, d_teacher = key
    return f"n=m={n}, d={d}" + (f", teacher {d_teacher}" if d_teacher else "")


def speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{provider: {baseline name: baseline median / provider median}} within one shape."""
    base = {BASELINES[r["provider"]]: r["median"] for r in rows if r["provider"] in BASELINES}
    return {r["provider"]: {name: t / r["median"] for name, t in base.items()} for r in rows}


def present_baselines(rows: list[dict]) -> list[str]:
    """The baselines (paper, POT) timed in this suite."""
    return [name for provider, name in BASELINES.items() if any(r["provider"] == provider for r in rows)]


def provider_table(suite: str, rows: list[dict]) -> list[str]:
    """One section per shape: a row per provider, fastest first."""
    by_shape = defaultdict(list)
    for row in rows:
        by_shape[shape_key(row)].append(row)
    baselines = present_baselines(rows)
    lines = []
    for key in sorted(by_shape):
        shape_rows = sorted(by_shape[key], key=lambda r: r["median"])
        ratio = speedups(shape_rows)
        lines += [
            f"### {suite}: {shape_label(key)}",
            "",
            "| provider | backend / path | median | min | rounds | peak RSS Δ | "
            + " | ".join(f"× vs {b}" for b in baselines)
            + " |",
            "|---|---|---:|---:|---:|---:|" + "---:|" * len(baselines),
        ]
        for r in shape_rows:
            route = f"{r.get('backend', '?')} / {r.get('path', '?')}"
            memory = r.get("peak_rss_delta_mib")
            memory = f"{memory:.0f} MiB" if memory is not None else "–"
            cells = [
                f"{ratio[r['provider']][b]:.2f}" if b in ratio[r["provider"]] else "–" for b in baselines
            ]
            lines.append(
                f"| {r['provider']} | {route} | {fmt_time(r['median'])} | "
                f"{fmt_time(r['min'])} | {r['rounds']} | {memory} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return lines


def headline(suite: str, rows: list[dict]) -> list[str]:
    """sotalign-auto against the baselines at every shape, the headline shape in bold."""
    by_shape = defaultdict(list)
    for row in rows:
        by_shape[shape_key(row)].append(row)
    baselines = present_baselines(rows)
    lines = [
        "| shape | sotalign-auto | " + " | ".join(f"× vs {b}" for b in baselines) + " |",
        "|---|---:|" + "---:|" * len(baselines),
    ]
    for key in sorted(by_shape):
        ratio = speedups(by_shape[key]).get("sotalign-auto")
        auto = [r for r in by_shape[key] if r["provider"] == "sotalign-auto"]
        if not auto:
            continue
        label = shape_label(key)
        if key[:2] == HEADLINE.get(suite):
            label = f"**{label}**"
        cells = [f"{ratio[b]:.2f}" if b in ratio else "–" for b in baselines]
        lines.append(f"| {label} | {fmt_time(auto[0]['median'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def crossover_dim(times: dict[tuple[int, str], float]) -> int | None:
    """Smallest d from which the dense path is at least as fast as online for every larger d
    (``times[(d, path)]``: seconds; the d timed on one path only are left out)."""
    dims = sorted(d for d, path in times if path == "dense" and (d, "online") in times)
    answer = None
    for d in reversed(dims):
        if times[(d, "dense")] > times[(d, "online")]:
            break
        answer = d
    return answer


def crossover_table(times: dict[tuple[int, str], float]) -> list[str]:
    """Dense against online per d (``times[(d, path)]``: seconds), and the crossover."""
    lines = [
        "| d | dense (K once + reads) | online (K recomputed) | online / dense | faster |",
        "|---:|---:|---:|---:|---|",
    ]
    for d in sorted({d for d, _ in times}):
        dense, online = times.get((d, "dense")), times.get((d, "online"))
        cells = [fmt_time(t) if t else "–" for t in (dense, online)]
        ratio, faster = (
            (f"{online / dense:.2f}", "dense" if dense <= online else "online")
            if dense and online
            else ("–", "–")
        )
        lines.append(f"| {d} | {cells[0]} | {cells[1]} | {ratio} | {faster} |")
    return lines + [
        "",
        f"**Crossover d = {crossover_dim(times)}** (dense is never slower from this d on).",
        "",
    ]


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
            f"{r['grad_change']:.1e} | {fmt_time(r['median'])} |"
        )
    lines += [
        "",
        "*KLOT value change* = |KLOT(tol) − KLOT(100 fixed)| / |KLOT(tol)|; *gradient "
        "change* = ‖∇(tol) − ∇(100 fixed)‖ / ‖∇(tol)‖ over both feature gradients.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the OT suite


#: The provider of bench_ot.py's divergence memory row.
MEMORY_PROVIDER = "sotalign-divergence-online"


def ot_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """The timed rows of bench_ot.py by group, in the order the suite runs them."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        memory = row["provider"] == MEMORY_PROVIDER
        groups.setdefault("ot memory" if memory else row["group"], []).append(row)
    return groups


def ot_table(rows: list[dict]) -> list[str]:
    """One row per provider and setting, fastest first."""
    lines = [
        "| provider | iterations / GeomLoss steps | median | rounds | OT_ε rel. error |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["median"]):
        lines.append(
            f"| {r['provider']} | {r['setting']} | {fmt_time(r['median'])} | {r['rounds']} | "
            f"{r['value_error']:.1e} |"
        )
    return lines + [""]


def _fastest(rows: list[dict], provider: str, max_error: float = math.inf) -> dict | None:
    eligible = [r for r in rows if r["provider"] == provider and r["value_error"] <= max_error]
    return min(eligible, key=lambda r: r["median"], default=None)


def equal_accuracy(
    rows: list[dict], peer: str, ours: str = "sotalign-auto"
) -> list[tuple[dict, dict | None]]:
    """For each row of ``peer``: the fastest row of ``ours`` that is at least as accurate
    (None when no row of ours is)."""
    return [(r, _fastest(rows, ours, r["value_error"])) for r in rows if r["provider"] == peer]


def ot_goals(groups: dict[str, list[dict]]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met or None when not measured) of the OT comparison."""
    goals = []
    fixed = next((rows for name, rows in groups.items() if name.startswith("ot fixed")), [])
    # the fixed iteration count is the largest one sotalign ran (the others serve equal accuracy)
    n_iters = max((r["setting"] for r in fixed if r["provider"] == "sotalign-auto"), default=0)
    at_fixed_count = [r for r in fixed if r["provider"] != "sotalign-auto" or r["setting"] == n_iters]
    auto = _fastest(at_fixed_count, "sotalign-auto")
    where = fixed[0]["group"].removeprefix("ot fixed ") if fixed else "?"
    for pot in ("pot-sinkhorn_log-numpy-sqeuclidean", "pot-sinkhorn_log-sqeuclidean"):
        peer = _fastest(at_fixed_count, pot)
        ratio = peer["median"] / auto["median"] if peer and auto else None
        goals.append(
            (
                f"CPU Sinkhorn {where}, {n_iters} iterations: sotalign-auto ≥ 5× {pot}",
                "–" if ratio is None else f"{ratio:.2f}×",
                None if ratio is None else ratio >= 5,
            )
        )
    for geomloss in ("geomloss-keops-sqeuclidean", "geomloss-tensorized-sqeuclidean"):
        label = f"CPU Sinkhorn {where}: sotalign-auto faster than {geomloss} at equal accuracy"
        pairs = equal_accuracy(fixed, geomloss)
        if not pairs:
            goals.append((label, "–", None))
            continue
        # at each accuracy GeomLoss reached: its time over the time sotalign needs to match it
        ratios = [
            f"{peer['setting']} steps ({peer['value_error']:.0e}): "
            + ("no sotalign row as accurate" if ours is None else f"{peer['median'] / ours['median']:.1f}×")
            for peer, ours in pairs
        ]
        met = all(ours is not None and peer["median"] > ours["median"] for peer, ours in pairs)
        goals.append((label, "; ".join(ratios), met))
    for name, rows in groups.items():
        if not name.startswith("ot batch"):
            continue
        batched, loop, pot = (
            _fastest(rows, p) for p in ("sotalign-batched", "sotalign-loop", "pot-solve_batch-sqeuclidean")
        )
        where = name.removeprefix("ot batch ")
        small = rows[0]["shape"][1] <= 64
        minimum = 20 if small else 1
        for peer, label, needed in ((loop, "a loop of single solves", minimum), (pot, "POT solve_batch", 1)):
            ratio = peer["median"] / batched["median"] if peer and batched else None
            relation = f"≥ {needed}×" if needed > 1 else ("no slower than" if peer is loop else "faster than")
            goals.append(
                (
                    f"batched {where}: one batched solve {relation} {label}",
                    "–" if ratio is None else f"{ratio:.2f}×",
                    None if ratio is None else (ratio >= needed if peer is loop else ratio > 1),
                )
            )
    for r in groups.get("ot memory", []):
        mib = r["peak_extra_bytes"] / 2**20
        goals.append(
            (
                f"divergence n = m = {r['n']}, d = {r['d']}, online, forward + backward: < 1 GiB extra",
                f"{mib:.0f} MiB ({r['n_iters']} iterations, {r['seconds']:.0f} s)",
                mib < 1024,
            )
        )
    goals.append(("GPU: FlashSinkhorn ≥ 1.5× at fp32 accuracy", "no GPU on this machine", None))
    return goals


def ot_markdown(machine: dict, rows: list[dict], source: str, plot_name: str) -> str:
    """The report of bench_ot.py: the goals, then one table per group."""
    groups = ot_groups(rows)
    loads = [r["load_avg_1min"] for r in rows if "load_avg_1min" in r]
    verdict = {None: "not measured", True: "**met**", False: "**missed**"}
    lines = [
        f"# sotalign against the OT libraries — {machine.get('cpu_model', '?')}, "
        f"{machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}",
        "",
        f"Source: `{source}` ({machine.get('datetime', '')}); 1-minute load average during the "
        f"run {min(loads, default=0):.1f}–{max(loads, default=0):.1f}. Squared-Euclidean cost "
        "(POT's C = ‖x − y‖²), ε = 0.25, uniform weights (bench_ot.py). Times are medians over "
        "the timed rounds after one warm-up call; *OT_ε rel. error* is against a converged fp64 "
        "solve. Ratios are peer median / sotalign median (> 1: sotalign is faster), from one run.",
        "",
        "## Goals",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        *(f"| {goal} | {measured} | {verdict[met]} |" for goal, measured, met in ot_goals(groups)),
        "",
        f"![OT_ε error against time]({plot_name})",
        "",
    ]
    for name, group in groups.items():
        if name == "ot memory":
            continue
        lines += [f"## {name.removeprefix('ot ')}", "", *ot_table(group)]
    return "\n".join(lines)


def plot_error_time(rows: list[dict], path: Path) -> None:
    """OT_ε error against median time, one line per provider, on the error-time problem."""
    plt = pyplot()
    group = [r for r in rows if (r["group"] or "").startswith("ot error-time")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider, points in sorted(curves(group, "provider", "median", lambda r: r["value_error"]).items()):
        times, errors = zip(*sorted(points), strict=True)
        ax.plot(times, errors, marker="o", label=provider, linestyle="-" if "sotalign" in provider else "--")
    ax.set(xscale="log", yscale="log", xlabel="median time (s)", ylabel="relative error of OT_ε")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    title = group[0]["group"].removeprefix("ot ") if group else "no error-time rows"
    save_figure(plt, fig, f"OT_ε error against time, {title}, ε = 0.25", path)


# --------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    ax,
    curves: dict[str, list[tuple[float, float]]],
    dashed,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    legend_size: int = 7,
) -> None:
    """One marked line per label on log–log axes (x in powers of two); ``dashed(label)``
    marks the peers."""
    for label, points in sorted(curves.items()):
        ax.plot(
            *zip(*sorted(points), strict=True),
            marker="o",
            label=label,
            linestyle="--" if dashed(label) else "-",
        )
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(plt, fig, title: str, path: Path, *, title_size: int = 10, dpi: int = 120) -> None:
    fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def curves(rows: list[dict], key: str, x: str, y) -> dict[str, list[tuple[float, float]]]:
    """{row[key]: [(row[x], y(row)), ...]}: the points of each line."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        out.setdefault(r[key], []).append((r[x], y(r)))
    return out


def plot(suite: str, rows: list[dict], title: str, path: Path) -> None:
    plt = pyplot()

    if suite == "crossover":
        fig, ax = plt.subplots(figsize=(6, 4))
        paths = curves(rows, "path", "d", lambda r: r["median"])
        plot_lines(
            ax,
            {f"cpu {path}": points for path, points in paths.items()},
            lambda label: False,
            xlabel="feature dimension d",
            ylabel="median time (s)",
            legend_size=10,
        )
    else:
        panels = sorted({(r["d"], r.get("d_teacher", 0)) for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (d, d_teacher) in zip(axes[0], panels, strict=True):
            panel = [r for r in rows if r["d"] == d and r.get("d_teacher", 0) == d_teacher]
            plot_lines(
                ax,
                curves(panel, "provider", "n", lambda r: r["median"]),
                lambda provider: provider in BASELINES,
                xlabel="n = m",
                ylabel="median time (s)",
                title=f"d={d}" + (f", teacher {d_teacher}" if d_teacher else ""),
            )
    save_figure(plt, fig, title, path)


# --------------------------------------------------------------------------- main


def report(json_path: Path, out: Path) -> list[Path]:
    machine, suites = load(json_path)
    slug = machine_slug(machine)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suite, rows in suites.items():
        if suite == "iterations":  # a table only
            md = out / f"{slug}-{suite}.md"
            md.write_text(iterations_markdown(machine, rows, json_path.name))
            written.append(md)
            continue
        if suite == "ot":
            md, png = out / f"{slug}-ot.md", out / f"{slug}-ot.png"
            md.write_text(ot_markdown(machine, rows, json_path.name, png.name))
            plot_error_time(rows, png)
            written += [md, png]
            continue
        threads = rows[0].get("threads")
        title = (
            f"sotalign {suite} benchmark — {machine['cpu_model']}, {machine['cores']} cores "
            f"(torch threads {threads}), torch {machine.get('torch', '?')}"
        )
        lines = [
            f"# {title}",
            "",
            f"Source: `{json_path.name}` ({machine.get('datetime', '')}); "
            f"allocator: {machine.get('malloc', '?')}. "
            "Times are medians over the timed rounds (one warm-up round first, which also "
            "measures the peak RSS increase). ×: the baseline's median / this median "
            "(> 1 is faster).",
            "",
        ]
        if suite == "crossover":
            times = {(r["d"], r["path"]): r["median"] for r in rows}
            lines += [
                f"One {rows[0]['n_iters']}-iteration Sinkhorn solve at n = m = {rows[0]['n']} on the "
                "cpu backend; the dense time includes computing K once.",
                "",
                *crossover_table(times),
            ]
            print(f"{suite}: crossover d = {crossover_dim(times)}")
        else:
            lines += [
                "## sotalign-auto against the baselines",
                "",
                *headline(suite, rows),
                "## All providers",
                "",
                *provider_table(suite, rows),
            ]
            for line in headline(suite, rows):
                if line.startswith("| **"):
                    print(f"{suite} headline: {line}")
        md = out / f"{slug}-{suite}.md"
        png = out / f"{slug}-{suite}.png"
        lines.insert(2, f"![{suite} timings]({png.name})\n")
        md.write_text("\n".join(lines))
        plot(suite, rows, title, png)
        written += [md, png]
    return written


# --------------------------------------------------------------------------- GPU runs


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """‖value − expected‖ / ‖expected‖ in float64."""
    expected = expected.double()
    return float((value.double() - expected).norm() / expected.norm().clamp_min(1e-300))


def fmt_bytes(size) -> str:
    return "–" if size is None else f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def fmt_error(value) -> str:
    return "–" if value is None else f"{value:.1e}"


def case_table(rows: list[dict], n_iters: int | None) -> list[str]:
    """One row per provider of a GPU case; ``n_iters`` adds the per-iteration time."""
    head = ["provider", "s / call"] + (["ms / iter"] if n_iters else [])
    head += [
        "× first row",
        "warm-up s",
        "peak extra",
        "bound",
        "× bound",
        "value err",
        "grad / potential err",
    ]
    lines = ["| " + " | ".join(head + ["route"]) + " |", "|---|" + "---:|" * (len(head) - 1) + "---|"]
    first = rows[0].get("seconds") if rows else None
    for row in rows:
        if "seconds" not in row:
            reason = row.get("error") or row.get("skipped")
            cells = [f"*{reason}*"] + [""] * (len(head) - 1)
        else:
            seconds, bound = row["seconds"], row.get("bound_seconds")
            cells = [fmt_time(seconds)]
            cells += [f"{1e3 * seconds / n_iters:.3g}"] if n_iters else []
            cells += [
                f"{first / seconds:.2f}" if first else "–",
                f"{row['warmup_seconds']:.3g}",
                fmt_bytes(row.get("peak_extra_bytes")),
                fmt_time(bound) if bound else "–",
                f"{seconds / bound:.3g}" if bound else "–",
                fmt_error(row.get("value_error")),
                fmt_error(row.get("grad_error", row.get("potential_error"))),
            ]
        route = row.get("route")
        cells.append(
            f"{route['backend']} {route['path']} {route['precision']}" if route else row.get("note", "")
        )
        lines.append("| " + " | ".join([row["provider"], *cells]) + " |")
    return lines + [""]


def _row(report: dict, section: str, case: list, provider: str) -> dict | None:
    for entry in report.get(section, {}).get("cases", []):
        if entry["case"] == case:
            return next((r for r in entry["rows"] if r["provider"] == provider and "seconds" in r), None)
    return None


def targets(report: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met or None when not measured) for each target of targets.json."""
    out = []
    gpu = report["roofline_gpu"].split()[0]
    n, d = TARGETS["sinkhorn"]["headline"]
    case = next((c for c in report.get("sinkhorn", {}).get("cases", []) if c["case"][:2] == [n, d]), None)
    rows = [
        r for r in (case["rows"] if case else []) if r["provider"].startswith("sotalign") and "seconds" in r
    ]
    limit = TARGETS["sinkhorn"]["max_x_best_bound"]
    best = min(rows, key=lambda r: r["seconds"], default=None)
    where = f"Sinkhorn n = m = {n}, d = {d}"
    if best:
        ratio = best["seconds"] / (case["case"][2] * roofline.best_iteration_bound(n, n, d, gpu))
        out.append(
            (
                f"{where}: fastest sotalign ≤ {limit}× the best roofline bound",
                f"{best['provider']}: {ratio:.2f}×",
                ratio <= limit,
            )
        )
    else:
        out.append((f"{where}: fastest sotalign ≤ {limit}× the best roofline bound", "–", None))
    for precision in ("fp32", "tf32"):
        flash = next(
            (
                r
                for r in rows + (case["rows"] if case else [])
                if r["provider"] == f"flashsinkhorn-{precision}" and "seconds" in r
            ),
            None,
        )
        mine = [r for r in rows if r["provider"].endswith(f"online-{precision}")]
        label = f"{where}: sotalign online faster than FlashSinkhorn ({precision} dots)"
        if flash and mine:
            ratio = flash["seconds"] / mine[0]["seconds"]
            out.append((label, f"{ratio:.2f}× FlashSinkhorn", ratio > 1))
        else:
            out.append((label, "–", None))
    for headline in TARGETS["klot"]["headlines"]:
        shape, minimum = headline["shape"], headline["min_x_paper"]
        label = f"KLOT n = m = {shape[0]}, d = {shape[1]}, d* = {shape[2]}"
        case = next(
            (c["case"] for c in report.get("klot", {}).get("cases", []) if c["case"][:3] == shape), None
        )
        auto, paper = (_row(report, "klot", case, p) for p in ("sotalign-auto", "paper-dense"))
        speedup = paper["seconds"] / auto["seconds"] if auto and paper else None
        out.append(
            (
                f"{label}: sotalign-auto ≥ {minimum:g}× the paper's step",
                "–" if speedup is None else f"{speedup:.2f}×",
                None if speedup is None else speedup >= minimum,
            )
        )
        limit = TARGETS["klot"]["max_x_bound"]
        ratio = auto["seconds"] / auto["bound_seconds"] if auto and auto.get("bound_seconds") else None
        out.append(
            (
                f"{label}: sotalign-auto ≤ {limit}× the bound of its path",
                "–" if ratio is None else f"{ratio:.2f}×",
                None if ratio is None else ratio <= limit,
            )
        )
    peaks = [
        (r["peak_extra_bytes"] / 2**20, r["provider"])
        for c in report.get("klot", {}).get("cases", [])
        for r in c["rows"]
        if r.get("route", {}).get("path") == "online" and r.get("peak_extra_bytes") is not None
    ]
    limit = TARGETS["online_max_extra_mib"]
    worst = max(peaks, default=None)
    out.append(
        (
            f"KLOT online paths: peak ≤ {limit} MiB beyond the inputs",
            "–" if worst is None else f"{worst[0]:.0f} MiB ({worst[1]})",
            None if worst is None else worst[0] <= limit,
        )
    )
    return out


def gpu_markdown(report: dict) -> str:
    """The Markdown of a GPU run's report (:mod:`benchmarks.gpu`)."""
    machine = report["machine"]
    kind = "sweep" if report["sweep"] else "check"
    device = machine.get("gpu_name") or f"CPU ({machine['cpu_model']}, {machine['cores']} cores)"
    lines = [f"# GPU {kind}: {device} ({report['date']})", ""]
    if report["smoke"]:
        lines += [
            "> **SMOKE RUN on CPU**: Triton in its interpreter, tiny shapes. No number here measures",
            "> anything; it shows that every section runs and what the report holds.",
            "",
        ]
    lines += [
        f"torch {machine['torch']}, triton {machine['triton']}, python {machine['python']}. Backends: "
        + ", ".join(f"{name} {state}" for name, state in machine["backends"].items())
        + ". Peers: "
        + ", ".join(f"{name} {version}" for name, version in machine["peers"].items())
        + ".",
        "",
        f"{report.get('seconds', 0):.0f} s of a {report['budget_seconds']:.0f} s budget. Times: the median "
        "of up to 3 calls after a warm-up call (compilation, autotuning); *peak extra*: CUDA "
        "max_memory_allocated beyond what was allocated before; *bound*: the roofline lower bound "
        f"(benchmarks/roofline.py, {report['roofline_gpu']}) of the row's path and dot precision. "
        "Errors are relative to the first row of each table (the paper's algorithm; none in the "
        "scale tables); potentials are compared centred.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    verdict = {None: "not measured", True: "**met**", False: "**missed**"}
    lines += [f"| {target} | {measured} | {verdict[met]} |" for target, measured, met in targets(report)]
    lines.append("")
    if "tests" in report:
        tests = report["tests"]
        lines += [
            f"## {tests['file']}: {tests['status']} in {tests['seconds']:.0f} s "
            f"(target ≤ {tests['target_seconds']} s)",
            "",
            "```",
            *tests["summary"],
            "```",
            "",
        ]
    for section, title in (("sinkhorn", "Sinkhorn"), ("klot", "KLOT step, forward + backward")):
        for case in report.get(section, {}).get("cases", []):
            lines += [f"## {title}, {case_label(section, case['case'])}", ""]
            lines += case_table(case["rows"], case["case"][-1] if section == "sinkhorn" else None)
    if "crossover" in report:
        crossover = report["crossover"]
        times = {
            (row["d"], path): row[path]["seconds"]
            for row in crossover["rows"]
            for path in ("dense", "online")
            if "seconds" in row[path]
        }
        lines += [
            f"## Dense/online crossover: Sinkhorn n = m = {crossover['n']}, "
            f"{crossover['n_iters']} iterations, online at {crossover['online_precision']}",
            "",
            *crossover_table(times),
            f"Written to dispatch.json: d = {crossover['crossover_d']} "
            f"(d timed on both paths: {crossover['timed_d']}).",
            "",
        ]
    for case in report.get("scale", {}).get("cases", []):
        section = case["section"]
        what = "Sinkhorn" if section == "sinkhorn" else "KLOT step"
        lines += [f"## Scale: {what}, {case_label(section, case['case'])}, online", ""]
        lines += case_table(case["rows"], case["case"][-1] if section == "sinkhorn" else None)
    return "\n".join(lines)


def case_label(section: str, case: list) -> str:
    if section == "klot":
        n, d, d_teacher, n_iters = case
        return f"n = m = {n}, d = {d}, teacher {d_teacher}, {n_iters} + {n_iters} iterations"
    n, d, n_iters = case
    return f"n = m = {n}, d = {d}, {n_iters} iterations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark or GPU-run JSON files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder of the CPU reports")
    args = parser.parse_args()
    for path in args.json:
        data = json.loads(path.read_text())
        if data.get("format") == GPU_FORMAT:
            markdown = path.with_suffix(".md")
            markdown.write_text(gpu_markdown(data))
            print(f"wrote {markdown}")
            continue
        if "benchmarks" not in data:
            parser.error(f"{path} is neither pytest-benchmark JSON nor a report of benchmarks.gpu")
        for written in report(path, args.out):
            print(f"wrote {written}")


if __name__ == "__main__":
    main()
