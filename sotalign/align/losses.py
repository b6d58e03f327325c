r"""Losses of SOTAlign's Stage 2 and of its baselines (paper §3, §5, Eqs. 3, 9, 10, 12).

Embeddings passed in are the heads' outputs. The paired losses (SigLIP, InfoNCE, S-CLIP)
take them as given (L2-normalised rows, e.g. :meth:`AlignmentHeads.embed_images`); the
divergences and STRUCTURE L2-normalise their inputs themselves, because their maths is stated
on cosine affinities (normalising a unit vector again changes nothing).

Notation: x̂_i (n rows) and ŷ_j (m rows) are unit image and text embeddings,
K = cos(img, txt) = x̂ ŷᵀ ∈ R^{n×m} the student affinity and K* = cos(teacher_img, teacher_txt)
the teacher affinity on the same rows and columns. The teacher is a constant: no gradient
flows to ``teacher_img`` or ``teacher_txt``.

    SigLIP              −(1/n) Σ_i Σ_j log σ(z_ij (t K_ij + b)),  z_ij = +1 if i = j else −1
    InfoNCE (Eq. 3)     −(1/2n) Σ_i [log softmax_j(K_ij/τ)_i + log softmax_j(K_ji/τ)_i]
    KLOT (Eq. 12)       KL(OT_ε*(K*) ‖ OT_ε(K))
    1 − CKA (Eq. 9/29)  1 − ⟨H_n K H_m, H_n K* H_m⟩ / (‖H_n K H_m‖ ‖H_n K* H_m‖)
    gen. InfoNCE (Eq. 10) (1/n) Σ_i KL(Softmax_ε*(K*)_i ‖ Softmax_τ(K)_i)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ot import klot, sinkhorn
from ..ot.options import DEFAULT_EPS, DEFAULT_EPS_TEACHER
from ..ot.validation import check_count, check_matrices, check_positive, check_real, unit_rows

DIVERGENCES = ("none", "cka", "infonce", "klot")


def _check_matrices(**tensors: Tensor | None) -> None:
    """Each given tensor: 2-D, floating, non-empty, finite; all on one device."""
    check_matrices(**{name: t for name, t in tensors.items() if t is not None})


def _same_dim(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
        )


def _same_rows(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same number of rows, got {a.shape[0]} and {b.shape[0]}"
        )


def _check_divergence_inputs(img, txt, teacher_img, teacher_txt) -> None:
    _check_matrices(img=img, txt=txt, teacher_img=teacher_img, teacher_txt=teacher_txt)
    _same_dim("img", img, "txt", txt)
    _same_dim("teacher_img", teacher_img, "teacher_txt", teacher_txt)
    _same_rows("img", img, "teacher_img", teacher_img)
    _same_rows("txt", txt, "teacher_txt", teacher_txt)


# --------------------------------------------------------------------------- paired losses


def siglip_loss(
    img: Tensor,
    txt: Tensor,
    scale,
    bias,
    *,
    extra_texts: Tensor | None = None,
    extra_images: Tensor | None = None,
) -> Tensor:
    r"""Sigmoid loss of SigLIP (Zhai et al. 2023) on n pairs, with optional extra negatives.

    With logits l_ij = t ⟨x̂_i, ŷ_j⟩ + b (t = ``scale``, b = ``bias``) and labels z_ij = +1 on the
    diagonal, −1 elsewhere:

        L = −(1/n) Σ_{i,j} log σ(z_ij l_ij)        (sum over columns, mean over the n images).

    ``extra_texts`` (n_t×d) and ``extra_images`` (n_i×d) are unpaired samples appended as extra
    negatives (the semi-supervised SAIL baseline): every paired image against every extra text
    and every extra image against every paired text adds −log σ(−l). Extra samples are not
    compared with each other. The sum is still divided by the n pairs, so the paired part keeps
    its scale whatever the number of extras.
    """
    _check_matrices(img=img, txt=txt, extra_texts=extra_texts, extra_images=extra_images)
    _same_rows("img", img, "txt", txt)
    _same_dim("img", img, "txt", txt)
    if extra_texts is not None:
        _same_dim("img", img, "extra_texts", extra_texts)
    if extra_images is not None:
        _same_dim("txt", txt, "extra_images", extra_images)
    n = img.shape[0]
    logits = scale * (img @ txt.T) + bias
    labels = 2.0 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1.0
    total = -F.logsigmoid(labels * logits).sum()
    if extra_texts is not None:
        total = total - F.logsigmoid(-(scale * (img @ extra_texts.T) + bias)).sum()
    if extra_images is not None:
        total = total - F.logsigmoid(-(scale * (extra_images @ txt.T) + bias)).sum()
    return total / n


class SigLIPLoss(nn.Module):
    """SigLIP with a learned logit scale t = exp(``log_scale``) and bias b (SAIL, paper §3.2).

    Initialised to t = 20, b = −10 as in the paper; see :func:`siglip_loss` for the value.
    """

    def __init__(self, init_scale: float = 20.0, init_bias: float = -10.0):
        super().__init__()
        init_scale = check_positive("init_scale", init_scale)
        init_bias = check_real("init_bias", init_bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(init_bias))

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        *,
        extra_texts: Tensor | None = None,
        extra_images: Tensor | None = None,
    ) -> Tensor:
        return siglip_loss(
            img, txt, self.scale, self.bias, extra_texts=extra_texts, extra_images=extra_images
        )


def infonce_loss(img: Tensor, txt: Tensor, temperature=0.07) -> Tensor:
    r"""Symmetric InfoNCE (CLIP; paper Eq. 3 averaged over both directions) on n pairs.

        L = −(1/2n) Σ_i [ log softmax_j(⟨x̂_i, ŷ_j⟩/τ)_i + log softmax_j(⟨ŷ_i, x̂_j⟩/τ)_i ]

    ``temperature`` τ may be a float or a scalar tensor (learned).
    """
    _check_matrices(img=img, txt=txt)
    _same_rows("img", img, "txt", txt)
    _same_dim("img", img, "txt", txt)
    if not isinstance(temperature, Tensor):
        temperature = check_positive("temperature", temperature)
    logits = (img @ txt.T) / temperature
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class InfoNCELoss(nn.Module):
    """InfoNCE with a learned temperature, CLIP style: τ = 1 / exp(``log_scale``), init 0.07.

    As in CLIP the scale 1/τ is clamped to at most ``max_scale`` (100).
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        init_temperature = check_positive("init_temperature", init_temperature)
        self.max_scale = check_positive("max_scale", max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, img: Tensor, txt: Tensor) -> Tensor:
        return infonce_loss(img, txt, self.temperature)


