"""Demo and benchmark (``make demo``, ``make demo-full``): SOTAlign on real frozen encoders.

Images: EfficientNet-Lite0 (ImageNet, 128 px); texts: all-MiniLM-L6-v2; both from PyPI wheels,
offline. Task: emoji image ↔ name retrieval on 500 held-out emoji, with few pairs and
unpaired pools (see `sotalign.align.tasks`). The demo embeds the emoji (cached under
~/.cache/sotalign), then trains the CCA teacher, SAIL and SOTAlign at 100, 300 and 1000 pairs
over 3 seeds on `emoji-hidden` (the unpaired images and names of the emoji left over, pairing
withheld: the regime where the unpaired data helps, at 1000 pairs), prints the table and
writes a plot (≈ 5 min on 2 idle cores, a third of it the first embedding).

    python -m sotalign.demo                       # the demo
    python -m sotalign.demo --full                # every task, 100/300/1000 pairs, all methods
    python -m sotalign.demo --pairs 100 --seeds 0 # a quick look

Every hyperparameter is fixed beforehand or chosen on the validation emoji (model selection
every 25 steps; ridge's λ); test emoji are only scored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

#: Settings of each method on these tasks beyond `sotalign.align.tasks.BASE` (100 steps, Lion
#: lr 1e-4, 512-d linear heads, 256 unpaired images + 256 unpaired texts per step, 30 Sinkhorn
#: iterations), chosen on the validation emoji (benchmarks/results/*-sotalign-investigation.md).
#: The baselines train from a random init and gained from 300 steps; SOTAlign starts from its
#: CCA teacher (a departure from the paper) with α = 1 in our units (mass-1 plans), which is the
#: paper's α = 1e-4 at its batch of ~10k rows. `None` runs the closed-form ridge baseline.
STEPS = {"steps": 300, "eval_every": 25}
METHODS = {
    "teacher": ("cca+none", {}),
    "ridge": (None, {}),
    "sail": ("sail", STEPS),
    "structure": ("structure", STEPS),
    "nnclr": ("nnclr", STEPS),
    "sotalign": ("sotalign", {"head_init": "teacher", "alpha": 1.0}),
}
LABELS = {
    "teacher": "CCA teacher alone",
    "ridge": "ridge (image → text)",
    "sail": "SAIL (pairs only)",
    "structure": "STRUCTURE",
    "nnclr": "NNCLR",
    "sotalign": "SOTAlign",
}

#: Why 100 and 300 pairs cannot gain (`benchmarks/alignment/investigate.py --ceiling`, 3 seeds).
PLAN_CEILING = (
    "At 100 and 300 pairs no KLOT recipe can clear the teacher: KLOT only teaches the teacher's "
    "OT plans, and ranking the test emoji by those plans (computed on the test rows themselves, "
    "a generous bound) beats the teacher's cosine by -0.2 points at 100 pairs and +0.6 at 300, "
    "against +5.1 at 1000 pairs (the plan ceiling)."
)


def run_grid(data, tasks, pair_counts, seeds, methods, log=None) -> list[dict]:
    from .align.tasks import ridge, run

    results = []
    for task in tasks:
        for n_pairs in pair_counts:
            for seed in seeds:
                for name in methods:
                    method, overrides = METHODS[name]
                    result = (
                        ridge(data, task, n_pairs, seed)
                        if method is None
                        else run(data, task, n_pairs, seed, method, **overrides)
                    )
                    result["name"] = name
                    results.append(result)
                    if log is not None:
                        with open(log, "a") as f:
                            f.write(json.dumps(result) + "\n")
                    print(
                        f"{task:9s} {n_pairs:5d} pairs seed {seed}  {LABELS[name]:22s} "
                        f"val {result['val']:5.1f}  test {result['test']:5.1f}  ({result['seconds']:.0f}s)",
                        flush=True,
                    )
    return results


def summarise(results: list[dict]) -> dict:
    """{task: {method: {pairs: (mean, std, n)}}} of test mean R@1 over seeds."""
    table = {}
    for r in results:
        table.setdefault(r["task"], {}).setdefault(r["name"], {}).setdefault(r["pairs"], []).append(r["test"])
    return {
        task: {
            m: {
                k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
                for k, v in by_pairs.items()
            }
            for m, by_pairs in methods.items()
        }
        for task, methods in table.items()
    }


def paired_gains(results: list[dict], method: str, baseline: str) -> dict:
    """{(task, pairs): (mean, std)} of the per-seed test difference method − baseline."""
    score = {(r["task"], r["pairs"], r["seed"], r["name"]): r["test"] for r in results}
    out = {}
    for task, pairs in sorted({(r["task"], r["pairs"]) for r in results}):
        seeds = sorted({r["seed"] for r in results if (r["task"], r["pairs"]) == (task, pairs)})
        if all((task, pairs, s, m) in score for s in seeds for m in (method, baseline)):
            diffs = [score[task, pairs, s, method] - score[task, pairs, s, baseline] for s in seeds]
            out[task, pairs] = (
                float(np.mean(diffs)),
                float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
            )
    return out


def gain_lines(results: list[dict]) -> list[str]:
    """Per-seed test gains of SOTAlign over SAIL and over its teacher, one line each."""
    lines = []
    for baseline in ("sail", "teacher"):
        gains = paired_gains(results, "sotalign", baseline)
        if gains:
            lines.append(
                f"SOTAlign − {LABELS[baseline]}, per seed: "
                + ", ".join(f"{task} {k}: {g[0]:+.1f} ± {g[1]:.1f}" for (task, k), g in gains.items())
            )
    return lines


def markdown(results: list[dict], machine: str, minutes: float) -> str:
    from .align import tasks as T

    summary = summarise(results)
    lines = [
        f"Test mean R@1 (%) over {len({r['seed'] for r in results})} seeds (mean ± sample std; "
        f"{T.N_TEST} test emoji, chance {100 / T.N_TEST:.1f}). "
        f"Machine: {machine}; whole run {minutes:.1f} min.",
        "",
    ]
    for task, methods in summary.items():
        pair_counts = sorted({k for by in methods.values() for k in by})
        lines += [
            f"**{task}**",
            "",
            "| method | " + " | ".join(f"{k} pairs" for k in pair_counts) + " |",
            "|---|" + "---:|" * len(pair_counts),
        ]
        for name, by in methods.items():
            cells = [f"{by[k][0]:.1f} ± {by[k][1]:.1f}" if k in by else "" for k in pair_counts]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += gain_lines(results)
    if any(r["pairs"] <= 300 for r in results):
        lines += ["", PLAN_CEILING]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, machine: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    summary = summarise(results)
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4), squeeze=False)
    for ax, (task, methods) in zip(axes[0], summary.items(), strict=True):
        for name, by in methods.items():
            ks = sorted(by)
            mean, std = np.array([by[k][0] for k in ks]), np.array([by[k][1] for k in ks])
            ax.errorbar(
                ks,
                mean,
                yerr=std,
                marker="o",
                capsize=3,
                label=LABELS[name],
                linewidth=2.5 if name == "sotalign" else 1.2,
            )
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("pairs")
        ax.set_ylabel("test mean R@1 (%)")
        ax.set_title(f"{task} ({machine})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="the whole benchmark: every task, 100/300/1000 pairs, all methods"
    )
    parser.add_argument("--tasks", default=None, help="comma-separated: emoji-out, emoji-in, emoji-hidden")
    parser.add_argument("--pairs", default=None, help="comma-separated numbers of pairs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--machine", default=f"{platform.machine()}-{os.cpu_count()}core")
    parser.add_argument(
        "--out", type=Path, default=Path("demo-results"), help="table, plot and per-run log go here"
    )
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        default=None,
        help="only rebuild the table and plot from these per-run logs (.jsonl)",
    )
    args = parser.parse_args(argv)
    if args.report:
        results = [json.loads(line) for path in args.report for line in path.read_text().splitlines() if line]
        stem = args.out / f"{args.machine}-{'benchmark' if args.full else 'demo'}"
        args.out.mkdir(parents=True, exist_ok=True)
        minutes = sum(r["seconds"] for r in results) / 60
        stem.with_suffix(".md").write_text(markdown(results, args.machine, minutes))
        plot(results, stem.with_suffix(".png"), args.machine)
        print(stem.with_suffix(".md").read_text())
        return
    import torch

    from .align.tasks import TASKS, embed_all

    tasks = (args.tasks or (",".join(TASKS) if args.full else "emoji-hidden")).split(",")
    pair_counts = [int(k) for k in (args.pairs or "100,300,1000").split(",")]
    methods = (args.methods or (",".join(METHODS) if args.full else "teacher,sail,sotalign")).split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; expected {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    # Small matrices: more threads than cores only spin (measured 5-10x slower on a busy 2-core machine).
    torch.set_num_threads(1 if (os.cpu_count() or 1) <= 2 else min(torch.get_num_threads(), 4))
    out_of_domain = "emoji-out" in tasks  # the only task with OpenClipArt and WordNet pools
    pools = ", OpenClipArt and WordNet" if out_of_domain else ""
    print(f"embedding emoji{pools} (cached after the first run) ...", flush=True)
    data = embed_all(progress=True, out_of_domain=out_of_domain)
    print(f"embedded in {time.perf_counter() - started:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.machine}-{'benchmark' if args.full else 'demo'}"
    log = stem.with_suffix(".jsonl")
    log.unlink(missing_ok=True)
    results = run_grid(data, tasks, pair_counts, seeds, methods, log=log)
    minutes = (time.perf_counter() - started) / 60
    text = markdown(results, args.machine, minutes)
    stem.with_suffix(".md").write_text(text)
    print("\n" + text)
    if plot(results, stem.with_suffix(".png"), args.machine):
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
