"""sotalign: fast, memory-lean kernels for SOTAlign's optimal-transport loss (KLOT).

    import sotalign
    r = sotalign.sinkhorn(x, y, eps=0.05)             # potentials r.f, r.g of the plan
    loss = sotalign.klot(x, y, x_teacher, y_teacher)  # KL(P* ‖ P), exact gradient (P − P*)/ε
    model = sotalign.load("runs/sotalign")            # a trained alignment (sotalign fit)
"""

from .ot import (DEFAULT_MEMORY_BUDGET, KLOTLoss, Route, SinkhornResult, available_backends, klot,
                 klot_dense, plan_route, sinkhorn, sinkhorn_dense)
from .align import AlignmentData, DataSpec, TrainConfig, compare, fit  # before .model, which it imports
from .model import AlignedModel, load

__version__ = "0.1.0"
__all__ = ["DEFAULT_MEMORY_BUDGET", "AlignedModel", "AlignmentData", "DataSpec", "KLOTLoss", "SinkhornResult",
           "TrainConfig", "available_backends", "compare", "fit", "klot", "klot_dense", "load", "sinkhorn",
           "sinkhorn_dense"]
__all__ += ["Route", "plan_route"]
