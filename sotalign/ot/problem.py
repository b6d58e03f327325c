r"""The OT problem as the kernels see it: costs folded into an affinity, marginals, the value.

**Costs.** Every cost is an affinity K = −C + c₀ plus biases that fold into the potentials,
so one kernel family (streaming LSE over K = x yᵀ, or a stored K) serves all of them:

============== ======================= ============================== ========================
``cost``       C_ij                    K the kernels read (``work``)  folded row / column bias
============== ======================= ============================== ========================
"sqeuclidean"  ‖x_i − y_j‖² (POT's)    (2x)·y                         ‖x_i‖², ‖y_j‖²
"cosine"       1 − cos(x_i, y_j)       x̂·ŷ (unit rows)                ½, ½ (c₀ = 1)
"dot"          −x_i·y_j                x·y                            0, 0
============== ======================= ============================== ========================

i.e. −C_ij = K_work_ij − u_i − v_j with u, v the row and column offsets above. The solver
works with *kernel potentials* f', g' (log P = (f' + g' + K_work)/ε); the cost potentials are
f = f' + u, g = g' + v (log P = (f + g − C)/ε), and POT's dual potentials f̂ = f − ε log a,
ĝ = g − ε log b (P = a bᵀ ∘ exp((f̂ ⊕ ĝ − C)/ε)). ``sinkhorn`` returns the potentials in the
units of the affinity −C + c₀ (cos for "cosine", x·y for "dot", −‖x − y‖² for
"sqeuclidean"), as it always has.

**Marginals.** The problem solved is, with ρ = ``reg_m`` (∞: exact marginal),

    OT_ε(a, b) = min_P ⟨P, C⟩ + ε KL(P ‖ a⊗b) + ρ_a KL(P1 ‖ a) + ρ_b KL(Pᵀ1 ‖ b)

(KL(p ‖ q) = Σ p log(p/q) − p + q). Its Sinkhorn update is the balanced one scaled by
τ = ρ/(ρ + ε) (Séjourné et al. 2019): f̂ = −τ ε LSE_j[log b_j + (ĝ_j − C_ij)/ε]. In kernel
potentials that is f' = τ ε (log w − LSE_j[(K_work + g')/ε]) with the effective log weights
log w = (ε log a + (τ − 1) u)/(τ ε) (log a itself when τ = 1), which is the kernels'
``row_update(K, g', ε, log w, τ)``. A weight of zero has log a = −inf: its row gets zero mass.

**Value** (read off the potentials, the dual of the problem above; equal to the primal at
the optimum):

    OT_ε = Σ_i a_i φ_a(f̂_i) + Σ_j b_j φ_b(ĝ_j) − ε (m(P) − m(a) m(b)),
    φ(t) = t (ρ = ∞),  ρ (1 − e^{−t/ρ}) (ρ < ∞),

with m(·) the total mass; for balanced problems of mass one the last term vanishes at the
optimum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Affinity, Backend
from . import validation

COSTS = ("sqeuclidean", "cosine", "dot")
#: c₀ of K = −C + c₀, the affinity in whose units ``sinkhorn`` reports potentials.
AFFINITY_CONSTANT = {"sqeuclidean": 0.0, "cosine": 1.0, "dot": 0.0}


def check_cost(cost) -> str:
    if not isinstance(cost, str):
        raise TypeError(f"cost must be a string, got {type(cost).__name__}")
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; expected one of {COSTS}")
    return cost


def cost_features(cost: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The features whose dot product the cost is made of: unit rows for "cosine", else x, y.
    Differentiable (autograd takes the normalisation's chain rule)."""
    if cost == "cosine":
        return validation.unit_rows(x), validation.unit_rows(y)
    return x, y


def work_affinity(cost: str, x: Tensor, y: Tensor) -> Affinity:
    """K_work from the cost features (see the module table)."""
    return Affinity.from_features(2 * x if cost == "sqeuclidean" else x, y)


