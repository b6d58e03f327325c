r"""Stage-2 alignment heads f: R^{d_x} → R^d and g: R^{d_y} → R^d (paper §3.1, App. A.1).

The paper's heads are single linear layers to d = 1024 ("more robust in our low-supervision
regime than non-linear layers"); an MLP (Linear–GELU–Linear) is offered for the SUE protocol.
Embeddings are the L2-normalised outputs, so K = cos(f(X), g(Y)) = f̂(X) ĝ(Y)ᵀ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ot.validation import check_count, unit_rows

HEAD_KINDS = ("linear", "mlp")


def make_head(
    in_dim: int, out_dim: int = 1024, kind: str = "linear", hidden_dim: int | None = None
) -> nn.Module:
    """One head: ``"linear"`` = nn.Linear(in_dim, out_dim) (the paper's default), or
    ``"mlp"`` = Linear(in_dim, h) → GELU → Linear(h, out_dim), h = ``hidden_dim`` or
    max(in_dim, out_dim)."""
    in_dim, out_dim = check_count("in_dim", in_dim), check_count("out_dim", out_dim)
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")
    if kind == "linear":
        if hidden_dim is not None:
            raise ValueError("hidden_dim only applies to kind='mlp'")
        return nn.Linear(in_dim, out_dim)
    hidden = max(in_dim, out_dim) if hidden_dim is None else check_count("hidden_dim", hidden_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class AlignmentHeads(nn.Module):
    """The pair of heads (``.image`` = f, ``.text`` = g) with unit-norm outputs.

    ``embed_images(x) = f(x)/‖f(x)‖`` and ``embed_texts(y) = g(y)/‖g(y)‖``; ``config()``
    returns the keyword arguments that rebuild an identical (untrained) module.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        out_dim: int = 1024,
        kind: str = "linear",
        hidden_dim: int | None = None,
    ):
        super().__init__()
        self.image = make_head(image_dim, out_dim, kind, hidden_dim)
        self.text = make_head(text_dim, out_dim, kind, hidden_dim)
        self.image_dim, self.text_dim, self.out_dim = int(image_dim), int(text_dim), int(out_dim)
        self.kind, self.hidden_dim = kind, hidden_dim

    @staticmethod
    def _embed(head: nn.Module, x: Tensor, name: str, dim: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
        return unit_rows(head(x))

    def embed_images(self, x: Tensor) -> Tensor:
        return self._embed(self.image, x, "images", self.image_dim)

    def embed_texts(self, y: Tensor) -> Tensor:
        return self._embed(self.text, y, "texts", self.text_dim)

    def config(self) -> dict:
        return {
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_dim,
            "kind": self.kind,
            "hidden_dim": self.hidden_dim,
        }

    def init_from_teacher(self, teacher) -> None:
        r"""Start where the stage-1 teacher is: f(x) = W_x (x − μ_x), g(y) = W_y (y − μ_y).

        Linear heads only. The first min(d', d) output rows take the teacher's maps (its leading
        components when d < d'), the rest are zero, so cos(f(X), g(Y)) is the teacher's K*.
        Needs a teacher without input normalisation (φ = identity), e.g. CCA.
        """
        if self.kind != "linear":
            raise ValueError("init_from_teacher needs linear heads (head_kind='linear')")
        if getattr(teacher, "normalize_inputs", False):
            raise ValueError(
                f"the {teacher.name} teacher normalises its inputs; a linear head cannot start from it"
            )
        for head, W, mean in (
            (self.image, teacher.image_map, teacher.image_mean),
            (self.text, teacher.text_map, teacher.text_mean),
        ):
            k = min(W.shape[0], self.out_dim)
            weight = torch.zeros_like(head.weight)
            weight[:k] = W[:k].to(weight)
            bias = torch.zeros_like(head.bias)
            bias[:k] = -(W[:k] @ mean).to(bias)
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())
