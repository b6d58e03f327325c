"""Why does SOTAlign add nothing on real features, and what fixes it? Sweeps on validation only.

    python benchmarks/alignment/investigate.py GRID [--pairs 100,300] [--seeds 0] [--task emoji-out]
    python benchmarks/alignment/investigate.py --ceiling [--pairs 100,300,1000] [--seeds 0,1,2] [--on clipart]

Each grid is a list of (label, method, overrides) runs; one JSON line per run is appended to
`--log` (validation and test mean R@1 are both recorded, but only validation is used to choose).
`--summary` prints mean ± std of validation per label and number of pairs. `--text-encoder`
and `--image-size` swap the benchmark's encoders (e.g. `mpnet`, 224 px).

`--ceiling` trains nothing: it asks how much the teacher's OT plans could teach a student at all.
KLOT's target is the teacher's entropic plan P*, so a student distilled from it can at best rank
pairs as P* does. Ranked by P* over the evaluation rows themselves (transductive, and given
their one-to-one structure, which no training batch has), the teacher's R@1 is a generous bound
on what the plans add to its plain cosine ranking. `--on clipart` asks the same of OpenClipArt
drawing ↔ title pairs (the 3,000 embedded drawings: 200 validation, 500 test, pairs from the rest).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sotalign import sinkhorn
from sotalign.align.tasks import Embedded, TaskSplit, draw_rows, embed_all, run, split
from sotalign.align.teachers import CCATeacher
from sotalign.eval.retrieval import pessimistic_ranks, retrieval_metrics

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
    # Hidden pairs (emoji-hidden): the unpaired pools hold the pairing the teacher's plan can find.
    "hidden": [("teacher", "cca+none", {}), ("sail steps=300", "sail", {"steps": 300})]
    + [(f"teacher-init a={a:g}", "sotalign", {**T, "alpha": a}) for a in (0.0, 1.0, 10.0)]
    + [
        (f"teacher-init a={a:g} whole pool", "sotalign", {**T, "alpha": a, "unpaired_batch_size": 4096})
        for a in (1.0, 10.0)
    ]
    + [
        (
            "random-init a=1 whole pool",
            "sotalign",
            {"head_init": "random", "alpha": 1.0, "unpaired_batch_size": 4096},
        )
    ],
    # Longer, stronger KLOT from the teacher on the whole hidden-pair pool (1000 pairs: the plan
    # ceiling is largest there).
    "hidden-long": [
        (
            f"teacher-init whole pool steps=300 {label}",
            "sotalign",
            {**T, "unpaired_batch_size": 4096, "steps": 300, "eval_every": 25, **settings},
        )
        for label, settings in (
            ("a=10 lr=3e-4", {"alpha": 10.0, "lr": 3e-4}),
            ("a=10 eps=0.02", {"alpha": 10.0, "eps": 0.02}),
            ("a=100", {"alpha": 100.0}),
            ("a=10 eps=eps*=0.02", {"alpha": 10.0, "eps": 0.02, "eps_teacher": 0.02}),
        )
    ],
    # SAIL's learning rate with 300 steps (redone for 224 px images).
    "sail-lr": [
        (f"sail steps=300 lr={lr:g}", "sail", {"steps": 300, "eval_every": 25, "lr": lr})
        for lr in (1e-4, 3e-4)
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
    parser.add_argument("--ceiling", action="store_true", help="teacher vs its plan's ranking, no training")
    parser.add_argument("--on", choices=("emoji", "clipart"), default="emoji", help="pairs of --ceiling")
    parser.add_argument("--text-encoder", default="minilm")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.summary:
        return summary(args.log)
    if not args.ceiling and not args.grid:
        parser.error("name a GRID, or pass --ceiling or --summary")
    torch.set_num_threads(1)
    extra = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    encoders = f"{args.text_encoder}-{args.image_size}px"
    # The snapshot skips re-listing the datasets in later sweeps.
    snapshot = args.log.with_name(f"{args.log.stem}.{encoders}.features.pt")
    if snapshot.exists():
        data = Embedded(**torch.load(snapshot, weights_only=True))
    else:
        data = embed_all(progress=False, image_size=args.image_size, text_encoder=args.text_encoder)
        torch.save(vars(data), snapshot)
    if args.ceiling:
        pair_counts = [int(p) for p in args.pairs.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        return ceiling(data, pair_counts, seeds, encoders, args.log, args.on)
    for n_pairs in (int(p) for p in args.pairs.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for label, method, overrides in [entry for grid in args.grid.split(",") for entry in GRIDS[grid]]:
                result = run(data, args.task, n_pairs, seed, method, **{**overrides, **extra})
                result["label"] = label + "".join(f" {k}={v}" for k, v in extra.items())
                result["encoders"] = encoders
                with args.log.open("a") as log:
                    log.write(json.dumps(result) + "\n")
                print(
                    f"{args.task} {n_pairs:5d} seed {seed} {result['label']:40s} val {result['val']:5.1f}"
                    f" (step {result['best_step']}, {result['seconds']:.0f}s)",
                    flush=True,
                )


def _mean_r1(scores: torch.Tensor) -> float:
    """Mean of image→text and text→image R@1 (%) of a score matrix whose row i pairs with
    column i (ties counted against, as in `retrieval_metrics`)."""
    truth = torch.arange(len(scores))
    hits = [(pessimistic_ranks(s, truth) == 0).double().mean() for s in (scores, scores.T)]
    return 50.0 * float(sum(hits))


CEILING_EPS = (0.01, 0.02, 0.05)


def _clipart_split(data: Embedded, n_pairs: int, seed: int) -> TaskSplit:
    """OpenClipArt drawing ↔ title pairs, split as the emoji are (no unpaired pools: the
    ceiling needs none)."""
    val, test, paired, _ = draw_rows(len(data.clipart_images), n_pairs, seed, what="drawings")
    images, texts, none = data.clipart_images, data.clipart_texts, torch.empty(0)
    return TaskSplit(
        images[paired], texts[paired], none, none, images[val], texts[val], images[test], texts[test]
    )


def ceiling(data: Embedded, pair_counts, seeds, encoders: str, log: Path, on: str = "emoji") -> None:
    """Test and validation R@1 of the CCA teacher ranked by cosine, and by its entropic plan
    over the evaluation rows at each ε* of `CEILING_EPS` (same teacher, same rows)."""
    for n_pairs in pair_counts:
        for seed in seeds:
            # The teacher sees the pairs only, so any task's split will do for emoji.
            parts = (
                split(data, "emoji-in", n_pairs, seed)
                if on == "emoji"
                else _clipart_split(data, n_pairs, seed)
            )
            teacher = CCATeacher().fit(parts.paired_images, parts.paired_texts)
            result = {"label": "plan ceiling", "on": on, "encoders": encoders, "pairs": n_pairs, "seed": seed}
            for name, images, texts in (
                ("val", parts.val_images, parts.val_texts),
                ("test", parts.test_images, parts.test_texts),
            ):
                x, y = teacher.transform_images(images), teacher.transform_texts(texts)
                result[name] = {"cosine": retrieval_metrics(x, y, ks=(1,))["mean_R@1"]}
                for eps in CEILING_EPS:
                    plan = sinkhorn(x, y, eps=eps, n_iters=500, backend="reference").plan()
                    result[name][f"plan eps*={eps:g}"] = _mean_r1(plan)
            with log.open("a") as out:
                out.write(json.dumps(result) + "\n")
            print(f"{on} {encoders} {n_pairs:5d} pairs seed {seed}: {result['test']} (test)", flush=True)


def summary(path: Path) -> None:
    groups = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["label"] == "plan ceiling":
            continue
        label = r["label"] + (
            f" [{r['encoders']}]" if r.get("encoders", "minilm-128px") != "minilm-128px" else ""
        )
        groups[(r["task"], label, r["pairs"])].append(r["val"])
    for (task, label, pairs), values in sorted(groups.items()):
        spread = f"{np.mean(values):5.2f} ± {np.std(values):4.2f} (n={len(values)})"
        print(f"{task:10s} {pairs:5d} {label:50s} val {spread}")


if __name__ == "__main__":
    main()
