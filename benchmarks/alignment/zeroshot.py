"""The large-pool task `fashion-zeroshot`: emoji pairs, a 58,000-image Fashion-MNIST pool,
zero-shot accuracy on the Fashion-MNIST test set (`sotalign.align.tasks.run_zero_shot`).

    python benchmarks/alignment/zeroshot.py GRID [--pairs 1000] [--seeds 0]   # settings, on validation
    python benchmarks/alignment/zeroshot.py final --machine <name>            # the table
    python benchmarks/alignment/zeroshot.py --report LOG.jsonl --machine <name>
    python benchmarks/alignment/zeroshot.py --ceiling [--pairs 300,1000] [--seeds 0,1,2]

GRID entries are (label, method, overrides) runs; every run appends one JSON line to `--log`
(validation and test accuracy both recorded; settings are chosen on validation only: 2,000
labelled training images kept out of the pool). `final` runs the chosen settings (`FINAL`)
at 300 and 1000 pairs over seeds 0–2, appends each run to
`benchmarks/results/<machine>-fashion-zeroshot.jsonl` (so processes can share the work:
`--methods`, `--pairs`, `--seeds`) and rebuilds `<machine>-fashion-zeroshot.md` from it.

`--ceiling` trains nothing: KLOT teaches the teacher's entropic plans between unpaired images
and texts, so it asks how well those plans classify. The CCA teacher's plan between the
validation images and the whole unpaired text pool (WordNet glosses + prompts), summed over
each class's prompts, gives each image a class; so does its plan between the images and the
class weights (one balanced class per row). Both beside the teacher's plain zero-shot accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sotalign import sinkhorn
from sotalign.align.tasks import (
    BASE,
    FASHION_TEMPLATES,
    FASHION_VAL,
    FashionEmbedded,
    embed_fashion,
    fashion_split,
    run_zero_shot,
)
from sotalign.align.teachers import CCATeacher
from sotalign.demo import LABELS, gain_lines

RESULTS = Path(__file__).resolve().parents[1] / "results"
T = dict(head_init="teacher")
LONG = dict(steps=300)

GRIDS = {
    # KLOT weight and unpaired rows per step, from the teacher, 300 steps over the whole pool.
    "alpha": [
        (f"sotalign a={a:g} batch=512", "sotalign", {**T, **LONG, "alpha": a, "unpaired_batch_size": 512})
        for a in (1.0, 10.0)
    ],
    # The paper's random init: SAIL plus KLOT, rather than the teacher plus SigLIP.
    "init": [
        (
            "sotalign random-init a=1 batch=512",
            "sotalign",
            {**LONG, "head_init": "random", "alpha": 1.0, "unpaired_batch_size": 512},
        )
    ],
    "batch": [
        ("sotalign a=1 batch=2048", "sotalign", {**T, **LONG, "alpha": 1.0, "unpaired_batch_size": 2048})
    ],
}

#: The settings of the final table: the teacher and the baselines as in `sotalign.demo.METHODS`
#: (no checkpoint selection here: the model after the last step), SOTAlign as chosen on validation.
FINAL = {
    "teacher": ("cca+none", {}),
    "sail": ("sail", LONG),
    "nnclr": ("nnclr", LONG),
    "sotalign": ("sotalign", {**T, **LONG, "alpha": 1.0, "unpaired_batch_size": 512}),
}


def _log(path: Path, result: dict) -> None:
    with path.open("a") as out:
        out.write(json.dumps(result) + "\n")


def markdown(results: list[dict], machine: str, note: str = "") -> str:
    """Test zero-shot top-1 per method and number of pairs (mean ± sample std over seeds), the
    per-seed gains of SOTAlign, and the seconds each part took."""
    by = defaultdict(list)
    for r in results:
        by[r["name"], r["pairs"]].append(r)
    pair_counts = sorted({r["pairs"] for r in results})
    names = [n for n in FINAL if any(r["name"] == n for r in results)]
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"Zero-shot top-1 accuracy (%) on the 10,000 Fashion-MNIST test images, 10 classes (chance 10), "
        f"prompts {' / '.join(repr(t) for t in FASHION_TEMPLATES)} averaged per class. "
        f"Seeds {seeds} (emoji pairs redrawn and heads trained per seed); mean ± sample std. "
        f"Machine: {machine}. {note}",
        "",
        "| method | " + " | ".join(f"{k} pairs: test | {k}: val" for k in pair_counts) + " | seconds a run |",
        "|---|" + "---:|" * (2 * len(pair_counts) + 1),
    ]
    for name in names:
        cells = []
        for k in pair_counts:
            test = [r["test"] for r in by[name, k]]
            val = [r["val"] for r in by[name, k]]
            spread = np.std(test, ddof=1) if len(test) > 1 else 0.0
            cells.append(f"{np.mean(test):.1f} ± {spread:.1f} | {np.mean(val):.1f}")
        seconds = np.mean(
            [r["seconds"] + r.get("score_seconds", 0.0) for k in pair_counts for r in by[name, k]]
        )
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join([*lines, "", *gain_lines(results)]) + "\n"


CEILING_EPS = (0.01, 0.05)


def ceiling(data: FashionEmbedded, pair_counts, seeds, log: Path) -> None:
    """Validation zero-shot accuracy of the CCA teacher: by cosine to the class weights, and by
    its plans (ε* of `CEILING_EPS`) over the unpaired texts and over the class weights."""
    n_classes, n_templates = len(data.classes), len(FASHION_TEMPLATES)
    for n_pairs in pair_counts:
        for seed in seeds:
            parts = fashion_split(data, n_pairs, seed)
            teacher = CCATeacher().fit(parts.paired_images, parts.paired_texts)
            images = F.normalize(teacher.transform_images(parts.val_images).double(), dim=1)
            texts = F.normalize(teacher.transform_texts(parts.unpaired_texts).double(), dim=1)
            prompts = texts[-n_classes * n_templates :].reshape(n_classes, n_templates, -1)
            weights = F.normalize(prompts.mean(1), dim=1)

            def accuracy(scores: torch.Tensor, labels=parts.val_labels) -> float:
                return 100.0 * float((scores.argmax(1) == labels).double().mean())

            result = {
                "label": "plan ceiling",
                "pairs": n_pairs,
                "seed": seed,
                "cosine": accuracy(images @ weights.T),
            }
            for eps in CEILING_EPS:
                options = dict(eps=eps, n_iters=300, backend="cpu")
                plan = sinkhorn(images.float(), texts.float(), **options).plan()[
                    :, -n_classes * n_templates :
                ]
                result[f"plan over texts eps*={eps:g}"] = accuracy(
                    plan.reshape(len(images), n_classes, -1).sum(2)
                )
                result[f"plan over classes eps*={eps:g}"] = accuracy(
                    sinkhorn(images, weights, **options).plan()
                )
            _log(log, result)
            print(json.dumps(result), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", help="comma-separated: final, " + ", ".join(GRIDS))
    parser.add_argument("--pairs", default=None, help="comma-separated (final: 300,1000; grids: 1000)")
    parser.add_argument("--seeds", default=None, help="comma-separated (final: 0,1,2; grids: 0)")
    parser.add_argument("--methods", default=",".join(FINAL), help="final only: comma-separated")
    parser.add_argument("--machine", default="cpu-2core-shared")
    parser.add_argument("--log", type=Path, default=Path("/tmp/sotalign-fashion-zeroshot.jsonl"))
    parser.add_argument(
        "--report", type=Path, nargs="+", default=None, help="only rebuild the table from logs"
    )
    parser.add_argument(
        "--ceiling", action="store_true", help="the teacher's plans as classifiers, no training"
    )
    args = parser.parse_args(argv)
    stem = RESULTS / f"{args.machine}-fashion-zeroshot"
    if args.report:
        results = [json.loads(line) for path in args.report for line in path.read_text().splitlines() if line]
        note = f"Settings: {BASE} with {dict(FINAL)}; no checkpoint selection."
        stem.with_suffix(".md").write_text(markdown(results, args.machine, note))
        return print(stem.with_suffix(".md").read_text())
    if not args.grid and not args.ceiling:
        parser.error("name a GRID (or final), or pass --report or --ceiling")
    final = args.grid == "final"
    pair_counts = [int(p) for p in (args.pairs or ("300,1000" if final else "1000")).split(",")]
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if final else "0")).split(",")]
    runs = (
        [(name, *FINAL[name]) for name in args.methods.split(",")]
        if final
        else [entry for grid in (args.grid or "").split(",") if grid for entry in GRIDS[grid]]
    )
    torch.set_num_threads(1)  # small matrices on a shared 2-core machine
    started = time.perf_counter()
    data = embed_fashion(progress=False, workers=1)
    embed_seconds = time.perf_counter() - started
    print(
        f"features read in {embed_seconds:.0f}s; pool {len(data.train_images) - FASHION_VAL} images",
        flush=True,
    )
    if args.ceiling:
        return ceiling(data, pair_counts, seeds, args.log)
    log = stem.with_suffix(".jsonl") if final else args.log
    for n_pairs in pair_counts:
        for seed in seeds:
            for label, method, overrides in runs:
                result = {"name": label, **run_zero_shot(data, n_pairs, seed, method, **overrides)}
                _log(log, result)
                print(
                    f"{n_pairs:5d} pairs seed {seed} {label:32s} val {result['val']:5.1f} "
                    f"test {result['test']:5.1f} ({result['seconds']:.0f}s + {result['score_seconds']:.0f}s)",
                    flush=True,
                )
    if final:  # the table of every run logged so far (parallel processes append to one log)
        main(["--report", str(log), "--machine", args.machine])


if __name__ == "__main__":
    main()
