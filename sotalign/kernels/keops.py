r"""The ``keops`` backend: pykeops LazyTensor reductions, online for very large n and m.

For a feature affinity K = x yᵀ every primitive is one KeOps reduction over a symbolic
n×m formula, compiled once per formula, variable dimension and dtype, and never stored:

* ``lse_rows(K, b, ε)_i = LSE_j [(x_i·y_j + b_j)/ε]``: a ``logsumexp`` reduction over j;
  ``lse_cols`` is the same formula with the roles of (x, i) and (y, j) swapped, so it reuses
  the compiled kernel.
* ``klot_value = Σ_ij P*_ij (log P*_ij − log P_ij)`` with ``log P = (x·y + f + g)/ε``,
  ``log P* = (x*·y* + f* + g*)/ε*``: a Sum over j of ``exp(T)(T − S)``, run in float64
  (inputs are upcast: the terms cancel heavily at small ε, and it is one pass against the
  hundreds of a Sinkhorn solve), then summed over i in float64.
* ``klot_grad_features = (G y, Gᵀ x)`` with ``G = (P − P*)/ε``: two Sum reductions of
  ``(exp(S) − exp(T))/ε · y_j`` over j and of the swapped formula over i.
* ``plan_matmul(K, f, g, ε, V) = P V`` and ``plan_t_matmul(K, f, g, ε, U) = Pᵀ U``: Sum
  reductions of ``exp(S) V_j`` (one swapped formula serves both);
  ``plan_inner(K, f, g, ε, K2) = Σ_ij P_ij K2_ij`` for a feature K2 = x2 y2ᵀ.

A batch of problems (features (B, n, d) and (B, m, d)) is one reduction too: KeOps takes the
leading batch dimension of the variables as it is. A −inf potential or bias (a zero weight)
enters the formulas as a finite floor whose exponential is 0, since KeOps' running maximum
cannot start from −inf terms; an LSE over only such terms is set to −inf afterwards.

A *stored* n×m K is not a per-row or per-column variable, which is all a KeOps formula can
read, so for dense affinities this backend delegates to the chunked ``torch`` primitives
(same maths, O(block) workspace) instead of failing. ε enters as a runtime parameter: a
new ε does not recompile.

Compiled formulas are cached under ``~/.cache/sotalign/keops`` (``KEOPS_CACHE_FOLDER``),
unless that variable is set or pykeops was imported with its own configuration first.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

from .base import Backend, check_plan_affinity, check_plan_factor
from .torch_chunked import TorchChunkedBackend

#: Where KeOps keeps the compiled formulas of sotalign.
CACHE_FOLDER = Path.home() / ".cache" / "sotalign" / "keops"
#: Seconds the availability probe may spend compiling its formula on a fresh machine.
PROBE_TIMEOUT_S = 300

_PROBE = """
import sys
import torch
from pykeops.torch import LazyTensor
device = torch.device(sys.argv[1])
x = (torch.arange(6.0).reshape(3, 2) / 6).to(device)
y = (torch.arange(8.0).reshape(4, 2) / 8).to(device)
out = (LazyTensor(x[:, None, :]) | LazyTensor(y[None, :, :])).logsumexp(dim=1).squeeze(1)
expected = torch.logsumexp(x @ y.T, dim=1)
assert torch.allclose(out, expected, atol=1e-5), (out, expected)
print("keops-ok")
"""


def _environment() -> dict[str, str]:
    """The environment KeOps runs with: sotalign's cache folder unless one is configured."""
    os.environ.setdefault("KEOPS_CACHE_FOLDER", str(CACHE_FOLDER))
    return dict(os.environ)