# --------------------------------------------------------------------------- divergences


def klot_divergence(img: Tensor, txt: Tensor, teacher_img: Tensor, teacher_txt: Tensor, **options) -> Tensor:
    r"""KLOT(K ‖ K*) = KL(OT_ε*(K*) ‖ OT_ε(K)) (paper Eq. 12) with cosine affinities.

    Exactly :func:`sotalign.klot` with ``cost="cosine"`` and its defaults; gradient
    (P − P*)/ε (Theorem 5.1/C.4). Keyword ``options`` (``eps``, ``eps_teacher``, ``n_iters``,
    ``backend``, ``path``, ``tol``, ...) go to it.
    """
    return klot(img, txt, teacher_img, teacher_txt, cost="cosine", **options)


def cka_divergence(img: Tensor, txt: Tensor, teacher_img: Tensor, teacher_txt: Tensor) -> Tensor:
    r"""1 − CKA(K, K*) (paper Eq. 9 / 29) for the rectangular n×m cosine affinities.

    Eq. 9 reads CKA = ⟨K H, H K*⟩ / √(⟨K H, H K⟩ ⟨K* H, H K*⟩) with H = I − 11ᵀ/n. For an n×m
    K the right factor is H_m (m×m) and the left one H_n (n×n); since H is symmetric and
    idempotent, ⟨K H_m, H_n K*⟩ = ⟨H_n K H_m, H_n K* H_m⟩, so CKA is the cosine similarity of
    the *doubly centred* affinities (Prop. C.5) — row means and column means removed.

    With K = x̂ ŷᵀ, H_n K H_m = x̃ ỹᵀ for the row-centred features x̃ = H_n x̂, ỹ = H_m ŷ, so
    (Prop. C.6) ⟨x̃ỹᵀ, x̃*ỹ*ᵀ⟩ = ⟨x̃ᵀx̃*, ỹᵀỹ*⟩_F needs only d×d* products: O((n+m)d + d d*)
    memory, never n×m. Invariant to positive scaling of K or K* and to adding constants.
    """
    _check_divergence_inputs(img, txt, teacher_img, teacher_txt)
    if img.shape[0] < 2 or txt.shape[0] < 2:
        raise ValueError(
            f"CKA needs at least 2 rows and 2 columns, got K of shape {(img.shape[0], txt.shape[0])}"
        )
    x = unit_rows(img)
    y = unit_rows(txt)
    xt = unit_rows(teacher_img.detach()).to(x.dtype)
    yt = unit_rows(teacher_txt.detach()).to(x.dtype)
    x, y = x - x.mean(0), y - y.mean(0)
    xt, yt = xt - xt.mean(0), yt - yt.mean(0)
    cross = ((x.T @ xt) * (y.T @ yt)).sum()
    norm_student = ((x.T @ x) * (y.T @ y)).sum()
    norm_teacher = ((xt.T @ xt) * (yt.T @ yt)).sum()
    tiny = torch.finfo(cross.dtype).tiny
    return 1.0 - cross / (norm_student * norm_teacher).clamp_min(tiny).sqrt()


