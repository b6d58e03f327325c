"""A trained alignment: frozen-encoder features in, unit vectors in the shared space out.

    model = sotalign.load("runs/sotalign")
    s = model.similarity(image_features, text_features)       # cosine, images × texts
    W = model.zero_shot_classifier(names, ["a photo of a {}."], "platonic:data/")
    predicted = (model.embed_images(image_features) @ W.T).argmax(1)

The files of a run directory are listed in :mod:`sotalign.rundir`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from ..ot.validation import as_matrix, unit_rows
from ..rundir import (
    CHECKPOINT,
    CONFIG_FILE,
    HEADS_CONFIG,
    HEADS_FILE,
    METRICS_FILE,
    TEACHER_DIR,
    RunDirError,
    atomic_write,
    load_checkpoint,
    read_json,
    write_json,
)
from .heads import AlignmentHeads
from .methods import get_method
from .teachers import Teacher


class AlignedModel:
    """Embeds frozen image/text features into the aligned space (L2-normalised rows).

    With heads (stage 2): f̂(x) = f(x)/‖f(x)‖, ĝ(y) = g(y)/‖g(y)‖. Without (a `<teacher>+none`
    method): the teacher's maps, normalised, x ↦ (x − μ_x)W_xᵀ / ‖·‖.
    """

    def __init__(
        self, *, heads: AlignmentHeads | None = None, teacher: Teacher | None = None, method: str = ""
    ):
        if heads is None and teacher is None:
            raise ValueError("an AlignedModel needs heads, a teacher, or both")
        self.heads = heads
        self.teacher = teacher
        self.method = method

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device if self.heads is not None else torch.device("cpu")

    def _embed(self, features, embed, batch_size: int) -> Tensor:
        array = features if isinstance(features, Tensor) else np.asarray(features)
        x = as_matrix("features", array, torch.float32, integers=True)
        with torch.no_grad():
            return torch.cat(
                [
                    embed(x[start : start + batch_size].to(self.device)).cpu()
                    for start in range(0, x.shape[0], batch_size)
                ]
            )

    def embed_images(self, features, batch_size: int = 8192) -> Tensor:
        """Unit vectors in the aligned space (CPU float32) of frozen image features (n × d_x)."""
        if self.heads is not None:
            return self._embed(features, self.heads.embed_images, batch_size)
        return self._embed(features, lambda x: unit_rows(self.teacher.transform_images(x)), batch_size)

    def embed_texts(self, features, batch_size: int = 8192) -> Tensor:
        """Unit vectors in the aligned space (CPU float32) of frozen text features (n × d_y)."""
        if self.heads is not None:
            return self._embed(features, self.heads.embed_texts, batch_size)
        return self._embed(features, lambda y: unit_rows(self.teacher.transform_texts(y)), batch_size)

    def similarity(self, image_features, text_features) -> Tensor:
        """Cosine similarity in the aligned space, images × texts."""
        return self.embed_images(image_features) @ self.embed_texts(text_features).T

    def zero_shot_classifier(self, class_names, templates, text_encoder) -> Tensor:
        """C × D class weights: the mean over `templates` of the embedded prompts, normalised.

        `text_encoder` maps a list of prompts to frozen text features, or is a spec string
        ("platonic:<dir>", "sentence-transformers:<name>"). Classify with
        `(model.embed_images(x) @ weights.T).argmax(1)`.
        """
        from ..data import load_text_encoder
        from ..eval import zero_shot_weights

        encoder = load_text_encoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
        return zero_shot_weights(class_names, templates, encoder, self.embed_texts)

    def save_heads(self, run_dir) -> None:
        """Write heads.safetensors and heads.json atomically (nothing for a teacher-only model)."""
        if self.heads is None:
            return
        run_dir = Path(run_dir)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        atomic_write(run_dir / HEADS_FILE, safetensors.torch.save(tensors))
        write_json(run_dir / HEADS_CONFIG, {"method": self.method, **self.heads.config()})


def load(run_dir, *, device: str | torch.device = "cpu", checkpoint: bool = False) -> AlignedModel:
    """The trained model of a run directory written by `sotalign fit` / `sotalign.align.fit`.

    Only a complete run loads (its ``metrics.json`` is written last). ``checkpoint=True`` loads
    the last checkpoint of a run that is still training or was stopped, and says so in the
    model's ``method`` label (``"sotalign (checkpoint: step 300 of 2000)"``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    config = read_json(run_dir / CONFIG_FILE)
    method = config.get("method", "")
    complete = (run_dir / METRICS_FILE).exists()
    if not complete and not checkpoint:
        raise RunDirError(
            f"{run_dir}: the run is not complete (no {METRICS_FILE}); resume it with "
            f"`sotalign fit {run_dir} --resume`, or load its last checkpoint explicitly: "
            f"sotalign.load(..., checkpoint=True) / `sotalign eval {run_dir} --checkpoint`"
        )
    teacher = None
    if (run_dir / TEACHER_DIR).is_dir():
        try:
            teacher = Teacher.load(run_dir / TEACHER_DIR)
        except (OSError, ValueError, KeyError) as error:
            raise RunDirError(str(error).strip("'\"")) from None
    if complete:
        heads = (
            _load_heads(run_dir)
            if (run_dir / HEADS_CONFIG).exists() or (run_dir / HEADS_FILE).exists()
            else None
        )
    else:
        heads, method = _checkpoint_heads(run_dir, config, teacher)
    if heads is None and teacher is None:
        raise RunDirError(f"{run_dir}: neither {HEADS_FILE} nor {TEACHER_DIR}/ found")
    return AlignedModel(heads=heads.to(device) if heads is not None else None, teacher=teacher, method=method)


def _checkpoint_heads(
    run_dir: Path, config: dict, teacher: Teacher | None
) -> tuple[AlignmentHeads | None, str]:
    """The heads of the last checkpoint of an incomplete run, and the label that says so."""
    method, steps = config.get("method", ""), config.get("steps", "?")
    path = run_dir / CHECKPOINT
    if not path.exists():
        if teacher is not None and not get_method(method).trains_heads:
            return None, f"{method} (teacher only; the run did not finish)"
        raise RunDirError(f"{run_dir}: the run is not complete and has no checkpoint yet ({path})")
    state = load_checkpoint(path, torch.device("cpu"))
    if "heads_config" not in state:
        raise RunDirError(
            f"{path}: holds no head configuration (written by an older sotalign); resume the run"
        )
    heads = AlignmentHeads(**state["heads_config"])
    heads.load_state_dict(state["heads"])
    return heads, f"{method} (checkpoint: step {state['step']} of {steps})"


def _load_heads(run_dir: Path) -> AlignmentHeads:
    meta = read_json(run_dir / HEADS_CONFIG)
    meta.pop("method", None)
    try:
        heads = AlignmentHeads(**meta)
    except (TypeError, ValueError) as error:
        raise RunDirError(f"{run_dir / HEADS_CONFIG}: invalid head configuration ({error})") from None
    path = run_dir / HEADS_FILE
    try:
        tensors = safetensors.torch.load(path.read_bytes())
    except FileNotFoundError:
        raise RunDirError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as error:
        raise RunDirError(f"{path}: not a valid safetensors file ({error})") from None
    try:
        heads.load_state_dict(tensors)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise RunDirError(f"{path}: does not match {run_dir / HEADS_CONFIG} ({first})") from None
    return heads
