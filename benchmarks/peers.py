"""The peer libraries sotalign is timed against, one wrapper each, on one problem.

The problem (``cost="cosine"``): cosine affinity K between the rows of x (n×d) and y (m×d),
cost −K, uniform marginals of mass one, ``n_iters`` fixed Sinkhorn iterations at a fixed ε,
from the raw features (each solver normalises the rows and forms or streams K itself, inside
the timed call). Every wrapper returns the potentials in sotalign's convention,
``log P_ij = (f_i + g_j + K_ij) / ε`` (:class:`sotalign.SinkhornResult`), so that any two
solvers can be compared (:func:`potential_error`, which removes the constant that (f, g) are
defined up to).

A peer is a :class:`Peer`: its name, the problem it solves (``cost``), the modules it needs,
where it runs, and ``make(eps, n_iters)`` returning the solver ``(x, y) -> (f, g)``. Adding a
problem (another cost) to a library is one more function and one more :data:`PEERS` entry
with its ``cost``; the benchmarks pick the peers of the problem they time.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sotalign.ot.paper import paper_klot_features, paper_sinkhorn

Potentials = tuple[torch.Tensor, torch.Tensor]
Solver = Callable[[torch.Tensor, torch.Tensor], Potentials]


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (the cosine affinity is the dot product of unit rows)."""
    return torch.nn.functional.normalize(t, dim=1)


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense n×m cosine affinity K, as the dense peers form it."""
    return unit_rows(x) @ unit_rows(y).T


@dataclass(frozen=True)
class Peer:
    """One peer solver of one problem.

    ``modules``: what must import for it to run; ``devices``: the device types it is timed on
    (the others are skipped with ``why_not``); ``note``: how it differs from the fixed-ε
    problem, when it does.
    """

    name: str
    modules: tuple[str, ...]
    make: Callable[[float, int], Solver]
    cost: str = "cosine"
    devices: tuple[str, ...] = ("cpu", "cuda")
    why_not: str = ""
    note: str = ""

    def missing(self, device: torch.device) -> str | None:
        """Why this peer is not run on ``device``, or None when it is."""
        if device.type not in self.devices:
            return self.why_not or f"{self.name} runs on {' or '.join(self.devices)} only"
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as error:  # a broken install is a reason, not a crash
                return f"{module} does not import ({type(error).__name__}: {str(error)[:120]})"
        return None


def _paper(compiled: bool) -> Callable[[float, int], Solver]:
    def make(eps: float, n_iters: int) -> Solver:
        def solve(x, y):
            _, u, v = paper_sinkhorn(cosine(x, y), eps, n_iters, compiled=compiled)
            return eps * u, eps * v

        return solve

    return make


def _pot(array: str, cost: str = "cosine") -> Callable[[float, int], Solver]:
    """POT's ``ot.bregman.sinkhorn_log`` on numpy arrays or torch tensors, ``stopThr=0`` so
    that it runs every iteration (it also forms the dense plan every 10 iterations to check
    the marginals: its algorithm as shipped). ``cost="sqeuclidean"``: POT's own ``ot.dist``
    (C = ‖x − y‖²) inside the timed call."""

    def make(eps: float, n_iters: int) -> Solver:
        import ot

        def solve(x, y):
            M = ot.dist(x, y) if cost == "sqeuclidean" else -cosine(x, y)
            if array == "numpy":
                M = M.cpu().numpy()
            n, m = M.shape
            a, b = ot.unif(n, type_as=M), ot.unif(m, type_as=M)
            _, log = ot.bregman.sinkhorn_log(
                a, b, M, eps, numItermax=n_iters, stopThr=0, warn=False, log=True
            )
            f, g = (torch.as_tensor(log[key]) for key in ("log_u", "log_v"))
            return eps * f, eps * g

        return solve

    return make


def _pot_batch(eps: float, n_iters: int) -> Solver:
    """POT's batch solver ``ot.batch.solve_batch(method="log_sinkhorn", tol=0)`` on torch
    tensors x (B, n, d), y (B, m, d), costs from ``ot.batch.dist_batch`` (‖x − y‖²) inside the
    timed call; it checks the marginals every 10 iterations but never stops early at tol=0."""
    import ot.batch

    def solve(x, y):
        M = ot.batch.dist_batch(x, y, metric="sqeuclidean")
        result = ot.batch.solve_batch(M, eps, max_iter=n_iters, tol=0, method="log_sinkhorn", grad="detach")
        u, v = result.potentials
        return eps * u, eps * v

    return solve


def _geomloss_sqeuclidean(backend: str) -> Callable[[float, int], Solver]:
    """GeomLoss ``SamplesLoss("sinkhorn", p=2, backend=...)`` on the squared-Euclidean problem.

    GeomLoss' cost is ½‖x − y‖² and its ε is blur², so ε here is 2·blur² and its potentials
    are halved ones: f = 2F + ε log a. It has no fixed-ε, fixed-iteration mode: it always
    anneals ε from the squared diameter down to blur²; ``n_iters`` sets ``scaling`` so that
    schedule is about ``n_iters`` steps long (the benchmark compares it at equal accuracy).
    """

    def make(eps: float, n_iters: int) -> Solver:

        blur = math.sqrt(eps / 2)

        def solve(x, y):
            both = torch.cat([x, y])
            diameter = float((both.max(0).values - both.min(0).values).norm())
            F, G = _geomloss_potentials(blur, diameter, n_iters, backend, x, y)
            n, m = x.shape[0], y.shape[0]
            return 2 * F.reshape(n) - eps * math.log(n), 2 * G.reshape(m) - eps * math.log(m)

        return solve

    return make


def _geomloss_potentials(blur: float, diameter: float, n_iters: int, backend: str, x, y):
    """GeomLoss' potentials (F, G) of ``SamplesLoss("sinkhorn", p=2)`` at ε = blur², annealed
    from the diameter in about ``n_iters`` steps (its only mode: it has no fixed-ε solve)."""
    import geomloss

    loss = geomloss.SamplesLoss(
        "sinkhorn",
        p=2,
        blur=blur,
        diameter=diameter,
        scaling=(blur / diameter) ** (1.0 / n_iters),
        debias=False,
        potentials=True,
        backend=backend,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loss(x, y)


def _half_squared_euclidean(F: torch.Tensor, G: torch.Tensor, eps: float) -> Potentials:
    """GeomLoss' potentials for the cost ½‖x̂ − ŷ‖² = 1 − K (P = a b exp((F + G − C)/ε)) in
    sotalign's convention: half of the constant 1 − ε log(ab) on each side."""
    n, m = F.shape[-1], G.shape[-1]
    return (
        F.reshape(n) - 0.5 - eps * math.log(n),
        G.reshape(m) - 0.5 - eps * math.log(m),
    )