def generalized_infonce_divergence(
    img: Tensor,
    txt: Tensor,
    teacher_img: Tensor,
    teacher_txt: Tensor,
    *,
    eps_teacher: float = DEFAULT_EPS_TEACHER,
    temperature: float = 0.05,
    symmetric: bool = False,
) -> Tensor:
    r"""Generalised InfoNCE (Shi et al. 2024; paper Eq. 10), a row-wise KL of softmaxes.

        D(K ‖ K*) = (1/n) Σ_i KL( Softmax_ε*(K*)_i ‖ Softmax_τ(K)_i ),
        Softmax_ε(K)_ij = exp(K_ij/ε) / Σ_k exp(K_ik/ε),

    ε* = ``eps_teacher`` (0.01, as KLOT's teacher), τ = ``temperature`` (default 0.05, KLOT's
    student ε). With K* = I_n and ε* → 0 the target rows are one-hot and D is the one-way
    InfoNCE −(1/n) Σ_i log Softmax_τ(K)_ii (Eq. 3). ``symmetric=True`` averages with the same
    divergence on the columns (Kᵀ, K*ᵀ).
    """
    _check_divergence_inputs(img, txt, teacher_img, teacher_txt)
    eps_teacher = check_positive("eps_teacher", eps_teacher)
    temperature = check_positive("temperature", temperature)
    K = unit_rows(img) @ unit_rows(txt).T
    K_t = unit_rows(teacher_img.detach()) @ unit_rows(teacher_txt.detach()).T
    K_t = K_t.to(K.dtype)

    def rows(student: Tensor, teacher: Tensor) -> Tensor:
        log_target = torch.log_softmax(teacher / eps_teacher, dim=1)
        log_model = torch.log_softmax(student / temperature, dim=1)
        return (log_target.exp() * (log_target - log_model)).sum(1).mean()

    value = rows(K, K_t)
    if symmetric:
        value = 0.5 * (value + rows(K.T, K_t.T))
    return value