def offsets(cost: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(u, v): −C_ij = K_work_ij − u_i − v_j, from the cost features."""
    if cost == "sqeuclidean":
        return x.square().sum(-1), y.square().sum(-1)
    half = AFFINITY_CONSTANT[cost] / 2
    return x.new_full(x.shape[:-1], half), y.new_full(y.shape[:-1], half)


def check_reg_m(reg_m) -> tuple[float, float]:
    """``reg_m`` as (ρ_a, ρ_b): None is (∞, ∞), balanced; a number is both sides."""
    if reg_m is None:
        return math.inf, math.inf
    pair = tuple(reg_m) if isinstance(reg_m, tuple | list) else (reg_m, reg_m)
    if len(pair) != 2:
        raise ValueError(f"reg_m must be None, a number or a pair of numbers, got {reg_m!r}")
    checked = []
    for side, value in zip("ab", pair, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"reg_m for {side} must be a number, got {type(value).__name__}")
        if not value > 0:  # also refuses NaN
            raise ValueError(f"reg_m must be > 0 (float('inf') for an exact marginal), got {value}")
        checked.append(float(value))
    return checked[0], checked[1]


def normalised_weights(
    name: str, w: Tensor | None, shape: tuple[int, ...], balanced: bool, like: Tensor
) -> Tensor:
    """The weights of one side: uniform of mass one when None; checked (non-negative, finite,
    positive total per problem) and, for a balanced problem, scaled to mass one."""
    if w is None:
        return like.new_full(shape, 1.0 / shape[-1])
    w = validation.check_weights(name, w, shape, like.dtype, like.device)
    return w / w.sum(-1, keepdim=True) if balanced else w


def log_weights(w: Tensor) -> Tensor:
    """log w with −inf for zero weights (no warning, no NaN)."""
    return torch.where(w > 0, w.log(), -math.inf)


@dataclass(frozen=True)
class Marginal:
    """One side of a problem: its weights, how hard its marginal is enforced, its offset."""

    weights: Tensor
    #: ρ; ``math.inf`` for an exact marginal.
    reach: float
    #: u (rows) or v (columns): the cost potential is the kernel potential plus this.
    offset: Tensor

    @functools.cached_property
    def log_weights(self) -> Tensor:
        """log w, computed once: every half-step reads it."""
        return log_weights(self.weights)

    def scale(self, eps: float) -> float:
        """τ = ρ/(ρ + ε) (1 for an exact marginal)."""
        return 1.0 if math.isinf(self.reach) else self.reach / (self.reach + eps)

    def update_weights(self, eps: float) -> tuple[Tensor, float]:
        """(log w, τ) of the kernels' update at this ε (see the module docstring)."""
        tau = self.scale(eps)
        if tau == 1.0:
            return self.log_weights, 1.0
        return (eps * self.log_weights + (tau - 1.0) * self.offset) / (tau * eps), tau

    def update_from_lse(self, lse: Tensor, eps: float) -> Tensor:
        """The update τ ε (log w − LSE) from an LSE pass already made."""
        log_w, tau = self.update_weights(eps)
        return (tau * eps) * (log_w - lse)

    def fixed_point_mass(self, potential_next: Tensor, eps: float) -> Tensor:
        """The marginal that the update which produced ``potential_next`` makes exact: a for
        an exact marginal, and for a relaxed one exp(log w + f'(1 − 1/τ)/ε)."""
        log_w, tau = self.update_weights(eps)
        if tau == 1.0:
            return self.weights
        return torch.exp(log_w + potential_next * ((1.0 - 1.0 / tau) / eps))

    def phi(self, t: Tensor) -> Tensor:
        """φ of the dual value: t for an exact marginal, ρ (1 − e^{−t/ρ}) for a relaxed one."""
        return t if math.isinf(self.reach) else self.reach * -torch.expm1(-t / self.reach)


def _sum_here(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Problem:
    """What the Sinkhorn loop solves: a kernel ``backend`` over the affinity ``K`` it reads,
    and the two marginals. ``sum_over_ranks`` adds a per-rank device tensor over the ranks of
    a distributed solve (identity in one process): the stopping test is global;
    ``own_columns`` keeps this rank's share of a column quantity that every rank holds whole
    (the distributed block-row solver), so that the sum over ranks counts each column once."""

    backend: Backend
    K: Affinity
    rows: Marginal
    cols: Marginal
    sum_over_ranks: Callable[[Tensor], Tensor] = _sum_here
    own_columns: Callable[[Tensor], Tensor] = _sum_here

    def row_update(self, g: Tensor, eps: float) -> Tensor:
        log_w, tau = self.rows.update_weights(eps)
        return self.backend.row_update(self.K, g, eps, log_w, tau)

    def column_update(self, f: Tensor, eps: float) -> Tensor:
        log_w, tau = self.cols.update_weights(eps)
        return self.backend.column_update(self.K, f, eps, log_w, tau)

    def row_error(self, f: Tensor, f_next: Tensor, eps: float) -> Tensor:
        """‖P1 − r‖₁ per problem, on the device, of the plan (f, g), where f_next is the row
        update from g and r the marginal it makes exact: the row sums of P are
        r_i · exp((f_i − f_next_i)/ε). Zero-weight rows add nothing."""
        target = self.rows.fixed_point_mass(f_next, eps)
        gap = target * torch.expm1((f - f_next) / eps).abs()
        return self.sum_over_ranks(torch.where(target > 0, gap, 0.0).sum(-1))

    def marginal_error(self, f: Tensor, g: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(max(‖P1 − r‖₁, ‖Pᵀ1 − c‖₁) per problem, the total mass of P per problem), from one
        row and one column LSE pass; r, c are the marginals that the updates from (f, g)
        would make exact (a and b for a balanced problem)."""
        lse_rows = self.backend.lse_rows(self.K, g, eps)
        lse_cols = self.backend.lse_cols(self.K, f, eps)
        row_sums = torch.exp(f / eps + lse_rows)
        col_sums = self.own_columns(torch.exp(g / eps + lse_cols))
        row_target = self.rows.fixed_point_mass(self.rows.update_from_lse(lse_rows, eps), eps)
        col_target = self.own_columns(
            self.cols.fixed_point_mass(self.cols.update_from_lse(lse_cols, eps), eps)
        )
        errors = torch.stack([(row_sums - row_target).abs().sum(-1), (col_sums - col_target).abs().sum(-1)])
        return self.sum_over_ranks(errors).amax(0), self.sum_over_ranks(row_sums.sum(-1))

    def dual_value(self, f: Tensor, g: Tensor, eps: float, plan_mass: Tensor) -> Tensor:
        """OT_ε read off the kernel potentials (module docstring), summed in float64, per problem."""
        terms, masses = [], []
        for side, potential, own in ((self.rows, f, _sum_here), (self.cols, g, self.own_columns)):
            hat = (potential + side.offset - eps * side.log_weights).double()
            weights = side.weights.double()
            term = torch.where(weights > 0, weights * side.phi(hat), 0.0)
            terms.append(self.sum_over_ranks(own(term).sum(-1)))
            masses.append(self.sum_over_ranks(own(weights).sum(-1)))
        value = terms[0] + terms[1] - eps * (plan_mass.double() - masses[0] * masses[1])
        return value.to(f.dtype)


@dataclass(frozen=True)
class SelfProblem(Problem):
    """OT_ε(a, a) of one point cloud with itself (the debiasing terms of the divergence), whose
    optimal potentials are equal, f = g. Alternating updates oscillate on such a problem, so
    the loop's row update is the averaged fixed-point step f ← ½ (f + T(f)) (T the update from
    the same side; Feydy et al. 2019) and its column update keeps g = f."""

    def row_update(self, g: Tensor, eps: float) -> Tensor:
        return 0.5 * (g + super().row_update(g, eps))

    def column_update(self, f: Tensor, eps: float) -> Tensor:
        return f


def uniform_problem(backend: Backend, K: Affinity) -> Problem:
    """The balanced problem on K with uniform weights of mass one (a batch: one per problem)."""
    n, m = K.shape
    lead = () if K.batch is None else (K.batch,)
    rows = torch.full((*lead, n), 1.0 / n, dtype=K.dtype, device=K.device)
    cols = torch.full((*lead, m), 1.0 / m, dtype=K.dtype, device=K.device)
    return Problem(
        backend,
        K,
        Marginal(rows, math.inf, torch.zeros_like(rows)),
        Marginal(cols, math.inf, torch.zeros_like(cols)),
    )
