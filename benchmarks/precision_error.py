r"""Error of the Triton backend's precision flags (fp32, tf32x3, fp16x3, tf32, fp16) against float64.

    .venv/bin/python -m benchmarks.precision_error [--n 512] [--d 256] [--iters 100]

For cosine features (n = m, student d, teacher d/2, clustered so the plans are far from
uniform) and each ε in {0.05, 0.01} this measures, against the float64 reference:

* the Sinkhorn potentials, as max_i |f_i − f⁶⁴_i| / ε (the error they put in log P), and the
  plan, ‖P − P⁶⁴‖_F / ‖P⁶⁴‖_F with P = exp((f + g + K_used)/ε);
* the KLOT value (student ε, teacher ε* = 0.01) and its gradient (G ŷ, Gᵀ x̂), relative.

How each flag is reproduced:

* On a CUDA machine, by the Triton kernels themselves (``TritonBackend(precision)``).
* Without one, by emulation in torch: a tf32 or fp16 dot multiplies operands rounded to 10
  mantissa bits exactly (11-bit significands give exact fp32 products) and accumulates in
  fp32, so K = round(x̂) round(ŷ)ᵀ in fp32 reproduces it up to summation order; every other
  step runs the reference formulas in fp32, and the gradient products G ŷ use unrounded
  operands, as the kernels do. tf32 is shown with round-to-nearest-even and with
  truncation (what a tensor core does when given fp32 registers; the bound to quote);
  tf32x3 as hi·hi + hi·lo + lo·hi of truncated tf32 parts, summed in fp32; fp16 and
  fp16x3 with the kernels' own host-side split (:func:`sotalign.kernels.triton.backend.
  fp16_split`: power-of-two scaling, fp16 hi and lo parts), whose fp16 products are exact
  in fp32, summed in fp32. A cross-check runs the actual kernels in Triton's interpreter
  (fp32, fp16 and fp16x3; it computes tf32 dots exactly) on a smaller problem next to the
  emulation.

Writes ``benchmarks/results/<machine>-precision.md`` (:mod:`benchmarks.machine`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (cross-check)

from benchmarks.machine import local_machine, machine_slug  # noqa: E402
from benchmarks.report import RESULTS  # noqa: E402
from sotalign.kernels.base import Affinity  # noqa: E402
from sotalign.kernels.reference import ReferenceBackend  # noqa: E402
from sotalign.kernels.triton.backend import fp16_split  # noqa: E402
from sotalign.ot.options import SolverOptions  # noqa: E402
from sotalign.ot.problem import uniform_problem  # noqa: E402
from sotalign.ot.sinkhorn import solve  # noqa: E402

REFERENCE = ReferenceBackend()
EPS_TEACHER = 0.01
#: How a precision flag of the kernels rounds the operands of its dots.
KERNEL_ROUNDING = {
    "fp32": "fp32",
    "tf32x3": "tf32x3",
    "fp16x3": "fp16x3",
    "tf32": "tf32-trunc",
    "fp16": "fp16",
}
#: Modes whose dot is not a product of rounded operands.
SPLIT_MODES = ("tf32x3", "fp16x3")


def round_operands(t: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 values as a dot of the given mode sees them."""
    if mode == "fp32":
        return t
    if mode == "fp16":
        hi, inverse = fp16_split(t, 1)
        return hi.float() * inverse
    bits = t.contiguous().view(torch.int32)
    if mode == "tf32-rne":
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & -8192).view(torch.float32)  # keep sign, exponent and 10 mantissa bits


