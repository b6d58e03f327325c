"""Turn pytest-benchmark JSON from the sotalign suites into a Markdown table and a plot.

    .venv/bin/python benchmarks/report.py benchmarks/results/cpu-amd-epyc-2core-sinkhorn.json

For each suite found in the JSON (``extra_info["suite"]``: sinkhorn, klot, crossover) writes
``<machine>-<suite>.md`` and ``<machine>-<suite>.png`` into ``--out`` (default: the folder
of this script's ``results/``), where ``<machine>`` is e.g. ``cpu-amd-epyc-2core`` (CPU model
and core count recorded by the suite's conftest, else read from this machine).

* sinkhorn / klot: per shape, the median time of every provider, its speed-up over the
  paper's dense algorithm and over POT (where timed), memory and the backend/path used;
  the plot is median time against n (log-log), one line per provider, one panel per d.
* crossover: dense vs online time per d and the crossover d; the plot is time against d.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = {"paper-dense": "paper", "pot-sinkhorn_log": "POT"}
#: The CPU suites this report handles.
SUITES = ("sinkhorn", "klot", "crossover")
HEADLINE = {"sinkhorn": (4096, 64), "klot": (2048, 256)}


# --------------------------------------------------------------------------- loading


def local_machine() -> dict:
    model = "unknown-cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": model, "cores": os.cpu_count()}


def machine_slug(machine: dict) -> str:
    """``cpu-amd-epyc-2core`` from the CPU model name and the core count."""
    model = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core", " ", machine["cpu_model"].lower())
    model = re.sub(r"@.*", "", model)
    words = re.findall(r"[a-z0-9]+", model)
    return "-".join(["cpu", *words, f"{machine['cores']}core"])


def load(path: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(machine, {suite: [row, ...]}) with one flat row per benchmark."""
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {}).get("sotalign") or local_machine()
    machine = {**machine, "datetime": data.get("datetime", "")}
    suites: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("suite") not in SUITES or not bench.get("stats"):
            continue  # the GPU and iteration suites have their own report, gpu_report.py
        stats = bench["stats"]
        suites[info["suite"]].append(
            {
                **info,
                "median": stats["median"],
                "min": stats["min"],
                "rounds": stats["rounds"],
                "name": bench["name"],
            }
        )
    return machine, suites


# --------------------------------------------------------------------------- tables


def fmt_time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


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


def crossover_table(rows: list[dict]) -> tuple[list[str], int | None]:
    times = {(r["d"], r["path"]): r["median"] for r in rows}
    dims = sorted({d for d, _ in times})
    lines = [
        "| d | dense (K once + reads) | online (K recomputed) | online / dense | faster |",
        "|---:|---:|---:|---:|---|",
    ]
    for d in dims:
        dense, online = times.get((d, "dense")), times.get((d, "online"))
        if dense is None or online is None:
            continue
        lines.append(
            f"| {d} | {fmt_time(dense)} | {fmt_time(online)} | {online / dense:.2f} | "
            f"{'dense' if dense <= online else 'online'} |"
        )
    crossover = None  # smallest d from which dense is never slower
    for d in reversed(dims):
        dense, online = times.get((d, "dense")), times.get((d, "online"))
        if dense is None or online is None or dense > online:
            break
        crossover = d
    return lines + [""], crossover


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
            table, crossover = crossover_table(rows)
            n = rows[0]["n"]
            lines += [
                f"One {rows[0]['n_iters']}-iteration Sinkhorn solve at n = m = {n} on the "
                "cpu backend; the dense time includes computing K once.",
                "",
                *table,
                f"**Crossover d = {crossover}** (dense is never slower from this d on).",
                "",
            ]
            print(f"{suite}: crossover d = {crossover}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument(
        "--machine",
        action="store_true",
        help="print this machine's name for result files (e.g. cpu-amd-epyc-2core) and exit",
    )
    args = parser.parse_args()
    if args.machine:
        print(machine_slug(local_machine()))
        return
    for path in args.json:
        for written in report(path, args.out):
            print(f"wrote {written}")


if __name__ == "__main__":
    main()
