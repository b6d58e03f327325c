"""Global-batch Sinkhorn and KLOT over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Launch with ``torchrun`` and initialise the process group; every rank passes its own shard::

    import sotalign.distributed as sd
    r = sd.sinkhorn(x, y, eps=0.05, n_iters=100)          # this rank's f (its rows), g (its columns)
    loss = sd.klot(x, y, x_teacher, y_teacher)           # the global KLOT, the same on every rank

See docs/distributed.md for the algorithms, the bytes sent per iteration, DDP scaling and a
plan for a million rows on eight GPUs. This package sits at the ``ot`` layer: it uses
:mod:`sotalign.ot` and the kernels' primitive interface, nothing above.
"""

from .api import DistributedSinkhornResult, all_gather_rows, ddp_scale, klot, sinkhorn
from .comm import DistributedError, Traffic, traffic

__all__ = [
    "DistributedError",
    "DistributedSinkhornResult",
    "Traffic",
    "all_gather_rows",
    "ddp_scale",
    "klot",
    "sinkhorn",
    "traffic",
]
