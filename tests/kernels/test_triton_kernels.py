"""What only the ``triton`` backend has, against the float64 ``reference`` oracle: split
reductions, the fused half-step epilogue (with τ), batches in one launch with zero weights
(padding, −inf biases), the precision flags and their resident rows, the fp16 split, the
autotuner's keys; and one run each through the Sinkhorn loop and the KLOT autograd functions.
The plain primitives on both paths are the conformance suite's (test_conformance.py).

Without CUDA the kernels run on CPU in Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before the kernels are defined (triton.jit reads it when a kernel is
decorated, and the backend defines its kernels on first import). With CUDA the same tests
run compiled, on the GPU. Shapes are small, rectangular and not multiples of the tiles
(32 × 32, d in chunks of 16 under the interpreter), so every mask is exercised.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.zeros, InterpretedFunction):
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set, so its language "
            "helpers are compiled-mode; set TRITON_INTERPRET=1 in the environment "
            "(or in conftest.py) to run these tests in the same session",
            allow_module_level=True,
        )

from conftest import relative_error  # noqa: E402

import sotalign  # noqa: E402
from sotalign.kernels.base import Affinity  # noqa: E402
from sotalign.kernels.reference import ReferenceBackend  # noqa: E402
from sotalign.ot.options import SolverOptions  # noqa: E402
from sotalign.ot.problem import uniform_problem  # noqa: E402
from sotalign.ot.sinkhorn import solve  # noqa: E402

KERNEL_MODULES = [
    "sotalign.kernels.triton",
    "sotalign.kernels.triton.tiles",
    "sotalign.kernels.triton.lse",
    "sotalign.kernels.triton.plan",
    "sotalign.kernels.triton.backend",
]


def _triton_package():
    """The backend package with kernels defined in the right mode, even if another test
    module imported it before TRITON_INTERPRET was set."""
    package = importlib.import_module("sotalign.kernels.triton")
    tiles = sys.modules.get("sotalign.kernels.triton.tiles")
    if package.INTERPRETER == CUDA or (tiles is not None and tiles.INTERPRETING == CUDA):
        for name in KERNEL_MODULES:
            sys.modules.pop(name, None)
        package = importlib.import_module("sotalign.kernels.triton")
    return package


triton_package = _triton_package()
TritonBackend = triton_package.TritonBackend
DEVICE = torch.device("cuda" if CUDA else "cpu")
REFERENCE = ReferenceBackend()
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
#: (n, m, d, teacher d): one tile and several, tall and wide, d not a power of two.
SHAPES = [(37, 53, 20, 12), (5, 200, 20, 33), (130, 17, 40, 7)]
SHAPE_IDS = ["37x53", "5x200", "130x17"]
EPS, EPS_TEACHER = 0.05, 0.01


def unit_rows(rows: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1)


def problem(n, m, d, d_teacher, seed=0):
    """Cosine features of a student and a teacher, and converged fp64 potentials of both."""
    x, y = unit_rows(n, d, seed), unit_rows(m, d, seed + 1)
    x_t = torch.nn.functional.normalize(unit_rows(n, d_teacher, seed + 2) + 0.5 * x[:, :1], dim=1)
    y_t = torch.nn.functional.normalize(unit_rows(m, d_teacher, seed + 3) + 0.5 * y[:, :1], dim=1)
    K, K_t = Affinity.from_features(x, y), Affinity.from_features(x_t, y_t)
    student = solve(uniform_problem(REFERENCE, K), EPS, SolverOptions(n_iters=50))
    teacher = solve(uniform_problem(REFERENCE, K_t), EPS_TEACHER, SolverOptions(n_iters=50))
    return dict(x=x, y=y, x_t=x_t, y_t=y_t, f=student.f, g=student.g, f_t=teacher.f, g_t=teacher.g)


def log_uniform(size: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full((size,), -math.log(size), dtype=dtype, device=device)


@pytest.fixture(scope="module", params=SHAPES, ids=SHAPE_IDS)
def case(request):
    return problem(*request.param, seed=sum(request.param))


def cast(case: dict, dtype) -> dict:
    return {key: value.to(dtype=dtype, device=DEVICE) for key, value in case.items()}


def affinities(t: dict, dense: bool, dense_teacher: bool):
    K, K_t = Affinity.from_features(t["x"], t["y"]), Affinity.from_features(t["x_t"], t["y_t"])
    return (K.materialize() if dense else K), (K_t.materialize() if dense_teacher else K_t)


def check(value: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    assert value.dtype == dtype
    assert bool(torch.isfinite(value).all())
    assert relative_error(value.cpu(), expected) < TOLERANCE[dtype]


# ---------------------------------------------------------------------- split reductions
# The plain primitives (one split) on both paths are the conformance suite's
# (tests/kernels/test_conformance.py); here: what only this backend has.


@DTYPES
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_split_reductions_match_reference(case, dense, dtype):
    """Columns shared out over several programs per row block: partial LSEs combined by a
    logsumexp (lse_*) or by the update kernel (the half-steps, with τ ≠ 1), partial plan
    products and weighted sums added up."""
    n, m = case["x"].shape[0], case["y"].shape[0]
    reference_K, reference_K_t = affinities(case, dense, False)
    t = cast(case, dtype)
    K, K_t = affinities(t, dense, False)
    backend = TritonBackend(splits=3)
    f, g = case["f"], case["g"]
    log_a = torch.linspace(-4.0, -3.0, n, dtype=torch.float64)
    check(backend.lse_rows(K, t["g"], EPS), REFERENCE.lse_rows(reference_K, g, EPS), dtype)
    check(backend.lse_cols(K, t["f"], EPS), REFERENCE.lse_cols(reference_K, f, EPS), dtype)
    check(
        backend.row_update(K, t["g"], EPS, log_a.to(dtype=dtype, device=DEVICE), 0.8),
        REFERENCE.row_update(reference_K, g, EPS, log_a, 0.8),
        dtype,
    )
    V = unit_rows(m, 21, 7) * m
    U = unit_rows(n, 5, 8) * n
    check(
        backend.plan_matmul(K, t["f"], t["g"], EPS, V.to(dtype=dtype, device=DEVICE)),
        REFERENCE.plan_matmul(reference_K, f, g, EPS, V),
        dtype,
    )
    check(
        backend.plan_t_matmul(K, t["f"], t["g"], EPS, U.to(dtype=dtype, device=DEVICE)),
        REFERENCE.plan_t_matmul(reference_K, f, g, EPS, U),
        dtype,
    )
    check(
        backend.plan_inner(K, t["f"], t["g"], EPS, K_t),
        REFERENCE.plan_inner(reference_K, f, g, EPS, reference_K_t),
        dtype,
    )


@DTYPES
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_split_klot_primitives_match_reference(dense, dtype):
    case = problem(37, 53, 20, 12, seed=90)
    reference = affinities(case, dense, dense)
    t = cast(case, dtype)
    K, K_t = affinities(t, dense, dense)
    args = (K, t["f"], t["g"], EPS, K_t, t["f_t"], t["g_t"], EPS_TEACHER)
    reference_args = (
        reference[0],
        case["f"],
        case["g"],
        EPS,
        reference[1],
        case["f_t"],
        case["g_t"],
        EPS_TEACHER,
    )
    backend = TritonBackend(splits=2)
    check(backend.klot_value(*args), REFERENCE.klot_value(*reference_args), dtype)
    if not dense:
        for value, expected in zip(
            backend.klot_grad_features(*args), REFERENCE.klot_grad_features(*reference_args), strict=True
        ):
            check(value, expected, dtype)


@DTYPES
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_fused_epilogue_matches_reference(dense, dtype):
    """row_update / column_update in one launch: the LSE kernel writes τ ε (log w − LSE)."""
    case = problem(37, 53, 20, 12, seed=17)
    reference_K, _ = affinities(case, dense, False)
    t = cast(case, dtype)
    K, _ = affinities(t, dense, False)
    log_a = torch.linspace(-4.0, -3.0, 37, dtype=torch.float64)
    log_b = torch.linspace(-3.5, -4.5, 53, dtype=torch.float64)
    backend = TritonBackend()
    for scale in (1.0, 0.6):
        f = backend.row_update(K, t["g"], EPS, log_a.to(dtype=dtype, device=DEVICE), scale)
        g = backend.column_update(K, t["f"], EPS, log_b.to(dtype=dtype, device=DEVICE), scale)
        check(f, REFERENCE.row_update(reference_K, case["g"], EPS, log_a, scale), dtype)
        check(g, REFERENCE.column_update(reference_K, case["f"], EPS, log_b, scale), dtype)


# ---------------------------------------------------------------------- batches, zero weights

#: (n, m) of the problems of a batch, padded to the largest: rows and columns of zero weight.
BATCH_SHAPES = [(12, 9), (20, 15), (17, 14)]


def padded_batch(dtype, d: int = 6, seed: int = 30):
    """Three uneven problems padded to one batch: features padded with zero rows, biases and
    potentials with −inf (zero weights), and each problem alone. The middle problem's column
    biases are all −inf (a row LSE over only −inf terms)."""
    n, m = (max(shape[i] for shape in BATCH_SHAPES) for i in (0, 1))
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.zeros(3, n, d, dtype=torch.float64), torch.zeros(3, m, d, dtype=torch.float64)
    f, g = (
        torch.full((3, n), -math.inf, dtype=torch.float64),
        torch.full((3, m), -math.inf, dtype=torch.float64),
    )
    for b, (n_b, m_b) in enumerate(BATCH_SHAPES):
        x[b, :n_b] = torch.nn.functional.normalize(
            torch.randn(n_b, d, generator=generator, dtype=torch.float64), dim=1
        )
        y[b, :m_b] = torch.nn.functional.normalize(
            torch.randn(m_b, d, generator=generator, dtype=torch.float64), dim=1
        )
        f[b, :n_b] = 0.1 * torch.randn(n_b, generator=generator, dtype=torch.float64) - math.log(n_b) * EPS
        if b != 1:
            g[b, :m_b] = (
                0.1 * torch.randn(m_b, generator=generator, dtype=torch.float64) - math.log(m_b) * EPS
            )
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (x, y, f, g))


def check_with_infinities(value: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    """The same infinite entries (never NaN), the finite ones close."""
    value = value.cpu()
    assert value.dtype == dtype and value.shape == expected.shape
    assert not bool(value.isnan().any())
    assert torch.equal(value.isinf(), expected.isinf()) and torch.equal(
        value[value.isinf()], expected[expected.isinf()]
    )
    finite = ~expected.isinf()
    assert relative_error(value[finite], expected[finite]) < TOLERANCE[dtype]


@DTYPES
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_batched_primitives_match_reference(dense, dtype):
    """A batch of three uneven problems in one launch per primitive against the reference on the
    same batch, padded problems against each problem alone, rows whose biases are all −inf,
    τ ≠ 1 in the fused epilogue and in the split update kernel, and plan products."""
    x, y, f, g = padded_batch(dtype)
    K = Affinity.from_features(x, y)
    K = K.materialize() if dense else K
    K64 = Affinity.from_features(x.double().cpu(), y.double().cpu())
    f64, g64 = f.double().cpu(), g.double().cpu()
    backend, split = TritonBackend(), TritonBackend(splits=2)
    rows = backend.lse_rows(K, g, EPS)
    check_with_infinities(rows, REFERENCE.lse_rows(K64, g64, EPS), dtype)
    assert bool((rows[1] == -math.inf).all())
    check_with_infinities(split.lse_cols(K, f, EPS), REFERENCE.lse_cols(K64, f64, EPS), dtype)
    for tried in (backend, split):
        check_with_infinities(
            tried.row_update(K, g, EPS, f, 0.7), REFERENCE.row_update(K64, g64, EPS, f64, 0.7), dtype
        )
        check_with_infinities(
            tried.column_update(K, f, EPS, g, 0.7), REFERENCE.column_update(K64, f64, EPS, g64, 0.7), dtype
        )
    # each padded problem is that problem alone (its potential here: the column update)
    g_new = backend.column_update(K, f, EPS, g, 0.7)
    for b, (n_b, m_b) in enumerate(BATCH_SHAPES):
        alone = Affinity.from_features(x[b, :n_b].double().cpu(), y[b, :m_b].double().cpu())
        expected = REFERENCE.column_update(alone, f64[b, :n_b], EPS, g64[b, :m_b], 0.7)
        check_with_infinities(g_new[b, :m_b], expected, dtype)
    # plan products, with the problem whose column potentials are all −inf (zero plan)
    generator = torch.Generator().manual_seed(31)
    V = torch.randn(3, y.shape[1], 4, generator=generator, dtype=torch.float64)
    U = torch.randn(3, x.shape[1], 3, generator=generator, dtype=torch.float64)
    for tried in (backend, split):
        check(
            tried.plan_matmul(K, f, g, EPS, V.to(dtype=dtype, device=DEVICE)),
            REFERENCE.plan_matmul(K64, f64, g64, EPS, V),
            dtype,
        )
        check(
            tried.plan_t_matmul(K, f, g, EPS, U.to(dtype=dtype, device=DEVICE)),
            REFERENCE.plan_t_matmul(K64, f64, g64, EPS, U),
            dtype,
        )
        check(tried.plan_inner(K, f, g, EPS, K), REFERENCE.plan_inner(K64, f64, g64, EPS, K64), dtype)


def test_klot_value_skips_entries_of_zero_teacher_mass():
    """Rows and columns of zero weight: P* = 0 there and the log terms are −inf − −inf; they
    must add nothing (the reference's rule), not NaN."""
    t = cast(problem(20, 30, 7, 5, seed=5), torch.float64)
    f_t, g_t, f, g = (t[key].clone() for key in ("f_t", "g_t", "f", "g"))
    for potential in (f_t, f):
        potential[[3, 11]] = -math.inf
    for potential in (g_t, g):
        potential[[0, 29]] = -math.inf
    K, K_t = Affinity.from_features(t["x"], t["y"]), Affinity.from_features(t["x_t"], t["y_t"])
    args = (K, f, g, EPS, K_t, f_t, g_t, EPS_TEACHER)
    value = TritonBackend(splits=2).klot_value(*args)
    assert math.isfinite(float(value))
    check(value, REFERENCE.klot_value(*args), torch.float64)


def test_klot_value_is_a_kl_divergence():
    """Hand-checkable case: the same affinity and ε for student and teacher give KL = 0,
    and the gradient (P − P)/ε vanishes."""
    t = cast(problem(20, 30, 17, 5, seed=3), torch.float64)
    K = Affinity.from_features(t["x"], t["y"])
    args = (K, t["f"], t["g"], EPS, K, t["f"], t["g"], EPS)
    backend = TritonBackend()
    assert abs(float(backend.klot_value(*args))) < 1e-13
    assert all(float(grad.abs().max()) < 1e-12 for grad in backend.klot_grad_features(*args))


def test_empty_splits_are_identities():
    """More splits than column tiles: the extra splits reduce nothing and must not count."""
    t = cast(problem(9, 40, 16, 16, seed=4), torch.float64)
    K = Affinity.from_features(t["x"], t["y"])
    backend = TritonBackend(splits=5)
    check(backend.lse_rows(K, t["g"], EPS), REFERENCE.lse_rows(K, t["g"], EPS), torch.float64)
    check(
        backend.plan_inner(K, t["f"], t["g"], EPS, K),
        REFERENCE.plan_inner(K, t["f"], t["g"], EPS, K),
        torch.float64,
    )


# ---------------------------------------------------------------------- through the front


@pytest.mark.parametrize("dense,dtype", [(False, torch.float32)], ids=["online-fp32"])
def test_sinkhorn_plan_matches_reference(dense, dtype):
    case = problem(37, 53, 20, 12, seed=11)
    K_reference = Affinity.from_features(case["x"], case["y"])
    reference = solve(uniform_problem(REFERENCE, K_reference), EPS, SolverOptions(n_iters=12))
    f_ref, g_ref = reference.f, reference.g

    t = cast(case, dtype)
    K, _ = affinities(t, dense, False)
    solution = solve(uniform_problem(TritonBackend(), K), EPS, SolverOptions(n_iters=12))
    f, g = solution.f, solution.g
    assert solution.done == 12
    plan = ((f[:, None] + g[None, :] + K.materialize().dense) / EPS).exp()
    plan_ref = ((f_ref[:, None] + g_ref[None, :] + K_reference.materialize().dense) / EPS).exp()
    check(plan, plan_ref, dtype)
    scale = EPS * (f_ref.abs().max() + g_ref.abs().max() + 1)
    assert float((f.cpu().double() - f_ref).abs().max() / scale) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "path,dtype", [("online", torch.float32), ("dense", torch.float32)], ids=["online", "dense"]
)
def test_klot_autograd_matches_reference(path, dtype):
    """Value and gradients wrt the student features through ``sotalign.klot``'s custom ops
    with ``backend="triton"`` (dot affinity: the features are already unit rows)."""
    case = problem(37, 53, 20, 12, seed=12)

    def run(backend, dtype, device, path):
        x = case["x"].to(dtype=dtype, device=device).requires_grad_()
        y = case["y"].to(dtype=dtype, device=device).requires_grad_()
        x_t, y_t = (case[k].to(dtype=dtype, device=device) for k in ("x_t", "y_t"))
        loss = sotalign.klot(
            x,
            y,
            x_t,
            y_t,
            eps=EPS,
            eps_teacher=EPS_TEACHER,
            n_iters=10,
            affinity="dot",
            backend=backend,
            path=path,
        )
        return (loss.detach(), *torch.autograd.grad(loss, (x, y)))

    expected = run("reference", torch.float64, torch.device("cpu"), "auto")
    for value, reference in zip(run("triton", dtype, DEVICE, path), expected, strict=True):
        check(value, reference, dtype)


