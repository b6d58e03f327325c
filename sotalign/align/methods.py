r"""Training methods: SOTAlign, its baselines and the Table 1 teacher × divergence grid.

Every method trains linear heads f (images) and g (texts) with the SigLIP loss on a batch of
pairs (A, B) (learned scale init 20, bias −10, as SAIL and the paper) and adds its own use of
the unpaired image batch X and text batch Y, drawn independently of each other:

    sail          SigLIP(f(A), g(B))                                   pairs only
    sail-semi     SigLIP with f(X), g(Y) as extra negatives             (paper §6.3)
    structure     SigLIP + λ Σ_modality STRUCTURE(raw, embedded)        on pairs + unpaired rows
    nnclr         SigLIP + w·SigLIP(f(X), g(B_nn(X))) + w·SigLIP(f(A_nn(Y)), g(Y))
                  B_nn(x): caption of x's nearest paired image; A_nn(y): image of y's nearest
                  paired caption (found once, in the frozen unimodal spaces)
    s-clip        SigLIP + w·[S-CLIP(f(X) → g(B)) + S-CLIP(g(Y) → f(A))] OT pseudo-labels
    T+D           SigLIP + α·D(K[f(X), g(Y)] ‖ K[X W_xᵀ, Y W_yᵀ]), teacher T fitted on the pairs
                  (stage 1), D ∈ {cka, infonce, klot}; T+none is the teacher alone (no heads)
    sotalign      = cca+klot (paper Algorithm 1)

All terms of a method come from one function, :func:`loss_terms`, as a dict of named raw
values; the trainer minimises Σ weight·term with the weights of `Method.weights(alpha)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.spec import role_fields
from ..ot.options import DEFAULT_EPS, DEFAULT_EPS_TEACHER
from .ddp import Ranks
from .losses import DIVERGENCES, SigLIPLoss, divergence, s_clip_loss, structure_regularizer

TEACHERS = ("procrustes", "cca", "contrastive")


@dataclass(frozen=True)
@role_fields("Tensor", roles=("paired", "unpaired"), required=("paired",))
class Batch:
    """One step's inputs (raw frozen-encoder features, on the training device): the pairs and
    the unpaired rows (fields as in :func:`~sotalign.data.spec.role_fields`).

    `teacher_*` are the stage-1 teacher's features of the unpaired rows; `neighbour_*` the
    NNCLR positives (paired captions of the unpaired images, paired images of the unpaired texts).
    """

    teacher_images: Tensor | None = None
    teacher_texts: Tensor | None = None
    neighbour_texts: Tensor | None = None
    neighbour_images: Tensor | None = None


@dataclass(frozen=True)
class Method:
    """A named training method. `needs` lists the batch parts beyond the pairs it uses."""

    name: str

    # Class-level defaults (not options): the stage-1 teacher to fit on the pairs, if any;
    # whether heads are trained (False: the model is the teacher itself); the batch parts
    # used besides the pairs, a subset of {"unpaired", "teacher", "neighbours"}.
    teacher = None
    trains_heads = True
    needs = frozenset()

    def loss_modules(self) -> nn.ModuleDict:
        """Loss modules with learned parameters (trained with the heads)."""
        return nn.ModuleDict({"siglip": SigLIPLoss(init_scale=20.0, init_bias=-10.0)})

    def weights(self, alpha: float) -> dict[str, float]:
        """Weight of each loss term in the total (α weights the Table 1 divergences)."""
        return {"siglip": 1.0}


@dataclass(frozen=True)
class Sail(Method):
    """SAIL: SigLIP on the pairs; `semi=True` adds the unpaired rows as extra negatives."""

    semi: bool = False

    @property
    def needs(self):
        return frozenset({"unpaired"}) if self.semi else frozenset()


@dataclass(frozen=True)
class Structure(Method):
    """SigLIP + λ·STRUCTURE per modality (Gröger et al. 2025; levels 1, τ = 0.07).

    `semi=True` computes the regulariser on the paired and unpaired rows of the batch.
    """

    weight: float = 1.0
    temperature: float = 0.07
    levels: int = 1
    semi: bool = True

    @property
    def needs(self):
        return frozenset({"unpaired"}) if self.semi else frozenset()

    def weights(self, alpha):
        return {"siglip": 1.0, "structure": self.weight}


@dataclass(frozen=True)
class NNCLR(Method):
    """SigLIP + w·SigLIP on nearest-neighbour pseudo-pairs (DeCLIP-style NNCLR, one of top-k)."""

    weight: float = 1.0
    k: int = 1
    needs = frozenset({"unpaired", "neighbours"})

    def weights(self, alpha):
        return {"siglip": 1.0, "nn_images": self.weight, "nn_texts": self.weight}


@dataclass(frozen=True)
class SClip(Method):
    """SigLIP + w·S-CLIP: unpaired images (texts) get OT soft labels over the paired captions
    (images), from the plan between them and the paired images (captions) in the joint space."""

    weight: float = 1.0
    eps: float = DEFAULT_EPS
    temperature: float = 0.07
    needs = frozenset({"unpaired"})

    def weights(self, alpha):
        return {"siglip": 1.0, "s_clip": self.weight}


@dataclass(frozen=True)
class TeacherDivergence(Method):
    """Table 1: stage-1 teacher T, then SigLIP + α·D(student ‖ teacher) on unpaired batches."""

    teacher: str = "cca"
    divergence: str = "klot"

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; expected one of {', '.join(TEACHERS)}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"unknown divergence {self.divergence!r}; expected one of {', '.join(DIVERGENCES)}"
            )

    @property
    def trains_heads(self):
        return self.divergence != "none"

    @property
    def needs(self):
        return frozenset() if self.divergence == "none" else frozenset({"unpaired", "teacher"})

    def weights(self, alpha):
        return {"siglip": 1.0, self.divergence: alpha}


def _registry() -> dict[str, Method]:
    methods: dict[str, Method] = {
        "sotalign": TeacherDivergence("sotalign", teacher="cca", divergence="klot"),
        "sail": Sail("sail"),
        "sail-semi": Sail("sail-semi", semi=True),
        "structure": Structure("structure"),
        "nnclr": NNCLR("nnclr"),
        "s-clip": SClip("s-clip"),
    }
    for teacher in TEACHERS:
        for name in DIVERGENCES:
            methods[f"{teacher}+{name}"] = TeacherDivergence(
                f"{teacher}+{name}", teacher=teacher, divergence=name
            )
    return methods


METHODS: dict[str, Method] = _registry()


def get_method(name: str, **options) -> Method:
    """The method called `name`, with its defaults replaced by `options` (its dataclass fields)."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    method = METHODS[name]
    fields = {f.name for f in dataclasses.fields(method)} - {"name"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"method {name!r} has no option(s) {', '.join(unknown)}"
            f" (options: {', '.join(sorted(fields)) or 'none'})"
        )
    return dataclasses.replace(method, **options)