def _geomloss(eps: float, n_iters: int) -> Solver:
    """GeomLoss ``SamplesLoss("sinkhorn", p=2, backend="online")`` (KeOps) on the unit rows.

    There ε = blur², and GeomLoss always anneals ε from diameter² (4 on unit rows) down to
    blur²; ``scaling`` makes that schedule about ``n_iters`` steps long, so it does about as
    many log-sum-exp passes but only its last steps are at ε.
    """

    def solve(x, y):
        F, G = _geomloss_potentials(math.sqrt(eps), 2.0, n_iters, "online", unit_rows(x), unit_rows(y))
        return _half_squared_euclidean(F, G, eps)

    return solve


def _flash(tf32: bool) -> Callable[[float, int], Solver]:
    """FlashSinkhorn's fixed-ε alternating solver with ``half_cost`` (½‖x − y‖² = 1 − K on
    unit rows, so its plan is the plan of cost −K); ``allow_tf32`` picks its dot precision."""

    def make(eps: float, n_iters: int) -> Solver:
        import flash_sinkhorn

        loss = flash_sinkhorn.SamplesLoss(
            "sinkhorn",
            backend="alternating",
            half_cost=True,
            eps=eps,
            n_iters=n_iters,
            use_epsilon_scaling=False,
            debias=False,
            potentials=True,
            allow_tf32=tf32,
        )

        def solve(x, y):
            F, G = loss(unit_rows(x), unit_rows(y))
            return _half_squared_euclidean(F, G, eps)

        return solve

    return make


_COMPILE_ON_CPU = "torch.compile is timed on CUDA only (on CPU it compiles C++ for minutes)"
_ANNEALS = "anneals ε; n_iters sets the length of its ε-scaling schedule (compare at equal accuracy)"
PEERS = {
    peer.name: peer
    for peer in (
        Peer("paper-dense", (), _paper(compiled=False)),
        Peer("paper-dense-compiled", (), _paper(compiled=True), devices=("cuda",), why_not=_COMPILE_ON_CPU),
        Peer("pot-sinkhorn_log-numpy", ("ot",), _pot("numpy"), devices=("cpu",)),
        Peer("pot-sinkhorn_log", ("ot",), _pot("torch")),
        Peer(
            "geomloss-keops",
            ("geomloss", "pykeops"),
            _geomloss,
            note="anneals ε (ε-scaling from diameter² to ε): not the same fixed-ε problem",
        ),
        Peer(
            "pot-sinkhorn_log-numpy-sqeuclidean",
            ("ot",),
            _pot("numpy", "sqeuclidean"),
            "sqeuclidean",
            ("cpu",),
        ),
        Peer("pot-sinkhorn_log-sqeuclidean", ("ot",), _pot("torch", "sqeuclidean"), "sqeuclidean"),
        Peer("pot-solve_batch-sqeuclidean", ("ot",), _pot_batch, "sqeuclidean", note="batched inputs"),
        Peer(
            "geomloss-keops-sqeuclidean",
            ("geomloss", "pykeops"),
            _geomloss_sqeuclidean("online"),
            "sqeuclidean",
            note=_ANNEALS,
        ),
        Peer(
            "geomloss-tensorized-sqeuclidean",
            ("geomloss",),
            _geomloss_sqeuclidean("tensorized"),
            "sqeuclidean",
            note=_ANNEALS,
        ),
        Peer("flashsinkhorn-fp32", ("flash_sinkhorn",), _flash(tf32=False), devices=("cuda",)),
        Peer("flashsinkhorn-tf32", ("flash_sinkhorn",), _flash(tf32=True), devices=("cuda",)),
    )
}


def paper_klot_loss(eps: float, eps_teacher: float, n_iters: int, compiled: bool = False):
    """The paper's KLOT loss ``(x, y, x_teacher, y_teacher) -> value`` (two dense solves,
    stored plans, surrogate gradient through autograd; ``compiled``: each solve's loop body
    through ``torch.compile``)."""

    def loss(x, y, x_teacher, y_teacher):
        return paper_klot_features(
            x, y, x_teacher, y_teacher, eps=eps, eps_teacher=eps_teacher, n_iters=n_iters, compiled=compiled
        )

    return loss


def potential_error(ours: Potentials, reference: Potentials) -> float:
    """Relative distance between two pairs of potentials, each centred (f − mean f, g − mean g)
    since (f + c, g − c) is the same plan for any c."""

    def centred(pair: Potentials) -> torch.Tensor:
        return torch.cat([(t - t.mean()).double().flatten() for t in pair])

    expected = centred(reference)
    return float((centred(ours) - expected).norm() / expected.norm().clamp_min(1e-300))