def test_dense_klot_autograd_matches_reference():
    case = problem(45, 23, 6, 6, seed=13)
    K_t = case["x_t"] @ case["y_t"].T

    def run(backend, device):
        K = (case["x"] @ case["y"].T).to(device).requires_grad_()
        loss = sotalign.klot_dense(
            K, K_t.to(device), eps=EPS, eps_teacher=EPS_TEACHER, n_iters=10, backend=backend
        )
        return loss.detach(), torch.autograd.grad(loss, K)[0]

    expected = run("reference", torch.device("cpu"))
    for value, reference in zip(run("triton", DEVICE), expected, strict=True):
        check(value, reference, torch.float64)


# ---------------------------------------------------------------------- precision flags, errors


@pytest.mark.parametrize(
    "precision,bound", [("fp32", 1e-5), ("tf32x3", 1e-5), ("fp16x3", 1e-5), ("tf32", 4e-3), ("fp16", 2e-3)]
)
def test_precision_flags_stay_close(precision, bound):
    """ε·|ΔLSE| (the error in the potentials, in units of K) of a half-step at ε = 0.01;
    fp16 (and tf32 on a GPU; the interpreter computes tf32 dots exactly) round the dot
    inputs to 10 mantissa bits, about 2.4e-4 relative on each cosine."""
    case = problem(37, 53, 40, 8, seed=14)
    expected = REFERENCE.lse_rows(Affinity.from_features(case["x"], case["y"]), case["g"], 0.01)
    t = cast(case, torch.float32)
    out = TritonBackend(precision).lse_rows(Affinity.from_features(t["x"], t["y"]), t["g"], 0.01)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert 0.01 * float((out.cpu().double() - expected).abs().max()) < bound