def keops_error(device: str | None = None) -> str | None:
    """Why KeOps cannot run here on ``device`` ("cpu" or "cuda"; default: CUDA when torch
    sees a GPU, since that is where ``auto`` uses it), or None when it can."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _probe(device)


@functools.cache
def _probe(device: str) -> str | None:
    """Import pykeops and compile and run a trivial formula on ``device``, in a subprocess
    with a timeout, so a missing compiler or a hanging build is reported instead of blocking
    the caller. KeOps builds CPU formulas with a C++ compiler and CUDA formulas with the CUDA
    toolkit (NVRTC and its headers), so each device is probed on its own: a probe on CPU
    tensors says nothing about CUDA (the cause of ``keops`` missing on a GPU machine whose
    pykeops imported). The compiled formula stays in the cache, so the probe is fast after
    the first time; the answer is cached for the process.
    """
    try:
        run = subprocess.run(
            [sys.executable, "-c", _PROBE, device],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env=_environment(),
        )
    except subprocess.TimeoutExpired:
        return f"compiling a trivial KeOps formula on {device} took more than {PROBE_TIMEOUT_S} s"
    if run.returncode == 0 and "keops-ok" in run.stdout:
        return None
    lines = [line.strip() for line in (run.stderr + "\n" + run.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    reason = (errors or lines or [f"exit status {run.returncode}"])[-1][:300]
    if "No module named 'pykeops'" in reason:
        return "pykeops is not installed (pip install pykeops==2.3)"
    if device == "cuda" and shutil.which("nvcc") is None:
        reason += "; no nvcc on PATH: KeOps needs the CUDA toolkit (nvcc, NVRTC, headers) for CUDA"
    return f"pykeops failed to compile or run a trivial formula on {device} ({reason})"


@functools.cache
def _lazy_tensor():
    _environment()
    from pykeops.torch import LazyTensor

    return LazyTensor


def _i(t: Tensor):
    """A per-row (i) KeOps variable from an (…, n, d) tensor (… = a batch dimension or none)."""
    return _lazy_tensor()(t[..., :, None, :].contiguous())


def _j(t: Tensor):
    """A per-column (j) KeOps variable from an (…, m, d) tensor."""
    return _lazy_tensor()(t[..., None, :, :].contiguous())


def _entries(t: Tensor, eps: float) -> Tensor:
    """Per-row or per-column scalars (…, n) as (…, n, 1), with −inf (zero weights) raised to a
    finite floor: KeOps' running maximum starts at −inf, so a −inf term before any finite one
    would make 2^(−inf + inf) = NaN. The floor is low enough that two of them over ε stay finite
    and their exponential is exactly 0."""
    floor = -torch.finfo(t.dtype).max * min(eps, 1.0) / 8
    return t.clamp_min(floor)[..., None]


def _reduction_dim(x: Tensor) -> int:
    """The KeOps axis of j (a reduction over the columns) for features x of shape (…, n, d)."""
    return x.dim() - 1


def _log_plan(x: Tensor, y: Tensor, f: Tensor, g: Tensor, eps: float):
    """Symbolic S_ij = (x_i·y_j + f_i + g_j)/ε, i indexing the rows of x."""
    return ((_i(x) | _j(y)) + _i(_entries(f, eps)) + _j(_entries(g, eps))) * (1.0 / eps)


def _plan_apply(x: Tensor, y: Tensor, f: Tensor, g: Tensor, eps: float, V: Tensor) -> Tensor:
    """Σ_j exp(S_ij) V_j, an (…, n, k) tensor."""
    return (_log_plan(x, y, f, g, eps).exp() * _j(V)).sum(dim=_reduction_dim(x))


class KeOpsBackend(Backend):
    name = "keops"
    online = True
    device_types = ("cpu", "cuda")

    def __init__(self):
        self._dense = TorchChunkedBackend()

    def _lse(self, x: Tensor, y: Tensor, bias: Tensor, eps: float) -> Tensor:
        """LSE_j [(x_i·y_j + bias_j)/ε] for every row i of x (of every problem of a batch); −inf
        for a problem whose biases are all −inf."""
        self.check_device(x.device)
        formula = ((_i(x) | _j(y)) + _j(_entries(bias, eps))) * (1.0 / eps)
        out = formula.logsumexp(dim=_reduction_dim(x)).squeeze(-1)
        return out.masked_fill((bias == -torch.inf).all(dim=-1, keepdim=True), -torch.inf)

    def lse_rows(self, K, bias, eps):
        if K.is_dense:
            return self._dense.lse_rows(K, bias, eps)
        return self._lse(K.x, K.y, bias, eps)

    def lse_cols(self, K, bias, eps):
        if K.is_dense:
            return self._dense.lse_cols(K, bias, eps)
        return self._lse(K.y, K.x, bias, eps)

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        if K.is_dense or K_t.is_dense:
            return self._dense.klot_value(K, f, g, eps, K_t, f_t, g_t, eps_t)
        self.check_device(K.x.device)
        wide = [t.double() for t in (K.x, K.y, f, g, K_t.x, K_t.y, f_t, g_t)]
        x, y, f, g, x_t, y_t, f_t, g_t = wide
        student = _log_plan(x, y, f, g, eps)
        teacher = _log_plan(x_t, y_t, f_t, g_t, eps_t)
        rows = (teacher.exp() * (teacher - student)).sum(dim=_reduction_dim(x))
        return rows.sum().to(K.dtype)

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        if K.x is None:
            raise ValueError("klot_grad_features needs the student affinity as features (x, y)")
        if K_t.is_dense:
            return self._dense.klot_grad_features(K, f, g, eps, K_t, f_t, g_t, eps_t)
        self.check_device(K.x.device)

        def pull(x, y, f, g, x_t, y_t, f_t, g_t):
            """Σ_j G_ij y_j with G_ij = (exp(S_ij) − exp(T_ij))/ε, i indexing x."""
            G = _log_plan(x, y, f, g, eps).exp() - _log_plan(x_t, y_t, f_t, g_t, eps_t).exp()
            return (G * (1.0 / eps) * _j(y)).sum(dim=_reduction_dim(x))

        grad_x = pull(K.x, K.y, f, g, K_t.x, K_t.y, f_t, g_t)
        grad_y = pull(K.y, K.x, g, f, K_t.y, K_t.x, g_t, f_t)
        return grad_x, grad_y

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        return self._dense.klot_grad_dense(K, f, g, eps, K_t, f_t, g_t, eps_t)

    def plan_matmul(self, K, f, g, eps, V):
        if K.is_dense:
            return self._dense.plan_matmul(K, f, g, eps, V)
        check_plan_factor("V", V, K.shape[1], K)
        self.check_device(K.x.device)
        return _plan_apply(K.x, K.y, f, g, eps, V)

    def plan_t_matmul(self, K, f, g, eps, U):
        if K.is_dense:
            return self._dense.plan_t_matmul(K, f, g, eps, U)
        check_plan_factor("U", U, K.shape[0], K)
        self.check_device(K.x.device)
        return _plan_apply(K.y, K.x, g, f, eps, U)

    def plan_inner(self, K, f, g, eps, K2):
        check_plan_affinity(K, K2)
        if K.is_dense or K2.is_dense:
            return self._dense.plan_inner(K, f, g, eps, K2)
        self.check_device(K.x.device)
        terms = _log_plan(K.x, K.y, f, g, eps).exp() * (_i(K2.x) | _j(K2.y))
        return terms.sum(dim=_reduction_dim(K.x)).double().sum(dim=(-2, -1)).to(K.dtype)
