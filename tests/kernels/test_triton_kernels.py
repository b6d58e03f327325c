"""The ``triton`` backend against the float64 ``reference`` oracle, primitive by primitive and
through the Sinkhorn loop and the KLOT autograd functions.

Without CUDA the kernels run on CPU in Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before the kernels are defined (triton.jit reads it when a kernel is
decorated, and the backend defines its kernels on first import). With CUDA the same tests
run compiled, on the GPU. Shapes are small, rectangular and not multiples of the tiles
(32 × 32, d in chunks of 16 under the interpreter), so every mask is exercised.
"""

from __future__ import annotations

import importlib
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
from sotalign.ot.sinkhorn import solve, uniform_log_weights  # noqa: E402

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
    log_a = uniform_log_weights(n, torch.float64, torch.device("cpu"))
    log_b = uniform_log_weights(m, torch.float64, torch.device("cpu"))
    f, g, _ = solve(REFERENCE, K, EPS, 50, log_a, log_b)
    f_t, g_t, _ = solve(REFERENCE, K_t, EPS_TEACHER, 50, log_a, log_b)
    return dict(x=x, y=y, x_t=x_t, y_t=y_t, f=f, g=g, f_t=f_t, g_t=g_t)


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


# ---------------------------------------------------------------------- primitives


@DTYPES
@pytest.mark.parametrize("splits", [None, 3], ids=["one-split", "three-splits"])
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_lse_matches_reference(case, dense, splits, dtype):
    reference_K, _ = affinities(case, dense, False)
    t = cast(case, dtype)
    K, _ = affinities(t, dense, False)
    backend = TritonBackend(splits=splits)
    # the biases of a Sinkhorn iteration: the potentials themselves
    rows = backend.lse_rows(K, t["g"], EPS)
    cols = backend.lse_cols(K, t["f"], EPS)
    check(rows, REFERENCE.lse_rows(reference_K, case["g"], EPS), dtype)
    check(cols, REFERENCE.lse_cols(reference_K, case["f"], EPS), dtype)


@DTYPES
@pytest.mark.parametrize("splits", [None, 2], ids=["one-split", "two-splits"])
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_plan_products_match_reference(case, dense, splits, dtype):
    n, m = case["x"].shape[0], case["y"].shape[0]
    reference_K, reference_K_t = affinities(case, dense, False)
    V = unit_rows(m, 21, 7) * m
    U = unit_rows(n, 5, 8) * n
    t = cast(case, dtype)
    K, K_t = affinities(t, dense, False)
    backend = TritonBackend(splits=splits)
    f, g = case["f"], case["g"]
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
@pytest.mark.parametrize(
    "dense,dense_teacher,splits",
    [(False, False, None), (True, True, None), (False, True, None), (False, False, 2), (True, True, 2)],
    ids=["online", "dense", "dense-teacher", "online-split", "dense-split"],
)
def test_klot_primitives_match_reference(case, dense, dense_teacher, splits, dtype):
    reference = affinities(case, dense, dense_teacher)
    student = (case["f"], case["g"], EPS)
    teacher = (case["f_t"], case["g_t"], EPS_TEACHER)
    t = cast(case, dtype)
    K, K_t = affinities(t, dense, dense_teacher)
    args = (K, t["f"], t["g"], EPS, K_t, t["f_t"], t["g_t"], EPS_TEACHER)
    reference_args = (reference[0], *student, reference[1], *teacher)
    backend = TritonBackend(splits=splits)
    check(backend.klot_value(*args), REFERENCE.klot_value(*reference_args), dtype)
    check(backend.klot_grad_dense(*args), REFERENCE.klot_grad_dense(*reference_args), dtype)
    if not dense:
        for value, expected in zip(
            backend.klot_grad_features(*args), REFERENCE.klot_grad_features(*reference_args), strict=True
        ):
            check(value, expected, dtype)