@pytest.mark.parametrize("d", [100, 130], ids=["resident", "streamed"])
@pytest.mark.parametrize("precision", ["fp16x3", "tf32x3"])
def test_fp32_accurate_flags_through_every_kernel(precision, d):
    """Half-steps on rows and on columns (both paths of the LSE kernel: the row block resident,
    for fp16x3 as its lo and hi parts in either order, or streamed in chunks for d = 130), the
    weighted sums and the KLOT gradients with the fp32-accurate tensor-core flags, against
    float64: as close as plain fp32."""
    case = problem(37, 53, d, 12, seed=15)
    t = cast(case, torch.float32)
    K, K_t = affinities(t, False, False)
    K64, K64_t = affinities(case, False, False)
    backend = TritonBackend(precision)
    assert (backend._operand(K).resident(backend._dot_precision(torch.float32)) > 0) == (d == 100)
    log_a = log_uniform(37, torch.float32, DEVICE)
    log_b = log_uniform(53, torch.float32, DEVICE)
    f = backend.row_update(K, t["g"], 0.01, log_a)
    g = backend.column_update(K, t["f"], 0.01, log_b)
    f_expected = REFERENCE.row_update(K64, case["g"], 0.01, log_a.double().cpu())
    g_expected = REFERENCE.column_update(K64, case["f"], 0.01, log_b.double().cpu())
    assert float((f.cpu().double() - f_expected).abs().max()) < 1e-6
    assert float((g.cpu().double() - g_expected).abs().max()) < 1e-6
    args = (K, t["f"], t["g"], EPS, K_t, t["f_t"], t["g_t"], EPS_TEACHER)
    args64 = (K64, case["f"], case["g"], EPS, K64_t, case["f_t"], case["g_t"], EPS_TEACHER)
    assert relative_error(backend.klot_value(*args).cpu(), REFERENCE.klot_value(*args64)) < 1e-5
    for value, expected in zip(
        backend.klot_grad_features(*args), REFERENCE.klot_grad_features(*args64), strict=True
    ):
        assert relative_error(value.cpu(), expected) < 1e-5


