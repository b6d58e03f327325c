r"""Data-parallel training under ``torchrun``: ranks, batch shards, global loss terms, DDP.

``sotalign fit`` launched with ``torchrun --nproc-per-node N`` trains the same model as one
process with the same global batch:

* **Batches.** The samplers are stateless (batch of step t = function of seed, stream, t), so
  every rank draws the *global* batch of step t and keeps its slice
  (:meth:`sotalign.data.BatchSampler.shard`): the ranks never overlap and together see exactly
  the single-process batch. Nothing about the sampling is stored, so a run resumes on any
  number of ranks.
* **Loss terms.** Each term is the value on the global batch. SigLIP and the other batch
  losses run on embeddings gathered across ranks (:func:`sotalign.distributed.all_gather_rows`),
  identically on every rank. KLOT with ``klot_scope="global"`` is
  :func:`sotalign.distributed.klot` on the sharded unpaired batches (no rank holds more than its
  shard); with ``"local"`` each rank takes the KLOT of its own shard (a cheaper, different
  objective: the mean over ranks of per-rank KLOTs; its logged value is that mean).
* **Gradients.** Gathering and the global KLOT give each rank the gradient wrt *its own*
  embeddings, so the heads' gradient of the global loss is the *sum* over ranks of the per-rank
  gradients, while the loss's own parameters (SigLIP's scale and bias), used identically on
  every rank, get their full gradient on each. DDP *averages* over ranks; so instead of
  multiplying the loss by the world size (which would also multiply the replicated
  parameters' gradients), the embeddings computed from this rank's rows carry a gradient
  factor W (:meth:`Ranks.local`, identity forward). After DDP's average every parameter holds
  the gradient of the global loss, as in one process.
* **Files.** Only rank 0 writes (run directory, teacher, log, checkpoints, metrics); every
  rank reads the checkpoint on resume. The losses' collectives run on their own process group,
  apart from DDP's gradient all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sotalign.distributed as sd

from .losses import klot_divergence
from .timing import StepClock

KLOT_SCOPES = ("local", "global")
#: The losses' process group, created once per process (groups are never freed).
_loss_group: dict = {}


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor: float):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size, the losses' process group (and the
    clock that times KLOT, :class:`~sotalign.align.timing.StepClock`, when the trainer gives one)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    klot_scope: str = "global"
    clock: StepClock | None = None

    @classmethod
    def from_environment(cls, device: torch.device, klot_scope: str = "global") -> Ranks:
        """The current process group, or the one ``torchrun`` describes in the environment
        (initialised here: NCCL for CUDA, gloo for CPU), or a single process."""
        if not dist.is_available():
            return cls(klot_scope=klot_scope)
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls(klot_scope=klot_scope)
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.get_world_size() == 1:
            return cls(klot_scope=klot_scope)
        if "group" not in _loss_group:
            _loss_group["group"] = dist.new_group(backend=dist.get_backend())
        return cls(dist.get_rank(), dist.get_world_size(), _loss_group["group"], klot_scope)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local(self, t: Tensor) -> Tensor:
        """An embedding of this rank's rows: unchanged, its gradient times the world size."""
        return _ScaleGrad.apply(t, float(self.world)) if self.distributed else t

    def gather(self, t: Tensor | None) -> Tensor | None:
        """The rows of ``t`` of every rank, in rank order (the global batch)."""
        if t is None or not self.distributed:
            return t
        return sd.all_gather_rows(t, self.group)

    def klot(self, img: Tensor, txt: Tensor, teacher_img: Tensor, teacher_txt: Tensor, **options) -> Tensor:
        """KLOT of the global batch (scope ``global``) or of this rank's shard (``local``)."""
        if self.clock is None:
            return self._klot(img, txt, teacher_img, teacher_txt, **options)
        return self.clock.timed("klot", self._klot, img, txt, teacher_img, teacher_txt, **options)

    def _klot(self, img: Tensor, txt: Tensor, teacher_img: Tensor, teacher_txt: Tensor, **options) -> Tensor:
        if not self.distributed:
            return klot_divergence(img, txt, teacher_img, teacher_txt, **options)
        if self.klot_scope == "global":
            return sd.klot(img, txt, teacher_img, teacher_txt, group=self.group, cost="cosine", **options)
        own = klot_divergence(img, txt, teacher_img, teacher_txt, **options) / self.world
        # the value is the mean over ranks; the gradient is this rank's own share of it
        mean = own.detach().clone()
        dist.all_reduce(mean, group=self.group)
        return own + (mean - own.detach())

    def on_main(self, fn) -> None:
        """Run ``fn`` (which writes files) on rank 0 only; every rank raises if it failed."""
        if not self.distributed:
            fn()
            return
        outcome = [None]
        if self.is_main:
            try:
                fn()
            except Exception as error:  # re-raised below, on every rank
                outcome = [(type(error), str(error))]
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        if outcome[0] is not None:
            kind, message = outcome[0]
            raise (kind if issubclass(kind, (ValueError, TypeError, OSError)) else RuntimeError)(
                message if self.is_main else f"rank 0: {message}"
            )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one (e.g. a Ctrl-C seen by one rank)."""
        if not self.distributed:
            return flag
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(self.group) == "nccl"
            else None
        )
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())


def data_parallel(module: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when there are several ranks."""
    if not ranks.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
