"""The bottom layer of checks, shared by every layer (ot, align, data, eval): bad input fails
early and says why. One matrix coercer (:func:`as_matrix`), one dtype rule
(:func:`compute_dtype`), one integer and one real-number check."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor


def check_matrix(name: str, t) -> None:
    """A non-empty, 2-D floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type == "meta":
        raise TypeError(f"{name} is a meta tensor: it has a shape but no values to compute with")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows × features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")


def check_features(name: str, t, *, batched: bool = False) -> None:
    """A non-empty floating-point tensor of rows × features, with a leading batch dimension
    when ``batched``."""
    if batched:
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be 3-D (batch × rows × features), got {shape}")
        check_matrix(name, t[0])
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch: shape {tuple(t.shape)}")
    else:
        check_matrix(name, t)


def check_point_clouds(*, values: bool = True, **tensors: Tensor) -> bool:
    """Two point clouds (or a stored K): all 2-D, or all 3-D with the same batch size, on one
    device, and (``values``: this reads them) finite. Returns whether they are batched."""
    first = next(iter(tensors.values()))
    batched = isinstance(first, Tensor) and first.dim() == 3
    for name, t in tensors.items():
        check_features(name, t, batched=batched)
    if batched and len({t.shape[0] for t in tensors.values()}) > 1:
        listing = ", ".join(f"{name} has {t.shape[0]}" for name, t in tensors.items())
        raise ValueError(f"the batch sizes must agree: {listing}")
    if len(tensors) == 2:
        (name_x, x), (name_y, y) = tensors.items()
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(
                f"{name_x} and {name_y} must have the same feature dimension, "
                f"got {x.shape[-1]} and {y.shape[-1]}"
            )
    check_same_device(**tensors)
    if values:
        check_finite(**tensors)
    return batched


def check_matrices(**tensors: Tensor) -> torch.device:
    """Shape, dtype, device, then values (finiteness is read last: it needs one device)."""
    device = check_structure(**tensors)
    check_finite(**tensors)
    return device


def check_structure(**tensors: Tensor) -> torch.device:
    """Shape, dtype and device only: no value is read, so nothing waits for the device
    (the check :mod:`sotalign.ot.klot` runs before its custom op, also under torch.compile)."""
    for name, t in tensors.items():
        check_matrix(name, t)
    return check_same_device(**tensors)


def check_finite(**tensors: Tensor) -> None:
    """No NaN or Inf (reads the values: one host synchronisation per tensor)."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def check_real(name: str, value, *, positive: bool = False) -> float:
    """A finite real number (not a bool), > 0 if ``positive``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """A finite number > 0 (ε, tolerances, budgets)."""
    return check_real(name, value, positive=True)


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_eps_scaling(value) -> float | None:
    """None (no ε-scaling) or an annealing factor strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eps_scaling must be None or a real number, got {type(value).__name__}")
    value = float(value)
    if not 0 < value < 1:
        raise ValueError(f"eps_scaling must be a factor in (0, 1), got {value}")
    return value


def check_cuda_graph(flag: bool | None, device: torch.device) -> bool | None:
    """``cuda_graph=True`` only for CUDA tensors (None chooses by device; the flag's type is a
    SolverOptions check)."""
    if flag and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got tensors on {device}")
    return flag


def check_same_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")
    return next(iter(devices.values()))


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are never used for costs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_matrix(name: str, value, dtype: torch.dtype | None = None, *, integers: bool = False) -> Tensor:
    """A finite, non-empty, 2-D real matrix, from a torch tensor or a numpy array (a read-only
    one, e.g. a memmap, is copied), as a detached tensor of ``dtype`` (by default the
    :func:`compute_dtype` rule: float64 stays float64, any other float becomes float32).
    ``integers=True`` also accepts integer matrices (converted to float64 first)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got numpy dtype {value.dtype}")
        value = torch.from_numpy(value if value.flags.writeable else np.array(value))
    elif not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if integers and not (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    ):
        value = value.to(torch.float64)
    check_matrix(name, value)
    value = value.detach().to(dtype or compute_dtype(value))
    check_finite(**{name: value})
    return value


def check_weights(name: str, w, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Marginal weights of ``shape`` ((n,), or (B, n) for a batch): finite and non-negative,
    with a positive total for every problem (zeros mark padding)."""
    check_weight_structure(name, w, shape, device)
    check_weight_values(name, w)
    return w.to(dtype)


def check_weight_structure(name: str, w, shape: tuple[int, ...], device: torch.device) -> None:
    """Type, shape and device of marginal weights (reads no value)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {w.dtype}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but the features are on {device}")


def check_weight_values(name: str, w: Tensor) -> None:
    """Finite, non-negative, a positive total per problem (one host synchronisation)."""
    if not bool(torch.isfinite(w).all()) or not bool((w >= 0).all()):
        raise ValueError(f"{name} must be finite and non-negative")
    if not bool((w.sum(-1) > 0).all()):
        raise ValueError(f"{name} must have a positive total weight (for every problem of a batch)")


def unit_rows(x: Tensor) -> Tensor:
    """The rows of ``x`` scaled to unit L2 norm without overflow: each row is first divided by
    its largest magnitude (‖x‖² of entries near 1e20 overflows float32; the direction does
    not change). The scale is a constant to autograd, and normalisation ignores it, so the
    gradient is that of ``x / ‖x‖``. Zero rows stay zero."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.nn.functional.normalize(x / scale, dim=-1)


def check_affinity_scale(name: str, bound: float, eps: float, dtype: torch.dtype) -> None:
    """The kernels form K/ε in ``dtype`` (and its exponentials after a max-shift), so
    ``bound`` ≥ max |K_ij| must keep K/ε far from overflowing: a clear error instead of an
    inf or NaN loss."""
    limit = torch.finfo(dtype).max / 64
    if not math.isfinite(bound) or bound / eps > limit:
        raise ValueError(
            f"{name}: affinities reach {bound:.3g}, so K/eps overflows {dtype} at eps = {eps:g}; "
            "rescale the inputs, use cost='cosine', or float64"
        )


def check_finite_result(what: str, cause: str, **tensors: Tensor) -> None:
    """A result that came out NaN or Inf is an error naming what and why, never returned."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {name} is not finite ({cause})")
