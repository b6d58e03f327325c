"""Peak extra memory of ``sotalign.sinkhorn_divergence`` forward + backward on the online path,
in a fresh process (so nothing earlier in a benchmark session is counted).

    python -m benchmarks.ot_memory --n 100000 --d 64 --n-iters 2     # prints one JSON line

The peak is the kernel's exact peak resident set (VmHWM, reset just before the call by
:func:`sotalign.memory.peak_memory`) above the resident set once the inputs exist, not a
sampled one. What the solve keeps is O((n + m)·d) whatever the iteration count, so a small
``--n-iters`` measures the memory of a full solve at a fraction of its time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

import torch

import sotalign
from sotalign.memory import peak_memory


def measure(n: int, d: int, eps: float, n_iters: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=gen) / d**0.5).requires_grad_()
    y = (torch.randn(n, d, generator=gen) / d**0.5 + 0.1).requires_grad_()
    # A warm-up solve first: loading the extension and starting the thread pool touch memory once.
    small = torch.randn(64, d, requires_grad=True)
    sotalign.sinkhorn_divergence(small, small.detach() + 0.1, eps, n_iters=1, path="online").backward()
    with peak_memory() as peak:
        start = time.perf_counter()
        value = sotalign.sinkhorn_divergence(x, y, eps, n_iters=n_iters, path="online")
        value.backward()
        seconds = time.perf_counter() - start
    return {
        "n": n,
        "d": d,
        "eps": eps,
        "n_iters": n_iters,
        "peak_extra_bytes": peak.bytes,
        "input_bytes": 2 * x.numel() * x.element_size(),
        "seconds": seconds,
        "finite": all(bool(torch.isfinite(t).all()) for t in (value, x.grad, y.grad)),
    }


def measure_in_subprocess(n: int, d: int, eps: float, n_iters: int, timeout: float) -> dict:
    """:func:`measure` in a fresh Python process (its JSON line)."""
    command = [sys.executable, "-m", "benchmarks.ot_memory", f"--n={n}", f"--d={d}", f"--eps={eps}"]
    done = subprocess.run(
        [*command, f"--n-iters={n_iters}"], capture_output=True, text=True, timeout=timeout, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    warnings.simplefilter("ignore", RuntimeWarning)  # a few iterations do not converge, on purpose
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--n-iters", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.d, args.eps, args.n_iters)))


if __name__ == "__main__":
    main()
