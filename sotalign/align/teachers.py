r"""Stage-1 linear teachers of SOTAlign, fitted on the pairs (A, B) (paper §4, App. C.1).

A ∈ R^{n_p×d_x} (images) and B ∈ R^{n_p×d_y} (texts), rows aligned. Every teacher is affine:

    teacher_img(X) = (φ(X) − μ_x) W_xᵀ,      teacher_txt(Y) = (φ(Y) − μ_y) W_yᵀ,

with W_x ∈ R^{d'×d_x}, W_y ∈ R^{d'×d_y}, μ the pair means (0 for the contrastive teacher) and
φ an optional row L2-normalisation. The teacher affinity of Stage 2 is
K* = cos(teacher_img(X_b), teacher_txt(Y_b)) (Algorithm 1, line 6).

- CCA (Eq. 7 / 18, Prop. C.2; the paper's choice): with the covariances C_xx, C_yy, C_xy of the
  centred pairs and λ = 0.1 added to the eigenvalues of C_xx and C_yy,
  T = (C_xx + λI)^{-1/2} C_xy (C_yy + λI)^{-1/2} = U Σ Vᵀ,
  W_x = U_{:, :d'}ᵀ (C_xx + λI)^{-1/2},  W_y = V_{:, :d'}ᵀ (C_yy + λI)^{-1/2}.
- Procrustes (Eq. 6, Prop. C.1): data row-normalised and centred, C_xy = U Σ Vᵀ,
  W_x = U_{:, :d'}ᵀ, W_y = V_{:, :d'}ᵀ.
- Contrastive (Eq. 8): W_x, W_y minimise SigLIP (or InfoNCE) of K[A W_xᵀ, B W_yᵀ] against I
  (with SigLIP this is the SAIL baseline's model).

CCA and Procrustes need only means and (cross-)covariances, accumulated in float64 in one
streaming pass (:class:`CovarianceAccumulator`), so the pairs never need to be in memory at once.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch
from lion_pytorch import Lion
from safetensors import SafetensorError
from torch import Tensor

from ..ot.validation import as_matrix, check_count, check_positive, check_real, unit_rows
from ..rundir import atomic_write
from .losses import InfoNCELoss, SigLIPLoss

TEACHER_NAMES = ("cca", "procrustes", "contrastive")
FORMAT = "sotalign-teacher"
FORMAT_VERSION = 1
JSON_FILE = "teacher.json"
TENSOR_FILE = "teacher.safetensors"
#: Rows per block when ``fit`` feeds in-memory pairs to the accumulator (bounds fp64 copies).
FIT_BLOCK_ROWS = 16384


def _as_pair(images, texts, dtype: torch.dtype | None = torch.float64) -> tuple[Tensor, Tensor]:
    """Pairs as matrices of ``dtype`` (None: :func:`~sotalign.ot.validation.compute_dtype`'s rule)."""
    A = as_matrix("images", images, dtype, integers=True)
    B = as_matrix("texts", texts, dtype, integers=True)
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"images and texts must have the same number of rows (pairs), got {A.shape[0]} and {B.shape[0]}"
        )
    return A, B


def _optional_dim(name: str, value) -> int | None:
    if value is None:
        return None
    return check_count(name, value)