@pytest.mark.parametrize(
    "precision,dtype,d,width",
    [
        ("fp16x3", torch.float32, 20, 32),
        ("fp16x3", torch.float32, 100, 128),
        ("fp16x3", torch.float32, 128, 128),
        ("fp16x3", torch.float32, 129, 0),
        ("fp16", torch.float32, 256, 256),
        ("tf32x3", torch.float32, 128, 128),
        ("tf32x3", torch.float32, 129, 0),
        ("fp32", torch.float32, 64, 0),
        ("fp16x3", torch.float64, 64, 0),
    ],
)
def test_resident_rows_cover_fp16x3_up_to_d_128(precision, dtype, d, width):
    """The half-step keeps x's rows in registers where they fit 512 bytes: fp16x3 as its two
    distinct parts at any d ≤ 128 (not only where 3d rounds to a power of two), never on the
    CUDA-core fp32/fp64 dots."""
    from sotalign.kernels.triton import backend as host

    x = torch.ones(2, d, dtype=dtype, device=DEVICE)
    op = host.operand(Affinity.from_features(x, x), precision=precision)
    assert op.resident(TritonBackend(precision)._dot_precision(dtype)) == width
    assert op.fp16x3 == (precision == "fp16x3" and dtype == torch.float32)


def test_autotune_keys_name_every_compiled_flag():
    """A flag that changes the compiled code but not the autotuner's key would reuse a config
    tuned for another variant (and its cached timing)."""
    from sotalign.kernels.triton import lse, plan

    kernels = [lse.lse_kernel, lse.lse_dense_kernel, plan.plan_product_kernel, plan.plan_sum_kernel]
    kernels.append(plan.plan_difference_kernel)
    for kernel in kernels:
        tuned = {name for config in kernel.configs for name in config.kwargs} | {"BLOCK_K"}
        fn = kernel
        while not inspect.isfunction(fn):  # autotuner, heuristics, jit: down to the Python function
            fn = fn.fn
        parameters = inspect.signature(fn).parameters.values()
        flags = {p.name for p in parameters if "constexpr" in str(p.annotation)} - tuned
        assert flags and flags <= set(kernel.keys), (fn.__name__, flags - set(kernel.keys))


