"""Kernel demo (``make demo``): one KLOT training step on random features, per backend.

For every backend available here (and for both paths of the ones that have two), it times
a forward + backward KLOT step, measures its peak memory, and compares the loss and the
gradients with the float64 ``reference`` backend. The paper's dense algorithm runs too.

    python -m sotalign.demo [--n 2048] [--m 2048] [--dim 256] [--teacher-dim 128]
"""

from __future__ import annotations

import argparse
import time

import torch

import sotalign
from sotalign.memory import peak_memory
from sotalign.ot.paper import paper_klot_features


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value.double() - expected).norm() / expected.norm())


def klot_step(features, klot_fn):
    """Loss, gradients, seconds and peak bytes of one forward + backward step."""
    x, y, x_teacher, y_teacher = (t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(features))
    with peak_memory() as peak:
        start = time.perf_counter()
        loss = klot_fn(x, y, x_teacher, y_teacher)
        loss.backward()
        seconds = time.perf_counter() - start
    return loss.detach(), x.grad, y.grad, seconds, peak.bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="unpaired images in the batch")
    parser.add_argument("--m", type=int, default=2048, help="unpaired texts in the batch")
    parser.add_argument("--dim", type=int, default=256, help="student feature dimension")
    parser.add_argument("--teacher-dim", type=int, default=128, help="teacher feature dimension")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--eps-teacher", type=float, default=0.01)
    parser.add_argument("--n-iters", type=int, default=100)
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(0)
    shapes = [(args.n, args.dim), (args.m, args.dim), (args.n, args.teacher_dim), (args.m, args.teacher_dim)]
    features = [torch.randn(*shape, generator=generator) for shape in shapes]
    options = dict(eps=args.eps, eps_teacher=args.eps_teacher, n_iters=args.n_iters)

    print(f"KLOT step (forward + backward), n={args.n} m={args.m} d={args.dim} "
          f"teacher d={args.teacher_dim}, eps={args.eps}/{args.eps_teacher}, {args.n_iters} iterations, "
          f"{torch.get_num_threads()} threads")
    print(f"available backends: {', '.join(sotalign.available_backends())}")
    oracle_loss, oracle_gx, oracle_gy, _, _ = klot_step(
        [t.double() for t in features], lambda *t: sotalign.klot(*t, backend="reference", **options))

    runs = {"paper dense torch (fp32)": lambda *t: paper_klot_features(*t, **options)}
    for name in sotalign.available_backends():
        paths = ("dense", "online") if name in ("cpu", "torch") else ("auto",)
        for path in paths:
            runs[f"sotalign {name} {path} (fp32)"] = (
                lambda *t, name=name, path=path: sotalign.klot(*t, backend=name, path=path, **options))
    runs["sotalign auto (fp32)"] = lambda *t: sotalign.klot(*t, **options)

    print(f"{'provider':34s} {'time [s]':>9s} {'peak [MiB]':>11s} {'loss':>12s} "
          f"{'rel.err loss':>13s} {'rel.err grad':>13s}")
    for label, fn in runs.items():
        loss, gx, gy, seconds, peak = klot_step(features, fn)
        grad_error = max(relative_error(gx, oracle_gx), relative_error(gy, oracle_gy))
        print(f"{label:34s} {seconds:9.3f} {peak / 2**20:11.1f} {float(loss):12.6f} "
              f"{relative_error(loss, oracle_loss):13.2e} {grad_error:13.2e}")
    print(f"reference loss (float64): {float(oracle_loss):.10f}")


if __name__ == "__main__":
    main()