def loss_terms(
    method: Method,
    batch: Batch,
    heads,
    losses: nn.ModuleDict,
    *,
    eps: float = DEFAULT_EPS,
    eps_teacher: float = DEFAULT_EPS_TEACHER,
    n_iters: int = 100,
    backend: str = "auto",
    ranks: Ranks | None = None,
) -> dict[str, Tensor]:
    """The raw loss terms of one step of `method` (keys as in `method.weights`).

    `heads` is an :class:`AlignmentHeads`; `losses` the method's :meth:`Method.loss_modules`.
    `eps`, `eps_teacher`, `n_iters` and `backend` configure the teacher divergence. Under
    torchrun, `ranks` says which shard of the global batch `batch` is; every term is then the
    value on the global batch (embeddings gathered across ranks, KLOT as `ranks.klot`; see
    :mod:`sotalign.align.ddp`).
    """
    ranks = ranks or Ranks()
    g = ranks.gather
    siglip = losses["siglip"]

    def embed_images(x):
        return ranks.local(heads.embed_images(x))

    def embed_texts(y):
        return ranks.local(heads.embed_texts(y))

    img, txt = g(embed_images(batch.paired_images)), g(embed_texts(batch.paired_texts))
    unpaired = "unpaired" in method.needs
    u_img = embed_images(batch.unpaired_images) if unpaired else None  # this rank's rows
    u_txt = embed_texts(batch.unpaired_texts) if unpaired else None

    if isinstance(method, Sail):
        return {"siglip": siglip(img, txt, extra_texts=g(u_txt), extra_images=g(u_img))}
    terms = {"siglip": siglip(img, txt)}
    if isinstance(method, TeacherDivergence):
        if method.divergence == "none":
            raise ValueError(f"method {method.name!r} is the stage-1 teacher alone: it trains no heads")
        if method.divergence == "klot":
            terms["klot"] = ranks.klot(
                u_img,
                u_txt,
                batch.teacher_images,
                batch.teacher_texts,
                eps=eps,
                eps_teacher=eps_teacher,
                n_iters=n_iters,
                backend=backend,
            )
        else:
            options = {"cka": {}, "infonce": dict(eps_teacher=eps_teacher, temperature=eps)}
            terms[method.divergence] = divergence(
                method.divergence,
                g(u_img),
                g(u_txt),
                g(batch.teacher_images),
                g(batch.teacher_texts),
                **options[method.divergence],
            )
    elif isinstance(method, Structure):
        raw_images, raw_texts, emb_images, emb_texts = g(batch.paired_images), g(batch.paired_texts), img, txt
        if method.semi:
            raw_images = torch.cat([raw_images, g(batch.unpaired_images)])
            raw_texts = torch.cat([raw_texts, g(batch.unpaired_texts)])
            emb_images, emb_texts = torch.cat([img, g(u_img)]), torch.cat([txt, g(u_txt)])
        options = dict(levels=method.levels, temperature=method.temperature)
        terms["structure"] = structure_regularizer(raw_images, emb_images, **options) + structure_regularizer(
            raw_texts, emb_texts, **options
        )
    elif isinstance(method, NNCLR):
        terms["nn_images"] = siglip(g(u_img), g(embed_texts(batch.neighbour_texts)))
        terms["nn_texts"] = siglip(g(embed_images(batch.neighbour_images)), g(u_txt))
    elif isinstance(method, SClip):
        options = dict(eps=method.eps, scale=1.0 / method.temperature, n_iters=n_iters, backend=backend)
        terms["s_clip"] = s_clip_loss(g(u_img), img, txt, **options) + s_clip_loss(
            g(u_txt), txt, img, **options
        )
    return terms
