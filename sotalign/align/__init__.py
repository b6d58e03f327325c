"""Stage 1 (linear teachers) and stage 2 (alignment heads, losses, methods, trainer) of SOTAlign.

Example::

    from sotalign.align import TrainConfig, AlignmentData, DataSpec, fit
    data = AlignmentData.from_spec(DataSpec(images="images.npy", texts="texts.npy", n_pairs=1000))
    model = fit(TrainConfig(method="sotalign", steps=500), data, "runs/sotalign")

Needs the ``train`` extra (``pip install 'sotalign[train]'``).
"""

from .._extras import TRAIN_MODULES, require

require("train", TRAIN_MODULES, "sotalign.align (the trainer)")

from ..data import AlignmentData, Rows  # noqa: E402
from .compare import compare  # noqa: E402
from .config import ConfigError, DataSpec, TrainConfig, load_config  # noqa: E402
from .heads import AlignmentHeads, make_head  # noqa: E402
from .losses import DIVERGENCES, InfoNCELoss, SigLIPLoss, divergence  # noqa: E402
from .methods import METHODS, Batch, Method, get_method, loss_terms  # noqa: E402
from .model import AlignedModel, load  # noqa: E402
from .run_inputs import open_run_data, repoint  # noqa: E402
from .teachers import TEACHER_NAMES, Teacher, make_teacher  # noqa: E402
from .trainer import TrainingInterrupted, fit  # noqa: E402

__all__ = [
    "DIVERGENCES",
    "METHODS",
    "TEACHER_NAMES",
    "AlignedModel",
    "AlignmentData",
    "AlignmentHeads",
    "Batch",
    "ConfigError",
    "DataSpec",
    "InfoNCELoss",
    "Method",
    "Rows",
    "SigLIPLoss",
    "Teacher",
    "TrainConfig",
    "TrainingInterrupted",
    "compare",
    "divergence",
    "fit",
    "get_method",
    "load",
    "load_config",
    "loss_terms",
    "make_head",
    "make_teacher",
    "open_run_data",
    "repoint",
]
