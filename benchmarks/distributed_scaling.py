"""Weak scaling and traffic of the global KLOT (sotalign.distributed) on CPU processes.

    python -m benchmarks.distributed_scaling [--worlds 1 2 3 4] [--rows 512] [--dim 64]

launches ``torchrun --nproc-per-node W`` for each W (gloo, one torch thread per rank, rank r
pinned to core r mod #cores) with every rank's shard fixed (n_r = m_r = ``--rows``), and
times one KLOT step (both solves, value, backward) on the ring (``online``) and block-row
(``dense``) paths; the step time is the slowest rank's. It also measures the bytes each rank
sends per Sinkhorn iteration (difference of two solve lengths) against the formulas of
docs/distributed.md. Writes benchmarks/results/<machine>-distributed.{json,md}.

The global problem has W² blocks of n_r×m_r, so with the shard fixed each rank's compute grows
like W: ideal weak scaling is t(W) = W·t(1), and the efficiency reported is W·t(1)/t(W).
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
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def worker(args) -> None:
    import torch.distributed as dist

    import sotalign
    import sotalign.distributed as sd

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    n, d = args.rows, args.dim

    def data():
        return (
            torch.randn(n, d, generator=g),
            torch.randn(n, d, generator=g),
            torch.randn(n, d // 2, generator=g),
            torch.randn(n, d // 2, generator=g),
        )

    x, y, x_t, y_t = data()
    rows = []
    for path in args.paths:

        def step(path=path):
            xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            sd.klot(xs, ys, x_t, y_t, n_iters=args.iters, path=path).backward()

        step()  # warm-up
        times, blocked = [], []
        for _ in range(args.repeats):
            dist.barrier()
            sd.traffic.reset()
            start = time.perf_counter()
            step()
            # this rank's step time and its time blocked in transfers and collectives
            elapsed = torch.tensor(
                [time.perf_counter() - start, sum(sd.traffic.seconds.values())], dtype=torch.float64
            )
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed[0]))
            blocked.append(float(elapsed[1]))
        per_iter = []
        for iters in (2, 2 + args.iters):
            sd.traffic.reset()
            sd.sinkhorn(x, y, n_iters=iters, path=path, symmetric=False)
            per_iter.append(sd.traffic.total)
        sent = torch.tensor([(per_iter[1] - per_iter[0]) / args.iters], dtype=torch.float64)
        dist.all_reduce(sent)  # all ranks together
        best = min(range(len(times)), key=times.__getitem__)
        rows.append(
            {
                "world": world,
                "path": path,
                "step_s": times[best],
                "step_s_all": times,
                "blocked_s": blocked[best],
                "bytes_per_iter_all_ranks": float(sent),
            }
        )
    if world == 1 and rank == 0:

        def single():
            xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            sotalign.klot(xs, ys, x_t, y_t, n_iters=args.iters).backward()

        single()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            single()
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "world": 1,
                "path": "single-process sotalign.klot",
                "step_s": min(times),
                "step_s_all": times,
                "blocked_s": 0.0,
                "bytes_per_iter_all_ranks": 0.0,
            }
        )
    if rank == 0:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


def formula(path: str, world: int, rows: int, dim: int) -> float:
    """Bytes sent per Sinkhorn iteration by all ranks together (fp32), equal shards."""
    n = m = world * rows
    if path == "online":
        return (world - 1) * (n + m) * (dim + 1) * 4
    # two all-reduces of the m column partials (max, then the shifted sums), 2·2(W−1)/W·m per rank
    return world * 2 * 2 * (world - 1) / world * m * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--rows", type=int, default=512, help="rows and columns per rank")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", default=["online", "dense"])
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    # Imported here: the workers run this file as a script, outside the package.
    from benchmarks.machine import local_machine, machine_slug

    machine = machine_slug(local_machine())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        for world in args.worlds:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={world}",
                __file__,
                "--worker",
                "--out",
                str(out),
                "--rows",
                str(args.rows),
                "--dim",
                str(args.dim),
                "--iters",
                str(args.iters),
                "--repeats",
                str(args.repeats),
                "--paths",
                *args.paths,
            ]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        if row["path"] in ("online", "dense"):
            row["bytes_formula"] = formula(row["path"], row["world"], args.rows, args.dim)
    config = {
        "rows_per_rank": args.rows,
        "dim": args.dim,
        "teacher_dim": args.dim // 2,
        "n_iters": args.iters,
        "repeats": args.repeats,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{machine}-distributed.json").write_text(
        json.dumps({"config": config, "rows": rows}, indent=1)
    )
    (RESULTS / f"{machine}-distributed.md").write_text(markdown(config, rows))
    print(markdown(config, rows))


def markdown(config: dict, rows: list[dict]) -> str:
    base = {r["path"]: r["step_s"] for r in rows if r["world"] == 1}
    lines = [
        "# Global KLOT across CPU processes (sotalign.distributed, gloo)",
        "",
        f"Weak scaling: every rank holds n_r = m_r = {config['rows_per_rank']} rows and columns, "
        f"d = {config['dim']} (teacher {config['teacher_dim']}), {config['n_iters']} Sinkhorn "
        f"iterations per solve, fp32, backend `cpu`; one KLOT step = both solves, the value and "
        f"the backward, best of {config['repeats']}, slowest rank. One torch thread per rank, "
        f"rank r pinned to core r mod {config['cores']}. {config['date']}, torch {config['torch']}; "
        f"1-minute load average after the run: {config['load_average_1min_after']}.",
        "",
        f"**Caveat: this machine has {config['cores']} cores, shared with other jobs.** From 3 "
        "ranks on, ranks share cores, so the times above 2 ranks measure oversubscription as "
        "much as the algorithm. The global problem has W² blocks, so each rank's compute "
        "grows like W: ideal weak scaling is t(W) = W·t(1); efficiency = W·t(1)/t(W). "
        "'Blocked' is the slowest rank's time inside transfer waits and collectives during the "
        "step: communication not hidden behind compute, plus waiting for slower ranks.",
        "",
        "| ranks | path | step (s) | efficiency | blocked in communication (s) | "
        "bytes / iteration, all ranks: measured | formula |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ideal = r["world"] * base.get(r["path"], float("nan"))
        efficiency = f"{ideal / r['step_s']:.2f}" if r["path"] in base else ""
        formula_text = f"{r['bytes_formula']:,.0f}" if "bytes_formula" in r else ""
        lines.append(
            f"| {r['world']} | {r['path']} | {r['step_s']:.3f} | {efficiency} | "
            f"{r['blocked_s']:.3f} | {r['bytes_per_iter_all_ranks']:,.0f} | {formula_text} |"
        )
    lines += [
        "",
        "Formulas (fp32, W ranks, n = m = W·n_r): ring (online) (W − 1)·(n + m)·(d + 1)·4 "
        "bytes; block row (dense) 4·(W − 1)·m·4 bytes (two all-reduces of the column partials, "
        "counted as ring all-reduces).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
