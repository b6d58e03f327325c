"""The trainer at corpus scale: set-up time, seconds per step and memory against the pool size.

    python -m benchmarks.trainer_scaling [--pools 200000 1000000] [--steps 8]

writes sharded unpaired pools (768-d image and 512-d text float16 ``.npy`` shards of 100k rows;
the smaller pool is the first shards of the larger) beside a small paired and validation set,
then runs ``sotalign.fit`` (method sotalign, CPU) in a fresh ``torchrun`` process per case:

* each pool size on 1 rank: set-up time (from opening the data to the first batch read: stage
  1, run directory, checks), seconds per step and the step's shares (``metrics.json``), and the
  peak anonymous memory (``RssAnon``, sampled every 10 ms: memory-mapped store pages are not
  counted, they are the page cache's);
* the largest pool on 2 ranks (gloo, the same global batch).

Every rank has one torch thread.

It also times the whole-store scan (``sotalign check-store``) of each pool, which now only that
command runs: ``fit`` and ``--resume`` used to scan every store before their first step (with a
row-wise test, slower than the scan's sum test). Writes
benchmarks/results/<machine>-trainer-scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SHARD_ROWS = 100_000
IMAGE_DIM, TEXT_DIM = 768, 512


def write_pool(directory: Path, rows: int, dim: int, seed: int) -> None:
    """``rows`` float16 rows of a shared low-rank structure plus noise, in shards of 100k."""
    directory.mkdir(parents=True, exist_ok=True)
    basis = np.random.default_rng(0).standard_normal((16, dim)).astype(np.float32)
    for number, start in enumerate(range(0, rows, SHARD_ROWS)):
        rng = np.random.default_rng([seed, number])
        n = min(SHARD_ROWS, rows - start)
        block = rng.standard_normal((n, 16), dtype=np.float32) @ basis
        block += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        np.save(directory / f"part{number:03d}.npy", block.astype(np.float16))


def prepare_data(root: Path, pools: list[int]) -> dict[int, dict[str, str]]:
    """The paired and validation stores, and one directory of shards per pool size and modality
    (the smaller pools link to the first shards of the largest)."""
    largest = max(pools)
    for name, dim, seed in (("images", IMAGE_DIM, 1), ("texts", TEXT_DIM, 2)):
        write_pool(root / f"pool-{largest}" / name, largest, dim, seed)
        paired = np.load(root / f"pool-{largest}" / name / "part000.npy", mmap_mode="r")
        np.save(root / f"paired_{name}.npy", np.asarray(paired[:2000]))
        np.save(root / f"val_{name}.npy", np.asarray(paired[2000:2500]))
    layouts = {}
    for pool in pools:
        for name in ("images", "texts"):
            directory = root / f"pool-{pool}" / name
            if pool != largest:
                directory.mkdir(parents=True, exist_ok=True)
                for number in range(-(-pool // SHARD_ROWS)):
                    shard = f"part{number:03d}.npy"
                    (directory / shard).symlink_to(root / f"pool-{largest}" / name / shard)
        layouts[pool] = {
            "paired_images": str(root / "paired_images.npy"),
            "paired_texts": str(root / "paired_texts.npy"),
            "val_images": str(root / "val_images.npy"),
            "val_texts": str(root / "val_texts.npy"),
            "unpaired_images": str(root / f"pool-{pool}" / "images"),
            "unpaired_texts": str(root / f"pool-{pool}" / "texts"),
        }
    return layouts


class AnonymousPeak:
    """The largest ``RssAnon`` of this process seen by a thread sampling every 10 ms."""

    def __init__(self):
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now_kib() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

    def _sample(self):
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.now_kib())
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.now_kib())


def worker(args) -> None:
    from sotalign.align import AlignmentData, DataSpec, TrainConfig, fit, trainer

    torch.set_num_threads(1)  # one core per rank: a fair 1 against 2 ranks on a shared machine
    layout = json.loads(args.layout)
    config = TrainConfig(
        method="sotalign",
        steps=args.steps,
        out_dim=256,
        paired_batch_size=512,
        unpaired_batch_size=args.batch,
        n_iters=20,
        eval_every=10_000,
        checkpoint_every=10_000,
        device="cpu",
    )
    first_read: list[float] = []
    read = trainer.BatchSource.read

    def timed_read(self, step):
        if not first_read:
            first_read.append(time.perf_counter())
        return read(self, step)

    trainer.BatchSource.read = timed_read
    with AnonymousPeak() as peak:
        started = time.perf_counter()
        data = AlignmentData.from_spec(DataSpec(**layout))
        fit(config, data, args.run_dir, progress=False)
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "setup_s": round(first_read[0] - started, 3),
        "peak_anon_mib": round(peak.peak_kib / 1024, 1),
    }
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")


def run_case(layout: dict, pool: int, world: int, args, root: Path) -> dict:
    case = f"{pool}-{world}"
    run, out = root / f"run-{case}", root / f"ranks-{case}.jsonl"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc-per-node={world}",
        __file__,
        "--worker",
        *("--layout", json.dumps(layout), "--run-dir", str(run), "--out", str(out)),
        *("--steps", str(args.steps), "--batch", str(args.batch)),
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads(line) for line in out.read_text().splitlines()]
    timing = json.loads((run / "metrics.json").read_text())["timing"]
    return {
        "pool_rows": pool,
        "ranks": world,
        "setup_s": max(r["setup_s"] for r in ranks),
        "seconds_per_step": timing["seconds_per_step"],
        "unpaired_rows_per_second": timing["unpaired_rows_per_second"],
        "shares": timing["shares"],
        "prefetch": timing["prefetch"],
        "peak_anon_mib_per_rank": max(r["peak_anon_mib"] for r in ranks),
    }


def scan_seconds(layout: dict, root: Path) -> float:
    """The whole-store scan of both unpaired pools (its outcome kept in a scratch cache)."""
    from sotalign.data import open_store, scan

    scan.SCANS = root / "scans"
    started = time.perf_counter()
    for name in ("unpaired_images", "unpaired_texts"):
        scan.scan_store(open_store(layout[name]), rescan=True)
    return round(time.perf_counter() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024, help="unpaired rows per step, each modality")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    # Imported here: the workers run this file as a script, outside the package.
    from benchmarks.machine import local_machine, machine_slug

    machine = machine_slug(local_machine())
    rows, scans = [], {}
    with tempfile.TemporaryDirectory(prefix="trainer-scaling-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        layouts = prepare_data(root, args.pools)
        written = round(time.perf_counter() - started, 1)
        for pool in args.pools:
            rows.append(run_case(layouts[pool], pool, 1, args, root))
        largest = max(args.pools)
        rows.append(run_case(layouts[largest], largest, 2, args, root))
        for pool in args.pools:
            scans[str(pool)] = scan_seconds(layouts[pool], root)
    config = {
        "image_dim": IMAGE_DIM,
        "text_dim": TEXT_DIM,
        "dtype": "float16",
        "shard_rows": SHARD_ROWS,
        "paired": 2000,
        "val": 500,
        "unpaired_batch": args.batch,
        "paired_batch": 512,
        "out_dim": 256,
        "n_iters": 20,
        "steps": args.steps,
        "pools_written_s": written,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    }
    result = {"config": config, "runs": rows, "whole_pool_scan_s": scans}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{machine}-trainer-scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{machine}-trainer-scaling.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    config, runs, scans = result["config"], result["runs"], result["whole_pool_scan_s"]
    lines = [
        "# The trainer at corpus scale (benchmarks/trainer_scaling.py)",
        "",
        f"`sotalign.fit` (sotalign, CPU) on unpaired pools of {config['image_dim']}-d image and "
        f"{config['text_dim']}-d text {config['dtype']} `.npy` shards of {config['shard_rows']:,} rows; "
        f"{config['paired']} pairs, {config['val']} validation pairs, {config['unpaired_batch']} unpaired "
        f"rows per modality and step, {config['paired_batch']} pairs per step, {config['out_dim']}-d heads, "
        f"{config['n_iters']} Sinkhorn iterations, {config['steps']} steps (the first is not timed), "
        "one torch thread per rank. "
        f"{config['date']}, torch {config['torch']}, {config['cores']} cores shared with other jobs; "
        f"1-minute load average after the run: {config['load_average_1min_after']}.",
        "",
        "Set-up: from opening the data to the first batch read (stage 1, run directory, checks). "
        "Peak anonymous memory: the largest `RssAnon` of a rank, sampled every 10 ms (memory-mapped "
        "store pages are the page cache's, not the process's). Whole-pool scan: `sotalign check-store` "
        "of both unpaired pools (page cache warm: the pools were just written). Before, every `fit` and "
        "`--resume` scanned the stores before its first step, with a slower row-wise test.",
        "",
        "| pool rows | ranks | set-up (s) | s/step | unpaired rows/s | load | teacher "
        "| KLOT fwd | KLOT bwd | update | prefetch | peak anon MiB/rank | whole-pool scan (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        s = r["shares"]
        lines.append(
            f"| {r['pool_rows']:,} | {r['ranks']} | {r['setup_s']:.2f} | "
            f"{r['seconds_per_step']:.3f} | {r['unpaired_rows_per_second']:,.0f} | {s['load']:.1%} | "
            f"{s['teacher']:.1%} | {s['klot_forward']:.1%} | {s['klot_backward']:.1%} | {s['update']:.1%} | "
            f"{'yes' if r['prefetch'] else 'no'} | {r['peak_anon_mib_per_rank']:,.0f} | "
            f"{scans[str(r['pool_rows'])]} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
