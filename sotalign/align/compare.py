"""Compare methods over seeds on the same data: one run per (method, seed), then a summary of
held-out mean R@1 as JSON and as a Markdown table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..data import AlignmentData, DataSpec
from ..rundir import CONFIG_FILE, METRICS_FILE, atomic_write, read_json, write_json
from .config import TrainConfig, config_dict
from .trainer import fit


def compare(
    config: TrainConfig,
    spec: DataSpec,
    methods: list[str],
    seeds: list[int],
    out_dir,
    *,
    progress: bool = True,
    fixed_split: bool = False,
) -> dict:
    """Train each method for each seed on the same data; summarise held-out mean R@1.

    Seed s sets both the training seed and, for an aligned dataset or a pool of explicit pairs
    (`spec.n_pairs`), the split (which pairs are kept), so every method sees the same rows for
    a given seed; `fixed_split=True` keeps `spec.split_seed` for every seed instead. The score is the test
    split's mean R@1 when there is one, else the validation split's. Finished runs under
    `out_dir/<method>/seed<s>` are reused (their checkpoints resume), so a killed comparison
    can be restarted. Writes `out_dir/compare.json` and `out_dir/compare.md`.
    """
    out_dir = Path(out_dir)
    runs = []
    for seed in seeds:
        redraw = (spec.aligned or spec.n_pairs is not None) and not fixed_split
        seed_spec = dataclasses.replace(spec, split_seed=seed) if redraw else spec
        data = AlignmentData.from_spec(seed_spec)
        for method in methods:
            run_config = dataclasses.replace(
                config,
                method=method,
                seed=seed,
                method_options=config.method_options if method == config.method else {},
            )
            run_dir = out_dir / method / f"seed{seed}"
            fit(run_config, data, run_dir, resume=(run_dir / CONFIG_FILE).exists(), progress=progress)
            metrics = read_json(run_dir / METRICS_FILE)
            split = "test" if metrics["test"] is not None else "val"
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "split": split,
                    "best_step": metrics["best_step"],
                    "seconds": metrics["seconds"],
                    **(metrics[split] or {}),
                }
            )
    summary = {}
    for method in methods:
        scores = [r["mean_R@1"] for r in runs if r["method"] == method and "mean_R@1" in r]
        summary[method] = {
            "mean_R@1": float(np.mean(scores)) if scores else None,
            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            "n": len(scores),
        }
    result = {
        "config": config_dict(config, spec),
        "methods": methods,
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare.json", result)
    atomic_write(out_dir / "compare.md", comparison_markdown(result).encode())
    return result


def comparison_markdown(result: dict) -> str:
    """A Markdown table of mean R@1 ± std (over seeds) per method."""
    split = result["runs"][0]["split"] if result["runs"] else "val"
    lines = [f"| method | {split} mean R@1 (%) | seeds |", "|---|---:|---:|"]
    for method, s in result["summary"].items():
        lines.append(f"| {method} | {s['mean_R@1']:.2f} ± {s['std']:.2f} | {s['n']} |")
    return "\n".join(lines) + "\n"