@DTYPES
@pytest.mark.parametrize("splits", [None, 3], ids=["fused-epilogue", "three-splits"])
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
def test_half_step_updates_match_reference(dense, splits, dtype):
    """row_update / column_update: the LSE kernel writing ε (log w − LSE) itself (one
    split), or the partial LSEs combined by the update kernel (several splits)."""
    case = problem(37, 53, 20, 12, seed=17)
    reference_K, _ = affinities(case, dense, False)
    t = cast(case, dtype)
    K, _ = affinities(t, dense, False)
    log_a = torch.linspace(-4.0, -3.0, 37, dtype=torch.float64)
    log_b = torch.linspace(-3.5, -4.5, 53, dtype=torch.float64)
    backend = TritonBackend(splits=splits)
    f = backend.row_update(K, t["g"], EPS, log_a.to(dtype=dtype, device=DEVICE))
    g = backend.column_update(K, t["f"], EPS, log_b.to(dtype=dtype, device=DEVICE))
    check(f, REFERENCE.row_update(reference_K, case["g"], EPS, log_a), dtype)
    check(g, REFERENCE.column_update(reference_K, case["f"], EPS, log_b), dtype)


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


@pytest.mark.parametrize(
    "dense,dtype",
    [(False, torch.float64), (False, torch.float32), (True, torch.float64)],
    ids=["online-fp64", "online-fp32", "dense-fp64"],
)
def test_sinkhorn_plan_matches_reference(dense, dtype):
    case = problem(37, 53, 20, 12, seed=11)
    K_reference = Affinity.from_features(case["x"], case["y"])
    log_a = uniform_log_weights(37, torch.float64, torch.device("cpu"))
    log_b = uniform_log_weights(53, torch.float64, torch.device("cpu"))
    f_ref, g_ref, _ = solve(REFERENCE, K_reference, EPS, 12, log_a, log_b)

    t = cast(case, dtype)
    K, _ = affinities(t, dense, False)
    f, g, done = solve(
        TritonBackend(),
        K,
        EPS,
        12,
        log_a.to(dtype=dtype, device=DEVICE),
        log_b.to(dtype=dtype, device=DEVICE),
    )
    assert done == 12
    plan = ((f[:, None] + g[None, :] + K.materialize().dense) / EPS).exp()
    plan_ref = ((f_ref[:, None] + g_ref[None, :] + K_reference.materialize().dense) / EPS).exp()
    check(plan, plan_ref, dtype)
    scale = EPS * (f_ref.abs().max() + g_ref.abs().max() + 1)
    assert float((f.cpu().double() - f_ref).abs().max() / scale) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "path,dtype",
    [("online", torch.float64), ("online", torch.float32), ("dense", torch.float32)],
    ids=["online-fp64", "online-fp32", "dense-fp32"],
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


@pytest.mark.parametrize("d", [20, 130], ids=["resident", "streamed"])
@pytest.mark.parametrize("precision", ["fp16x3", "tf32x3"])
def test_fp32_accurate_flags_through_every_kernel(precision, d):
    """Half-steps (both paths of the LSE kernel: the row block resident for small d, streamed
    in chunks for d = 130), the weighted sums and the KLOT gradients with the fp32-accurate
    tensor-core flags, against float64: as close as plain fp32."""
    case = problem(37, 53, d, 12, seed=15)
    t = cast(case, torch.float32)
    K, K_t = affinities(t, False, False)
    K64, K64_t = affinities(case, False, False)
    backend = TritonBackend(precision)
    log_a = uniform_log_weights(37, torch.float32, DEVICE)
    f = backend.row_update(K, t["g"], 0.01, log_a)
    assert (
        float(
            (f.cpu().double() - REFERENCE.row_update(K64, case["g"], 0.01, log_a.double().cpu())).abs().max()
        )
        < 1e-6
    )
    args = (K, t["f"], t["g"], EPS, K_t, t["f_t"], t["g_t"], EPS_TEACHER)
    args64 = (K64, case["f"], case["g"], EPS, K64_t, case["f_t"], case["g_t"], EPS_TEACHER)
    assert relative_error(backend.klot_value(*args).cpu(), REFERENCE.klot_value(*args64)) < 1e-5
    for value, expected in zip(
        backend.klot_grad_features(*args), REFERENCE.klot_grad_features(*args64), strict=True
    ):
        assert relative_error(value.cpu(), expected) < 1e-5


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
