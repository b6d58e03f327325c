"""Why does SOTAlign add nothing on real features, and what fixes it? Sweeps on validation only.

    python benchmarks/alignment/investigate.py GRID [--pairs 100,300] [--seeds 0] [--task emoji-out]

Each grid is a list of (label, method, overrides) runs; one JSON line per run is appended to
`--log` (validation and test mean R@1 are both recorded, but only validation is used to choose).
`--summary` prints mean ± std of validation per label and number of pairs.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sotalign.align.tasks import Embedded, embed_all, run

T = dict(head_init="teacher")
GRIDS = {
    # Baseline of the issue (random init, the library's defaults), and the α scale.
    "alpha": [("teacher", "cca+none", {}), ("sail", "sail", {}), ("sotalign a=1e-4", "sotalign", {})]
    + [(f"sotalign a={a:g}", "sotalign", {"alpha": a}) for a in (0.0256, 1.0)],
    # Student initialised from the CCA teacher; KLOT weight (0 = SigLIP fine-tuning of the teacher).
    "init": [(f"teacher-init a={a:g}", "sotalign", {**T, "alpha": a}) for a in (0.0, 1.0, 10.0)],
    "focus": [(f"teacher-init a={a:g}", "sotalign", {**T, "alpha": a}) for a in (0.0, 1.0, 10.0)]
    + [("sotalign a=1", "sotalign", {"alpha": 1.0}), ("sail", "sail", {})],
    # Learning rate (Lion) for random and teacher init.
    "lr": [(f"sail lr={lr:g}", "sail", {"lr": lr}) for lr in (3e-5, 3e-4, 1e-3)]
    + [(f"teacher-init a=1 lr={lr:g}", "sotalign", {**T, "alpha": 1.0, "lr": lr}) for lr in (3e-5, 3e-4)],
    # Seeds × pairs × task check of the recipe against its ablations.
    "recipe": [("teacher", "cca+none", {}), ("sail steps=300", "sail", {"steps": 300})]
    + [(f"teacher-init a={a:g}", "sotalign", {**T, "alpha": a}) for a in (0.0, 1.0, 10.0)],
    # Longer training from the teacher, and a softer teacher plan, at 300+ pairs.
    "longer": [
        (
            "teacher-init a=1 steps=300 lr=3e-5",
            "sotalign",
            {**T, "alpha": 1.0, "steps": 300, "lr": 3e-5, "eval_every": 25},
        ),
        ("teacher-init a=1 steps=300", "sotalign", {**T, "alpha": 1.0, "steps": 300, "eval_every": 25}),
        ("teacher-init a=1 eps*=0.05", "sotalign", {**T, "alpha": 1.0, "eps_teacher": 0.05}),
    ],
    # Finer α around the best, and longer training.
    "alpha2": [(f"teacher-init a={a:g}", "sotalign", {**T, "alpha": a}) for a in (0.3, 3.0, 30.0)],
    "steps": [
        ("sail steps=300", "sail", {"steps": 300}),
        ("sail steps=300 lr=3e-4", "sail", {"steps": 300, "lr": 3e-4}),
        ("teacher-init a=1 steps=300", "sotalign", {**T, "alpha": 1.0, "steps": 300}),
    ],
    # Entropic regularisation of student and teacher plans.
    "eps": [
        (f"teacher-init a=1 eps={e:g}/{et:g}", "sotalign", {**T, "alpha": 1.0, "eps": e, "eps_teacher": et})
        for e, et in ((0.05, 0.05), (0.1, 0.01))
    ],
    # Unpaired rows per step.
    "batch": [
        (f"teacher-init a=1 unpaired={b}", "sotalign", {**T, "alpha": 1.0, "unpaired_batch_size": b})
        for b in (128, 1024)
    ],
    # Teacher quality: CCA regularisation λ and dimension.
    "teacher": [
        (f"cca reg={r:g}", "cca+none", {"teacher_options": {"reg": r}}) for r in (0.01, 0.3, 1.0, 3.0)
    ]
    + [(f"cca dim={d}", "cca+none", {"teacher_options": {"out_dim": d}}) for d in (32, 64)],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", help="comma-separated: " + ", ".join(GRIDS))
    parser.add_argument("--task", default="emoji-out")
    parser.add_argument("--pairs", default="100,300")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", action="append", default=[], help="extra override key=JSON for every run")
    parser.add_argument("--log", type=Path, default=Path("/tmp/sotalign-investigation.jsonl"))
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args(argv)
    if args.summary:
        return summary(args.log)
    torch.set_num_threads(1)
    extra = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    snapshot = args.log.with_suffix(".features.pt")  # skips re-listing the datasets in later sweeps
    if snapshot.exists():
        data = Embedded(**torch.load(snapshot, weights_only=True))
    else:
        data = embed_all(progress=False)
        torch.save(vars(data), snapshot)
    for n_pairs in (int(p) for p in args.pairs.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for label, method, overrides in [entry for grid in args.grid.split(",") for entry in GRIDS[grid]]:
                result = run(data, args.task, n_pairs, seed, method, **{**overrides, **extra})
                result["label"] = label + "".join(f" {k}={v}" for k, v in extra.items())
                with args.log.open("a") as log:
                    log.write(json.dumps(result) + "\n")
                print(
                    f"{args.task} {n_pairs:5d} seed {seed} {result['label']:40s} val {result['val']:5.1f}"
                    f" (step {result['best_step']}, {result['seconds']:.0f}s)",
                    flush=True,
                )


def summary(path: Path) -> None:
    groups = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        groups[(r["task"], r["label"], r["pairs"])].append(r["val"])
    for (task, label, pairs), values in sorted(groups.items()):
        spread = f"{np.mean(values):5.2f} ± {np.std(values):4.2f} (n={len(values)})"
        print(f"{task:10s} {pairs:5d} {label:50s} val {spread}")


if __name__ == "__main__":
    main()