class CovarianceAccumulator:
    r"""Streaming float64 means and centred (cross-)covariances of paired batches.

    Each batch is centred by its own mean and merged with the running statistics by the
    pairwise update of Chan et al. (exact, and stable when means are large):

        S_xy ← S_xy + S_xy^batch + (n n_b / (n + n_b)) δ_x δ_yᵀ,   δ = μ^batch − μ,

    so ``cov_xy() = S_xy / n = (1/n) Σ_i (a_i − μ_x)(b_i − μ_y)ᵀ`` (the 1/n covariance), and
    likewise for xx and yy unless ``cross_only`` (Procrustes needs only C_xy).
    """

    def __init__(self, cross_only: bool = False):
        self.cross_only = bool(cross_only)
        self.n = 0
        self.mean_x: Tensor | None = None
        self.mean_y: Tensor | None = None
        self.scatter: dict[str, Tensor] = {}

    def update(self, A: Tensor, B: Tensor) -> None:
        """Add a batch of pairs (float64 tensors of equal row count)."""
        if self.n and (A.shape[1] != self.mean_x.shape[0] or B.shape[1] != self.mean_y.shape[0]):
            raise ValueError(
                f"batch dimensions ({A.shape[1]}, {B.shape[1]}) differ from the "
                f"first batch's ({self.mean_x.shape[0]}, {self.mean_y.shape[0]})"
            )
        n_b = A.shape[0]
        mean_x, mean_y = A.mean(0), B.mean(0)
        Ac, Bc = A - mean_x, B - mean_y
        batch = {"xy": Ac.T @ Bc}
        if not self.cross_only:
            batch["xx"], batch["yy"] = Ac.T @ Ac, Bc.T @ Bc
        if self.n == 0:
            self.mean_x, self.mean_y, self.scatter, self.n = mean_x, mean_y, batch, n_b
            return
        total = self.n + n_b
        dx, dy = mean_x - self.mean_x, mean_y - self.mean_y
        weight = self.n * n_b / total
        outer = {"xy": (dx, dy), "xx": (dx, dx), "yy": (dy, dy)}
        for key, value in batch.items():
            u, v = outer[key]
            self.scatter[key] += value + weight * torch.outer(u, v)
        self.mean_x += dx * (n_b / total)
        self.mean_y += dy * (n_b / total)
        self.n = total

    def covariance(self, key: str) -> Tensor:
        """``"xx"``, ``"yy"`` or ``"xy"``: the 1/n covariance of everything added so far."""
        return self.scatter[key] / self.n


