"""Stage 1 (linear teachers) and stage 2 (alignment heads, losses, recipes, trainer) of SOTAlign.

from sotalign.align import TrainConfig, AlignmentData, DataSpec, fit
data = AlignmentData.from_spec(DataSpec(images="images.npy", texts="texts.npy", n_pairs=1000))
model = fit(TrainConfig(method="sotalign", steps=500), data, "runs/sotalign")
"""

from .config import ConfigError, DataSpec, TrainConfig, load_config
from .heads import AlignmentHeads, make_head
from .losses import DIVERGENCES, InfoNCELoss, SigLIPLoss, divergence
from .methods import METHODS, Batch, Recipe, get_method, loss_terms
from .teachers import TEACHER_NAMES, Teacher, make_teacher
from .trainer import AlignmentData, Rows, compare, fit

__all__ = [
    "DIVERGENCES",
    "METHODS",
    "TEACHER_NAMES",
    "AlignmentData",
    "AlignmentHeads",
    "Batch",
    "ConfigError",
    "DataSpec",
    "InfoNCELoss",
    "Recipe",
    "Rows",
    "SigLIPLoss",
    "Teacher",
    "TrainConfig",
    "compare",
    "divergence",
    "fit",
    "get_method",
    "load_config",
    "loss_terms",
    "make_head",
    "make_teacher",
]
