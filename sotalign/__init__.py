"""sotalign: fast, memory-lean kernels for SOTAlign's optimal-transport loss (KLOT).

    import sotalign
    r = sotalign.sinkhorn(x, y, eps=0.05)             # potentials r.f, r.g of the plan
    loss = sotalign.klot(x, y, x_teacher, y_teacher)  # KL(P* ‖ P), exact gradient (P − P*)/ε
"""

from .ot import (DEFAULT_MEMORY_BUDGET, KLOTLoss, SinkhornResult, available_backends, klot,
                 klot_dense, sinkhorn, sinkhorn_dense)

__version__ = "0.1.0"
__all__ = ["DEFAULT_MEMORY_BUDGET", "KLOTLoss", "SinkhornResult", "available_backends", "klot",
           "klot_dense", "sinkhorn", "sinkhorn_dense"]
