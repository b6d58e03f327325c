"""What the CPU and GPU harnesses share: smoke mode, the seeded problems, and the sotalign
route a timed call took (read off its result, or computed by the public dispatch rule)."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from sotalign import DEFAULT_MEMORY_BUDGET, SinkhornResult
from sotalign.ot.dispatch import choose_route

#: ``SOTALIGN_BENCH_SMOKE=1`` shrinks every shape so a suite runs in seconds (CI smoke test).
SMOKE = os.environ.get("SOTALIGN_BENCH_SMOKE") == "1"


@dataclass(frozen=True)
class Problem:
    """Student features x (n×d), y (m×d) and teacher features of the same rows (d_t wide)."""

    x: torch.Tensor
    y: torch.Tensor
    x_teacher: torch.Tensor
    y_teacher: torch.Tensor


@functools.lru_cache(maxsize=4)
def make_problem(
    n: int, m: int, d: int, d_teacher: int, seed: int = 0, device: torch.device | str = "cpu"
) -> Problem:
    """Seeded fp32 features with some shared structure (row i of x resembles row i of y).

    Both sides mix a common latent code with independent noise, so the cosine affinities
    and the plans are not those of pure noise; the teacher is a random projection of it.
    The numbers depend on the device's generator (the CPU ones are those of the CPU suites).
    """
    gen = torch.Generator(device).manual_seed(seed)
    k = max(n, m)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    latent = randn(k, d)
    x = latent[:n] + 0.7 * randn(n, d)
    y = latent[:m] + 0.7 * randn(m, d)
    proj = randn(d, d_teacher) / math.sqrt(d)
    x_t = x @ proj + 0.3 * randn(n, d_teacher)
    y_t = y @ proj + 0.3 * randn(m, d_teacher)
    return Problem(x.contiguous(), y.contiguous(), x_t.contiguous(), y_t.contiguous())


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (cosine affinity = dot product of unit rows)."""
    return torch.nn.functional.normalize(t, dim=1)


def klot_route(x: torch.Tensor, x_teacher: torch.Tensor, n_columns: int, backend: str, path: str) -> dict:
    """The backend and path :func:`sotalign.klot` takes for these features: both solves run on
    one route, sized for two stored n×m matrices and the smaller of the two feature dimensions."""
    feature_dim = min(x.shape[1], x_teacher.shape[1])
    route = choose_route(
        backend, path, x.device, x.shape[0], n_columns, feature_dim, x.dtype, 2, DEFAULT_MEMORY_BUDGET
    )
    return {"backend": route.backend.name, "path": route.path}


def route_info(result, route: dict | None) -> dict:
    """``backend``/``path`` of the sotalign route of a call: as given (``route``), else read off
    a :class:`~sotalign.SinkhornResult`; empty for the peers."""
    if route is not None:
        return route
    if isinstance(result, SinkhornResult):
        return {"backend": result.backend, "path": result.path}
    return {}