def test_fp16_split_and_its_cache():
    """x·2^s = hi + lo to fp16's rounding of lo; the split is made once per tensor and
    version, and a new tensor (even with the same values) gets its own."""
    from sotalign.kernels.triton import backend as host

    x = unit_rows(40, 24, 16).float() * 3.0
    split, inverse = host.fp16_split(x, 3, "x")
    lo, hi, hi_again = split.float().split(24, dim=1)
    assert torch.equal(hi, hi_again) and split.dtype == torch.float16
    assert 2**14 <= float(hi.abs().max()) * (1 + 2**-10) and float(hi.abs().max()) < 2**15
    assert float(((hi + lo) * inverse - x).abs().max()) <= 2**-22 * float(x.abs().max())
    as_y, _ = host.fp16_split(x, 3, "y")  # [hi, lo, hi]
    assert torch.equal(as_y[:, :24], split[:, 24:48]) and torch.equal(as_y[:, 24:48], split[:, :24])
    first = host.prepared(x, "fp16x3", "x")
    assert host.prepared(x, "fp16x3", "x")[0] is first[0]
    assert host.prepared(x, "fp16x3", "y")[0] is not first[0]
    x.mul_(2.0)  # a new version: split again, at a scale half as large
    again = host.prepared(x, "fp16x3", "x")
    assert again[0] is not first[0] and again[1] == first[1] * 2
    assert host.prepared(x, "fp32", "x") == (x, 1.0)
    assert host.prepared(x.double(), "fp16", "x")[1] == 1.0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="precision"):
        TritonBackend(precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        TritonBackend(precision=32)
    with pytest.raises(ValueError, match="splits"):
        TritonBackend(splits=0)
    backend = TritonBackend()
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.lse_rows(
            Affinity.from_features(x.half(), x.half()), torch.zeros(4, device=DEVICE).half(), 0.1
        )
    with pytest.raises(ValueError, match="bias"):
        backend.lse_rows(Affinity.from_features(x, x), torch.zeros(5, device=DEVICE), 0.1)
    with pytest.raises(ValueError, match="V"):
        backend.plan_matmul(
            Affinity.from_features(x, x),
            torch.zeros(4, device=DEVICE),
            torch.zeros(4, device=DEVICE),
            0.1,
            torch.zeros(3, 2, device=DEVICE),
        )
    with pytest.raises(ValueError, match="batch"):
        backend.lse_rows(Affinity.from_features(x.expand(2, 4, 3), x.expand(3, 4, 3)), torch.zeros(2, 4), 0.1)
    batch = Affinity.from_features(x.expand(2, 4, 3), x.expand(2, 4, 3))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(2, 4\)"):
        backend.lse_rows(batch, torch.zeros(4, device=DEVICE), 0.1)
    with pytest.raises(ValueError, match="one problem"):
        backend.klot_value(
            batch,
            *[torch.zeros(2, 4, device=DEVICE)] * 2,
            0.1,
            batch,
            *[torch.zeros(2, 4, device=DEVICE)] * 2,
            0.1,
        )
    K = Affinity.from_dense(torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="features"):
        backend.klot_grad_features(
            K, *[torch.zeros(4, device=DEVICE)] * 2, 0.1, K, *[torch.zeros(4, device=DEVICE)] * 2, 0.1
        )


def test_module_flags():
    assert triton_package.AVAILABLE and triton_package.IMPORT_ERROR is None
    assert triton_package.INTERPRETER == (not CUDA)
    assert TritonBackend.name == "triton" and TritonBackend.online
    assert math.isclose(
        float(
            TritonBackend().lse_rows(
                Affinity.from_dense(torch.zeros(3, 5, dtype=torch.float64, device=DEVICE)),
                torch.zeros(5, dtype=torch.float64, device=DEVICE),
                0.5,
            )[0]
        ),
        math.log(5),
        rel_tol=1e-14,
    )