def dot_as_computed(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """a bᵀ as a dot of the given mode computes it. tf32x3 splits each fp32 operand into a
    truncated tf32 part and the tf32 of its remainder and drops the lo·lo product; fp16x3 is
    the plain fp16 dot of the host-side splits [a_lo, a_hi, a_hi]·[b_hi, b_lo, b_hi]ᵀ."""
    if mode == "fp16x3":
        (a3, scale_a), (b3, scale_b) = fp16_split(a, 3, "x"), fp16_split(b, 3, "y")
        return ((a3.float() @ b3.float().T) * (scale_a * scale_b)).to(a.dtype)
    if mode != "tf32x3":
        return round_operands(a, mode) @ round_operands(b, mode).T

    def split(t):
        hi = round_operands(t.float(), "tf32-trunc").to(t.dtype)
        return hi, round_operands((t - hi).float(), "tf32-trunc").to(t.dtype)

    (a_hi, a_lo), (b_hi, b_lo) = split(a), split(b)
    return a_hi @ b_hi.T + (a_hi @ b_lo.T + a_lo @ b_hi.T)


def problem(n: int, d: int, device, seed: int = 0):
    """Unit-norm student (d) and teacher (d/2) features of n images and n texts in 32
    shared clusters, float64."""
    generator = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(
            torch.randn(*shape, generator=generator, dtype=torch.float64), dim=1
        )

    def clouds(dim):
        centers = unit(32, dim)
        labels = torch.randint(0, 32, (2, n), generator=generator)
        return [torch.nn.functional.normalize(centers[lab] + 0.6 * unit(n, dim), dim=1) for lab in labels]

    x, y = clouds(d)
    x_t, y_t = clouds(d // 2)
    return [t.to(device) for t in (x, y, x_t, y_t)]


def run(features, eps: float, iters: int, backend, mode: str | None):
    """(f, g, K_used, value, grad_x, grad_y). ``mode`` set: emulation with the reference
    formulas in fp32 on round(x̂) round(ŷ)ᵀ; ``mode`` None: ``backend`` on the features as
    given (the float64 reference, or the Triton kernels)."""
    x, y, x_t, y_t = features
    if mode is None:
        K, K_t = Affinity.from_features(x, y), Affinity.from_features(x_t, y_t)
    else:
        backend = REFERENCE
        K, K_t = (Affinity.from_dense(dot_as_computed(a, b, mode)) for a, b in ((x, y), (x_t, y_t)))
    options = SolverOptions(n_iters=iters)
    student = solve(uniform_problem(backend, K), eps, options)
    teacher = solve(uniform_problem(backend, K_t), EPS_TEACHER, options)
    f, g, f_t, g_t = student.f, student.g, teacher.f, teacher.g
    args = (K, f, g, eps, K_t, f_t, g_t, EPS_TEACHER)
    value = backend.klot_value(*args)
    if mode is None:
        grad_x, grad_y = backend.klot_grad_features(*args)
    else:
        G = backend.klot_grad_dense(*args)
        grad_x, grad_y = G @ y, G.T @ x
    if x.dtype == torch.float64:
        K_used = x @ y.T
    else:  # the K the run multiplied: the kernels round their operands like the emulation
        rounding = mode or KERNEL_ROUNDING[backend.precision]
        K_used = (
            dot_as_computed(x.double(), y.double(), rounding)
            if rounding in SPLIT_MODES
            else round_operands(x, rounding).double() @ round_operands(y, rounding).double().T
        )
    return f, g, K_used, value, grad_x, grad_y


def errors(result, expected, eps: float) -> dict:
    f, g, K_used, value, grad_x, grad_y = (t.double().cpu() for t in result)
    f64, g64, K64, value64, grad_x64, grad_y64 = (t.double().cpu() for t in expected)
    plan = ((f[:, None] + g[None, :] + K_used) / eps).exp()
    plan64 = ((f64[:, None] + g64[None, :] + K64) / eps).exp()
    grad = torch.cat([grad_x.flatten(), grad_y.flatten()])
    grad64 = torch.cat([grad_x64.flatten(), grad_y64.flatten()])
    return {
        "potentials": float(torch.cat([(f - f64), (g - g64)]).abs().max()) / eps,
        "plan": float((plan - plan64).norm() / plan64.norm()),
        "value": abs(float(value) - float(value64)) / abs(float(value64)),
        "gradient": float((grad - grad64).norm() / grad64.norm()),
    }


def table(rows: list[tuple[str, float, dict]]) -> list[str]:
    lines = [
        "| precision | ε | max ‖Δf, Δg‖∞ / ε | plan (rel. F) | KLOT value (rel.) | KLOT gradient (rel.) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, eps, err in rows:
        lines.append(
            f"| {label} | {eps} | {err['potentials']:.2e} | {err['plan']:.2e} | "
            f"{err['value']:.2e} | {err['gradient']:.2e} |"
        )
    return lines


def measure(n: int, d: int, iters: int, device, modes: list[tuple[str, object, str | None]]):
    features64 = problem(n, d, device)
    features32 = [t.float() for t in features64]
    rows = []
    for eps in (0.05, 0.01):
        expected = run(features64, eps, iters, REFERENCE, None)
        for label, backend, mode in modes:
            rows.append((label, eps, errors(run(features32, eps, iters, backend, mode), expected, eps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--check-n", type=int, default=64, help="size of the interpreter cross-check")
    args = parser.parse_args()
    torch.manual_seed(0)
    from sotalign.kernels.triton import TritonBackend

    started = time.time()
    if CUDA:
        device = torch.device("cuda")
        where = f"Triton kernels on {torch.cuda.get_device_name()}"
        modes = [(p, TritonBackend(p), None) for p in ("fp32", "tf32x3", "fp16x3", "tf32", "fp16")]
        main_rows = measure(args.n, args.d, args.iters, device, modes)
        check_rows = []
        machine = "gpu-" + "-".join(torch.cuda.get_device_name().lower().split()[-2:])
    else:
        device = torch.device("cpu")
        where = "the flags emulated in torch on CPU (see below)"
        modes = [
            ("fp32", None, "fp32"),
            ("tf32x3", None, "tf32x3"),
            ("fp16x3", None, "fp16x3"),
            ("tf32 (RNE)", None, "tf32-rne"),
            ("tf32 (truncated)", None, "tf32-trunc"),
            ("fp16", None, "fp16"),
        ]
        main_rows = measure(args.n, args.d, args.iters, device, modes)
        check = [
            ("fp32 emulated", None, "fp32"),
            ("fp32 Triton (interpreter)", TritonBackend("fp32"), None),
            ("fp16 emulated", None, "fp16"),
            ("fp16 Triton (interpreter)", TritonBackend("fp16"), None),
            ("fp16x3 emulated", None, "fp16x3"),
            ("fp16x3 Triton (interpreter)", TritonBackend("fp16x3"), None),
        ]
        check_rows = measure(args.check_n, 32, 20, device, check)
        machine = machine_slug(local_machine())

    lines = [
        f"# Precision flags of the `triton` backend vs float64 ({machine})",
        "",
        f"n = m = {args.n}, d = {args.d} (teacher d = {args.d // 2}), unit-norm clustered features, "
        f"{args.iters} Sinkhorn iterations + the symmetric step; KLOT with student ε and teacher "
        f"ε* = {EPS_TEACHER}. Measured with {where}. Errors against the float64 reference on the same "
        "features; the potentials' error is in units of log P.",
        "",
    ]
    lines += table(main_rows)
    if check_rows:
        lines += [
            "",
            "How the flags were reproduced without a GPU: a tf32/fp16 dot multiplies "
            "operands rounded to 10 mantissa bits exactly and accumulates in fp32, so "
            "K = round(x̂)·round(ŷ)ᵀ in fp32 reproduces it up to summation order; the "
            "rest runs the reference formulas in fp32, gradient products on unrounded "
            "operands (as the kernels do). tf32 (truncated) is what tensor cores do with "
            "fp32 registers, the bound to quote; RNE is shown for comparison.",
            "",
            f"Cross-check, the actual kernels in Triton's interpreter next to the emulation "
            f"(n = m = {args.check_n}, d = 32, 20 iterations):",
            "",
        ]
        lines += table(check_rows)
    lines += ["", f"({time.time() - started:.0f} s; written by benchmarks/precision_error.py)", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{machine}-precision.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