class Teacher(abc.ABC):
    """A fitted affine map of each modality into a shared d'-dimensional space (see module doc).

    Attributes: ``name``, ``out_dim`` (d'), ``image_dim``, ``text_dim``, ``n_pairs`` and the
    float64 tensors ``image_mean``, ``text_mean``, ``image_map`` (W_x, d'×d_x),
    ``text_map`` (W_y, d'×d_y).
    """

    name: str = ""
    #: Row-L2-normalise inputs before centring (φ in the module doc).
    normalize_inputs: bool = False

    def __init__(self, out_dim: int | None = None):
        #: d' as asked for (None: the teacher's default); ``out_dim`` is the fitted d'.
        self.requested_out_dim = _optional_dim("out_dim", out_dim)
        self.out_dim = self.requested_out_dim
        self.image_dim: int | None = None
        self.text_dim: int | None = None
        self.n_pairs: int | None = None
        self.image_mean: Tensor | None = None
        self.text_mean: Tensor | None = None
        self.image_map: Tensor | None = None
        self.text_map: Tensor | None = None

    @abc.abstractmethod
    def fit(self, images, texts) -> Teacher:
        """Fit on pairs: ``images`` (n_p×d_x) and ``texts`` (n_p×d_y), torch or numpy."""

    @abc.abstractmethod
    def options(self) -> dict:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this teacher."""

    def extra_tensors(self) -> dict[str, Tensor]:
        """Tensors saved besides the means and maps (diagnostics such as correlations)."""
        return {}

    @property
    def fitted(self) -> bool:
        return self.image_map is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"this {type(self).__name__} is not fitted; call fit() or load()")

    def _set_maps(
        self, image_mean: Tensor, text_mean: Tensor, image_map: Tensor, text_map: Tensor, n_pairs: int
    ) -> None:
        # Contiguous, so a loaded teacher (contiguous by construction) reproduces it bit for bit.
        self.image_mean, self.text_mean = image_mean.contiguous(), text_mean.contiguous()
        self.image_map, self.text_map = image_map.contiguous(), text_map.contiguous()
        self.image_dim, self.text_dim = image_map.shape[1], text_map.shape[1]
        self.out_dim = image_map.shape[0]
        self.n_pairs = int(n_pairs)

    def _prepare(self, X: Tensor) -> Tensor:
        return unit_rows(X) if self.normalize_inputs else X

    def _transform(self, X, name: str, mean: Tensor, W: Tensor) -> Tensor:
        self._require_fitted()
        X = as_matrix(name, X, torch.float32, integers=True)
        device = X.device
        if X.shape[1] != W.shape[1]:
            raise ValueError(
                f"{name} must have {W.shape[1]} features (the fitted dimension), got {X.shape[1]}"
            )
        X = self._prepare(X)
        return (X - mean.to(device, torch.float32)) @ W.to(device, torch.float32).T

    def transform_images(self, A) -> Tensor:
        """(φ(A) − μ_x) W_xᵀ as float32 (·×d'), on A's device."""
        return self._transform(A, "images", self.image_mean, self.image_map)

    def transform_texts(self, B) -> Tensor:
        """(φ(B) − μ_y) W_yᵀ as float32 (·×d'), on B's device."""
        return self._transform(B, "texts", self.text_mean, self.text_map)

    # ----------------------------------------------------------------------- persistence

    def save(self, directory) -> None:
        """Write ``teacher.safetensors`` (means, maps, extras; float64) and ``teacher.json``
        (name, options, dims, format version, SHA-256 of the tensor file).

        Each file is written to a temporary name and renamed into place; the JSON goes last
        and pins the tensor file's checksum, so a torn save is detected on load.
        """
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "image_mean": self.image_mean,
            "text_mean": self.text_mean,
            "image_map": self.image_map,
            "text_map": self.text_map,
            **self.extra_tensors(),
        }
        tensors = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in tensors.items()}
        blob = safetensors.torch.save(tensors)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "options": self.options(),
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_dim,
            "n_pairs": self.n_pairs,
            "tensors": sorted(tensors),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        atomic_write(directory / TENSOR_FILE, blob)
        atomic_write(directory / JSON_FILE, (json.dumps(meta, indent=2) + "\n").encode())

    @staticmethod
    def load(directory) -> Teacher:
        """Rebuild the teacher saved by :meth:`save` (the right subclass, from the JSON name)."""
        directory = Path(directory)
        json_path, tensor_path = directory / JSON_FILE, directory / TENSOR_FILE
        meta = _read_meta(json_path)
        if not tensor_path.is_file():
            raise FileNotFoundError(f"teacher tensor file {tensor_path} not found")
        blob = tensor_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError(
                f"{tensor_path} does not match {json_path}: SHA-256 differs "
                "(modified, truncated, or from another save)"
            )
        try:
            tensors = safetensors.torch.load(blob)
        except SafetensorError as error:
            raise ValueError(f"{tensor_path} is not a valid safetensors file: {error}") from None
        if sorted(tensors) != meta["tensors"]:
            raise ValueError(
                f"{tensor_path} holds tensors {sorted(tensors)}, but {json_path} lists {meta['tensors']}"
            )
        d_x, d_y, d_out = meta["image_dim"], meta["text_dim"], meta["out_dim"]
        expected = {
            "image_mean": (d_x,),
            "text_mean": (d_y,),
            "image_map": (d_out, d_x),
            "text_map": (d_out, d_y),
        }
        for key, shape in expected.items():
            if key not in tensors:
                raise ValueError(f"{tensor_path} lacks the tensor {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{tensor_path}: {key} has shape {tuple(tensors[key].shape)}, "
                    f"expected {shape} from {json_path}"
                )
        for key, value in tensors.items():
            if not value.dtype.is_floating_point or not bool(torch.isfinite(value).all()):
                raise ValueError(f"{tensor_path}: tensor {key!r} is not finite floating point")
        cls = _REGISTRY[meta["name"]]
        try:
            teacher = cls(**meta["options"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{json_path}: invalid options for {meta['name']!r}: {error}") from None
        teacher._set_maps(
            tensors.pop("image_mean"),
            tensors.pop("text_mean"),
            tensors.pop("image_map"),
            tensors.pop("text_map"),
            meta["n_pairs"],
        )
        teacher._load_extras(tensors)
        return teacher

    def _load_extras(self, tensors: dict[str, Tensor]) -> None:  # noqa: B027 (optional hook)
        """Restore :meth:`extra_tensors` after load (nothing to restore by default)."""

    def __repr__(self) -> str:
        dims = f", dims=({self.image_dim}, {self.text_dim}) → {self.out_dim}" if self.fitted else ""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts}{dims})"


def _read_meta(json_path: Path) -> dict:
    if not json_path.is_file():
        raise FileNotFoundError(f"teacher file {json_path} not found")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a sotalign teacher file (format {FORMAT!r} expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has format version {meta.get('format_version')!r}; "
            f"this sotalign reads version {FORMAT_VERSION}"
        )
    if meta.get("name") not in _REGISTRY:
        raise ValueError(
            f"{json_path}: unknown teacher name {meta.get('name')!r}; expected one of {TEACHER_NAMES}"
        )
    for key in ("image_dim", "text_dim", "out_dim", "n_pairs"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{json_path}: {key} must be a positive integer, got {value!r}")
    if not isinstance(meta.get("options"), dict):
        raise ValueError(f"{json_path}: options must be a JSON object")
    if not isinstance(meta.get("tensors"), list) or not isinstance(meta.get("sha256"), str):
        raise ValueError(f"{json_path}: missing the tensor list or checksum")
    return meta


class _StreamedTeacher(Teacher):
    """A teacher computed from streamed first and second moments of the pairs."""

    cross_only = False

    def fit(self, images, texts) -> Teacher:
        A, B = _as_pair(images, texts, None)
        return self.fit_stream(
            (A[i : i + FIT_BLOCK_ROWS], B[i : i + FIT_BLOCK_ROWS])
            for i in range(0, A.shape[0], FIT_BLOCK_ROWS)
        )

    def fit_stream(self, batches: Iterable[tuple]) -> Teacher:
        """Fit from an iterable of ``(images_batch, texts_batch)`` pairs in one pass.

        Each batch is converted to float64, preprocessed (φ) and folded into a
        :class:`CovarianceAccumulator`; the result equals :meth:`fit` on the concatenation
        up to float64 rounding.
        """
        accumulator = CovarianceAccumulator(cross_only=self.cross_only)
        for index, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"batch {index} must be an (images, texts) pair, got {type(batch).__name__}")
            A, B = _as_pair(*batch)
            accumulator.update(self._prepare(A), self._prepare(B))
        if accumulator.n == 0:
            raise ValueError("no pairs given: the batches were empty")
        if accumulator.n < 2:
            raise ValueError(f"{self.name} needs at least 2 pairs, got {accumulator.n}")
        self._solve(accumulator)
        return self

    @abc.abstractmethod
    def _solve(self, accumulator: CovarianceAccumulator) -> None:
        """Set the maps from the accumulated statistics."""

    def _components(self, d_x: int, d_y: int, default: int) -> int:
        k = self.requested_out_dim
        if k is None:
            return default
        if k > min(d_x, d_y):
            raise ValueError(f"out_dim = {k} exceeds min(d_x, d_y) = {min(d_x, d_y)}")
        return k


def _sign_fix(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so U's largest-magnitude entry is positive (a deterministic
    choice among the ±1 ambiguity, so refits on the same data give the same maps)."""
    rows = U.abs().argmax(0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def _inverse_sqrt(C: Tensor, reg: float, name: str) -> Tensor:
    """(C + reg·I)^{-1/2} from the eigendecomposition of the symmetric C (torch.linalg.eigh)."""
    values, vectors = torch.linalg.eigh(C)
    values = values.clamp_min(0) + reg
    if float(values.min()) <= 1e-12 * max(float(values.max()), 1e-300):
        raise ValueError(f"the {name} covariance is singular; use reg > 0")
    return (vectors * values.rsqrt()) @ vectors.T


class CCATeacher(_StreamedTeacher):
    r"""Regularised CCA (paper Eq. 7 / 18, Prop. C.2), λ = ``reg`` = 0.1 as in the paper.

    C_xx, C_yy, C_xy are the 1/n covariances of the centred pairs (so λ means the same at any
    number of pairs; the paper writes AᵀA, whose scale grows with n_p). Then
    S_x = (C_xx + λI)^{-1/2} (via ``torch.linalg.eigh``), S_y likewise,
    S_x C_xy S_y = U diag(ρ) Vᵀ (ρ non-increasing: the regularised canonical correlations,
    ``self.correlations``), W_x = U_{:, :d'}ᵀ S_x, W_y = V_{:, :d'}ᵀ S_y,
    d' = ``out_dim`` (default min(d_x, d_y, n_p)).

    The teacher features Z_x = (A − μ_x) W_xᵀ of the training pairs satisfy exactly
    Z_xᵀ Z_y / n = diag(ρ) and Z_xᵀ Z_x / n = U_kᵀ S_x C_xx S_x U_k; for d' = d_x its eigenvalues
    are c/(c + λ) ≤ 1 over the eigenvalues c of C_xx (all ≤ 1 for any d'), so Z_x is whitened
    up to this shrinkage of low-variance directions, and exactly (Z_xᵀZ_x/n = I) when λ = 0.
    """

    name = "cca"

    def __init__(self, out_dim: int | None = None, reg: float = 0.1, normalize_inputs: bool = False):
        super().__init__(out_dim)
        if check_real("reg", reg) < 0:
            raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
        self.reg = float(reg)
        self.normalize_inputs = bool(normalize_inputs)
        self.correlations: Tensor | None = None

    def options(self) -> dict:
        return {"out_dim": self.requested_out_dim, "reg": self.reg, "normalize_inputs": self.normalize_inputs}

    def _solve(self, acc: CovarianceAccumulator) -> None:
        d_x, d_y = acc.mean_x.shape[0], acc.mean_y.shape[0]
        k = self._components(d_x, d_y, min(d_x, d_y, acc.n))
        S_x = _inverse_sqrt(acc.covariance("xx"), self.reg, "image")
        S_y = _inverse_sqrt(acc.covariance("yy"), self.reg, "text")
        U, rho, Vh = torch.linalg.svd(S_x @ acc.covariance("xy") @ S_y, full_matrices=False)
        U, Vh = _sign_fix(U[:, :k], Vh[:k])
        self.correlations = rho[:k].clone()
        self._set_maps(acc.mean_x.clone(), acc.mean_y.clone(), U.T @ S_x, Vh @ S_y, acc.n)

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"correlations": self.correlations}

    def _load_extras(self, tensors: dict[str, Tensor]) -> None:
        self.correlations = tensors.get("correlations")


class ProcrustesTeacher(_StreamedTeacher):
    r"""Procrustes (paper Eq. 6, Prop. C.1): max ⟨A Pᵀ, B Qᵀ⟩ s.t. P Pᵀ = Q Qᵀ = I_{d'}.

    As in the paper the pairs are first normalised (rows to unit L2 norm — our reading of
    "normalized") and centred; with C_xy = (1/n) Σ (a_i − μ_x)(b_i − μ_y)ᵀ = U Σ Vᵀ,
    W_x = U_{:, :d'}ᵀ and W_y = V_{:, :d'}ᵀ. When d_x ≠ d_y this is the paper's construction
    as stated: P ∈ R^{d'×d_x}, Q ∈ R^{d'×d_y} with orthonormal rows (semi-orthogonal maps into
    a shared d'-space), d' = ``out_dim`` ≤ min(d_x, d_y) (default min(d_x, d_y)). When
    d_x = d_y = d', W_xᵀ W_y = U Vᵀ is the classical orthogonal Procrustes rotation from the
    image to the text space (``image_to_text()``). Only C_xy is accumulated.
    """

    name = "procrustes"
    cross_only = True

    def __init__(self, out_dim: int | None = None, normalize_inputs: bool = True):
        super().__init__(out_dim)
        self.normalize_inputs = bool(normalize_inputs)
        self.singular_values: Tensor | None = None

    def options(self) -> dict:
        return {"out_dim": self.requested_out_dim, "normalize_inputs": self.normalize_inputs}

    def _solve(self, acc: CovarianceAccumulator) -> None:
        d_x, d_y = acc.mean_x.shape[0], acc.mean_y.shape[0]
        k = self._components(d_x, d_y, min(d_x, d_y))
        U, sigma, Vh = torch.linalg.svd(acc.covariance("xy"), full_matrices=False)
        U, Vh = _sign_fix(U[:, :k], Vh[:k])
        self.singular_values = sigma[:k].clone()
        self._set_maps(acc.mean_x.clone(), acc.mean_y.clone(), U.T, Vh, acc.n)

    def image_to_text(self) -> Tensor:
        """W_xᵀ W_y (d_x×d_y): the map taking centred image features to the text space."""
        self._require_fitted()
        return self.image_map.T @ self.text_map

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"singular_values": self.singular_values}

    def _load_extras(self, tensors: dict[str, Tensor]) -> None:
        self.singular_values = tensors.get("singular_values")


class ContrastiveTeacher(Teacher):
    r"""Linear contrastive teacher (paper Eq. 8): (W_x, W_y) = argmin DIV(K[A W_xᵀ, B W_yᵀ] ‖ I).

    DIV is SigLIP (``loss="siglip"``, learned scale/bias init 20/−10 — the SAIL baseline's
    model) or InfoNCE (``loss="infonce"``, learned temperature init 0.07), on the cosine
    affinity of the projected pairs. No centring or input normalisation (μ = 0). Trained for
    ``steps`` steps of Adam (AdamW, decoupled ``weight_decay``, default 0) or Lion
    (``optimizer="adam" | "lion"``) on the full batch (``batch_size=None``) or random mini-batches without
    replacement. Initial maps N(0, 1/d); everything random comes from ``seed`` on the CPU, so
    a fit is deterministic on a given machine. ``loss_history`` holds the loss per step.
    """

    name = "contrastive"
    LOSSES = ("siglip", "infonce")
    OPTIMIZERS = ("adam", "lion")

    def __init__(
        self,
        out_dim: int = 512,
        loss: str = "siglip",
        steps: int = 2000,
        lr: float = 1e-3,
        batch_size: int | None = None,
        seed: int = 0,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
    ):
        if out_dim is None:
            raise ValueError("ContrastiveTeacher needs an explicit out_dim")
        super().__init__(out_dim)
        if loss not in self.LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {self.LOSSES}")
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {self.OPTIMIZERS}")
        self.steps = _optional_dim("steps", steps)
        self.batch_size = _optional_dim("batch_size", batch_size)
        lr = check_positive("lr", lr)
        if check_real("weight_decay", weight_decay) < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        seed = check_count("seed", seed, 0)
        self.loss, self.optimizer = loss, optimizer
        self.lr, self.weight_decay, self.seed = float(lr), float(weight_decay), int(seed)
        self.loss_history: list[float] = []

    def options(self) -> dict:
        return {
            "out_dim": self.out_dim,
            "loss": self.loss,
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
        }

    def fit(self, images, texts) -> ContrastiveTeacher:
        device = images.device if isinstance(images, Tensor) else torch.device("cpu")
        A, B = _as_pair(images, texts, torch.float32)
        A, B = A.to(device), B.to(device)
        n, d_x, d_y = A.shape[0], A.shape[1], B.shape[1]
        if n < 2:
            raise ValueError(f"the contrastive teacher needs at least 2 pairs, got {n}")
        generator = torch.Generator().manual_seed(self.seed)
        W_x = (torch.randn(self.out_dim, d_x, generator=generator) / math.sqrt(d_x)).to(device)
        W_y = (torch.randn(self.out_dim, d_y, generator=generator) / math.sqrt(d_y)).to(device)
        W_x.requires_grad_(True)
        W_y.requires_grad_(True)
        criterion = (SigLIPLoss() if self.loss == "siglip" else InfoNCELoss()).to(device)
        params = [W_x, W_y, *criterion.parameters()]
        if self.optimizer == "lion":
            opt = Lion(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        batch = n if self.batch_size is None else min(self.batch_size, n)
        self.loss_history = []
        for _ in range(self.steps):
            if batch < n:
                index = torch.randperm(n, generator=generator)[:batch].to(device)
                a, b = A[index], B[index]
            else:
                a, b = A, B
            value = criterion(unit_rows(a @ W_x.T), unit_rows(b @ W_y.T))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            self.loss_history.append(float(value.detach()))
        self._set_maps(
            torch.zeros(d_x, dtype=torch.float64),
            torch.zeros(d_y, dtype=torch.float64),
            W_x.detach().cpu().double(),
            W_y.detach().cpu().double(),
            n,
        )
        return self


_REGISTRY: dict[str, type[Teacher]] = {
    "cca": CCATeacher,
    "procrustes": ProcrustesTeacher,
    "contrastive": ContrastiveTeacher,
}


def make_teacher(name: str, **options) -> Teacher:
    """A new (unfitted) teacher by name: ``"cca"``, ``"procrustes"`` or ``"contrastive"``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown teacher {name!r}; expected one of {TEACHER_NAMES}")
    return _REGISTRY[name](**options)
