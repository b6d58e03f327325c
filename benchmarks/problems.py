"""The seeded problems every benchmark times, and one KLOT training step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Problem:
    """Student features x (n×d), y (m×d) and teacher features of the same rows (d_t wide)."""

    x: torch.Tensor
    y: torch.Tensor
    x_teacher: torch.Tensor
    y_teacher: torch.Tensor


def make_problem(
    n: int, m: int, d: int, d_teacher: int = 1, seed: int = 0, device: torch.device | str = "cpu"
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


def klot_step(loss_fn, x, y, x_teacher, y_teacher):
    """One forward + backward of ``loss_fn(x, y, x_teacher, y_teacher)``; returns the detached
    value (the gradients land in ``x.grad`` and ``y.grad``, cleared first)."""
    x.grad = y.grad = None
    loss = loss_fn(x, y, x_teacher, y_teacher)
    loss.backward()
    return loss.detach()