def divergence(
    name: str, img: Tensor, txt: Tensor, teacher_img: Tensor, teacher_txt: Tensor, **options
) -> Tensor:
    """Dispatch DIV(K ‖ K*) by name: ``"none"`` (a constant 0), ``"cka"``, ``"infonce"``
    (generalised InfoNCE) or ``"klot"``; ``options`` go to the chosen function."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {DIVERGENCES}")
    if name == "none":
        _check_divergence_inputs(img, txt, teacher_img, teacher_txt)
        return img.new_zeros(())
    function = {"cka": cka_divergence, "infonce": generalized_infonce_divergence, "klot": klot_divergence}[
        name
    ]
    return function(img, txt, teacher_img, teacher_txt, **options)


# --------------------------------------------------------------------------- baselines


def structure_regularizer(raw: Tensor, emb: Tensor, *, levels: int = 1, temperature: float = 0.07) -> Tensor:
    r"""The STRUCTURE regulariser (Gröger et al. 2025), as we read it.

    It keeps the neighbourhood structure of the frozen unimodal features ``raw`` (n×d_raw) in
    the aligned embeddings ``emb`` (n×d) of the same n samples. For Z ∈ {raw, emb}: rows are
    L2-normalised, then centred by the batch mean (z̃_i = ẑ_i − mean_k ẑ_k), and

        S_Z = Softmax_τ(z̃ z̃ᵀ)          (row-wise, τ = ``temperature``, the paper's 0.07)
        R = (1/L) Σ_{l=1..L} (1/n) Σ_i JS( (S_raw^l)_i ‖ (S_emb^l)_i ),
        JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = (p + q)/2,

    where S^l is the l-th matrix power (l-step random-walk neighbourhoods) and L = ``levels``
    (the paper's setting is 1). R ≥ 0, and R = 0 when emb equals raw up to a positive scale.
    ``raw`` is a constant (detached). The baseline adds λ·R per modality to its InfoNCE loss.
    This is our reading of the STRUCTURE paper (levels averaged with equal weight, JS summed
    over a row and averaged over rows).
    """
    _check_matrices(raw=raw, emb=emb)
    _same_rows("raw", raw, "emb", emb)
    levels = check_count("levels", levels)
    temperature = check_positive("temperature", temperature)

    def transition(z: Tensor) -> Tensor:
        z = unit_rows(z)
        z = z - z.mean(0)
        return torch.softmax((z @ z.T) / temperature, dim=1)

    p_one = transition(raw.detach().to(emb.dtype))
    q_one = transition(emb)
    p, q = p_one, q_one
    total = emb.new_zeros(())
    for level in range(1, levels + 1):
        if level > 1:
            p, q = p @ p_one, q @ q_one
        mid = 0.5 * (p + q)
        js = 0.5 * (p * (p.log() - mid.log())).sum(1) + 0.5 * (q * (q.log() - mid.log())).sum(1)
        total = total + js.mean()
    return total / levels


def s_clip_targets(
    unpaired: Tensor,
    paired: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    n_iters: int = 100,
    hard: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""S-CLIP pseudo-labels (Mo et al. 2023): soft targets of each unpaired sample over the pairs.

    P = OT_ε(cos(unpaired, paired)) is the entropic plan with uniform marginals (via
    :func:`sotalign.sinkhorn`), and the target row i is P_i / Σ_j P_ij, a distribution over the
    paired samples j (each row sums to 1). ``hard=True`` takes the one-hot argmax instead.
    Returns a detached n_u × n_p tensor.
    """
    _check_matrices(unpaired=unpaired, paired=paired)
    _same_dim("unpaired", unpaired, "paired", paired)
    plan = sinkhorn(
        unpaired.detach(), paired.detach(), eps=eps, n_iters=n_iters, cost="cosine", backend=backend
    ).plan()
    if hard:
        return F.one_hot(plan.argmax(1), paired.shape[0]).to(plan.dtype)
    return plan / plan.sum(1, keepdim=True)


def s_clip_loss(
    unpaired_img: Tensor,
    paired_img: Tensor,
    paired_txt: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0 / 0.07,
    n_iters: int = 100,
    hard: bool = False,
    unpaired_img_raw: Tensor | None = None,
    paired_img_raw: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""S-CLIP caption-level pseudo-labelling loss (Mo et al. 2023; paper §5).

    Targets T = :func:`s_clip_targets` of the unpaired images over the paired images (in the
    joint space, or in the frozen unimodal space when ``unpaired_img_raw`` and
    ``paired_img_raw`` are given); paired image j's caption is paired_txt_j, so

        L = −(1/n_u) Σ_i Σ_j T_ij log softmax_j( s ⟨x̂_i, ŷ_j⟩ ),    s = ``scale`` (CLIP's 1/0.07).

    The same function serves unpaired texts with the roles swapped
    (``s_clip_loss(unpaired_txt, paired_txt, paired_img)``). Targets are detached.
    """
    _check_matrices(unpaired_img=unpaired_img, paired_img=paired_img, paired_txt=paired_txt)
    _same_rows("paired_img", paired_img, "paired_txt", paired_txt)
    _same_dim("unpaired_img", unpaired_img, "paired_txt", paired_txt)
    scale = check_positive("scale", scale)
    if (unpaired_img_raw is None) != (paired_img_raw is None):
        raise ValueError("give both unpaired_img_raw and paired_img_raw, or neither")
    if unpaired_img_raw is None:
        unpaired_img_raw, paired_img_raw = unpaired_img, paired_img
    else:
        _check_matrices(unpaired_img_raw=unpaired_img_raw, paired_img_raw=paired_img_raw)
        _same_rows("unpaired_img_raw", unpaired_img_raw, "unpaired_img", unpaired_img)
        _same_rows("paired_img_raw", paired_img_raw, "paired_img", paired_img)
    targets = s_clip_targets(
        unpaired_img_raw, paired_img_raw, eps=eps, n_iters=n_iters, hard=hard, backend=backend
    )
    log_q = torch.log_softmax(scale * (unpaired_img @ paired_txt.T), dim=1)
    return -(targets.to(log_q.dtype) * log_q).sum(1).mean()


def nnclr_positives(query_raw: Tensor, pool_raw: Tensor, k: int = 1, *, chunk_size: int = 4096) -> Tensor:
    r"""Indices (n_q × k, int64) of the k nearest pool rows of each query by cosine similarity.

    Used by the NNCLR baseline in a frozen unimodal space: an unpaired image gets the caption of
    its nearest paired image as a positive, an unpaired text the image of its nearest paired
    caption. Columns are sorted by decreasing similarity. Queries and pool are processed in
    ``chunk_size`` blocks with a running top-k, so memory is O(chunk² + n_q k), never
    n_q × n_pool. Pick one of the k with :func:`sample_neighbors`.
    """
    _check_matrices(query_raw=query_raw, pool_raw=pool_raw)
    _same_dim("query_raw", query_raw, "pool_raw", pool_raw)
    k = check_count("k", k)
    chunk_size = check_count("chunk_size", chunk_size)
    if k > pool_raw.shape[0]:
        raise ValueError(f"k = {k} exceeds the pool size {pool_raw.shape[0]}")
    with torch.no_grad():
        queries = unit_rows(query_raw.float())
        pool = unit_rows(pool_raw.float())
        out = []
        for q0 in range(0, queries.shape[0], chunk_size):
            q = queries[q0 : q0 + chunk_size]
            best = q.new_full((q.shape[0], 0), -math.inf)
            best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
            for p0 in range(0, pool.shape[0], chunk_size):
                sims = q @ pool[p0 : p0 + chunk_size].T
                values, idx = sims.topk(min(k, sims.shape[1]), dim=1)
                merged = torch.cat([best, values], dim=1)
                merged_idx = torch.cat([best_idx, idx + p0], dim=1)
                best, order = merged.topk(min(k, merged.shape[1]), dim=1)
                best_idx = merged_idx.gather(1, order)
            out.append(best_idx)
        return torch.cat(out)


def sample_neighbors(indices: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One of the k neighbours per row of :func:`nnclr_positives`, uniformly at random (n_q,)."""
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.dtype != torch.long:
        raise TypeError("indices must be the (n_q, k) int64 tensor of nnclr_positives")
    pick = torch.randint(
        0,
        indices.shape[1],
        (indices.shape[0], 1),
        generator=generator,
        device=generator.device if generator is not None else indices.device,
    )
    return indices.gather(1, pick.to(indices.device)).squeeze(1)
