"""The transport of :mod:`sotalign.distributed`: a thin layer over ``torch.distributed``.

Everything travels through ``torch.distributed`` (gloo on CPU, NCCL on GPU); this module only

* names the ranks of one process group and their shard sizes,
* passes shards around the ring ``rank → rank + 1`` with ``batch_isend_irecv`` while the caller
  computes on the shard it holds (:func:`circulate`),
* combines per-rank partials with all-reduce / all-gather,
* counts the bytes each rank sends (:data:`traffic`), so the measured traffic can be checked
  against the formulas of docs/distributed.md,
* turns a failed or timed-out operation into a :class:`DistributedError` that names this rank,
  the peer ranks and the operation: a rank that died, raised before a collective or called a
  different function makes the others fail within the process group's timeout, never hang.

Bytes are counted per rank as sent on the wire by the usual algorithms: a point-to-point send
counts its payload; an all-reduce of N bytes over W ranks counts 2·(W−1)/W·N (ring
reduce-scatter + all-gather); an all-gather of W chunks of N bytes counts (W−1)·N.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

#: Point-to-point tags: shards and the accumulators that travel after them never cross-match.
SHARD_TAG, CARRY_TAG = 1, 2


class DistributedError(RuntimeError):
    """A collective or transfer failed or timed out; the message names this rank and its peers."""


@dataclass
class Traffic:
    """Bytes sent by this process, by kind of operation, and the seconds it spent blocked in
    them (waiting for a transfer or a collective: communication not hidden behind compute,
    plus waiting for slower ranks), since the last :meth:`reset`."""

    bytes: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @contextmanager
    def blocked(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.seconds.clear()

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


#: The counter every :class:`Comm` adds to.
traffic = Traffic()

#: A gloo group per non-gloo group, for the agreement check (monitored barrier, pickled objects).
_control_groups: dict = {}


class Comm:
    """One process group as seen by this rank."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "sotalign.distributed needs an initialised torch.distributed process "
                "group: launch with torchrun and call torch.distributed."
                "init_process_group() first (gloo on CPU, nccl on GPU)"
            )
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def fail(self, what: str, peers, error: Exception) -> DistributedError:
        peers = "the other ranks" if peers is None else f"ranks {peers}"
        return DistributedError(
            f"rank {self.rank} of {self.world}: {what} with {peers} failed or timed out "
            f"({type(error).__name__}: {error}). A peer rank died, raised before this operation, "
            "or called a different sotalign.distributed function: every rank must make the same "
            "calls in the same order."
        )

    # ------------------------------------------------------------------ point to point

    def shift(self, send: tuple[Tensor, ...], recv: tuple[Tensor, ...], tag: int) -> list:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one."""
        ops = [dist.P2POp(dist.isend, t, self._peer(self.next), self.group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self._peer(self.prev), self.group, tag) for t in recv]
        for t in send:
            traffic.add("p2p", t.numel() * t.element_size())
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as error:
            raise self.fail("a ring transfer", [self.prev, self.next], error) from error

    def wait(self, works: list) -> None:
        try:
            with traffic.blocked("p2p"):
                for work in works:
                    work.wait()
        except RuntimeError as error:
            raise self.fail("a ring transfer", [self.prev, self.next], error) from error

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        """``t`` reduced over the ranks, in place."""
        if self.world > 1:
            traffic.add("all_reduce", 2 * (self.world - 1) / self.world * t.numel() * t.element_size())
            try:
                with traffic.blocked("all_reduce"):
                    dist.all_reduce(t, op=op, group=self.group)
            except RuntimeError as error:
                raise self.fail("an all-reduce", None, error) from error
        return t

    def logsumexp(self, partial: Tensor) -> Tensor:
        """LSE over the ranks of per-rank LSE partials: max first, then the shifted sum."""
        top = self.all_reduce(partial.clone(), dist.ReduceOp.MAX)
        total = self.all_reduce((partial - top).exp_())
        return total.log_().add_(top)

    def all_gather(self, t: Tensor, sizes: list[int]) -> Tensor:
        """The concatenation over ranks of tensors whose first dimension is given by ``sizes``
        (padded to the largest for the transfer)."""
        if self.world == 1:
            return t
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        chunks = [torch.empty_like(padded) for _ in range(self.world)]
        traffic.add("all_gather", (self.world - 1) * padded.numel() * padded.element_size())
        try:
            with traffic.blocked("all_gather"):
                dist.all_gather(chunks, padded.contiguous(), group=self.group)
        except RuntimeError as error:
            raise self.fail("an all-gather", None, error) from error
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)])

    def sizes(self, rows: int, device) -> list[int]:
        """Every rank's ``rows``."""
        if self.world == 1:
            return [rows]
        return self.all_gather(torch.tensor([rows], device=device), [1] * self.world).tolist()

    def agree(self, what: str, fingerprint: dict) -> list[dict]:
        """Every rank's ``fingerprint`` (a small dict), after a barrier that names the ranks
        that did not arrive within the timeout. Runs on a gloo group (the group itself, or a
        gloo twin of an NCCL group)."""
        if self.world == 1:
            return [fingerprint]
        control = self._control_group()
        try:
            with traffic.blocked("agree"):
                dist.monitored_barrier(group=control, timeout=group_timeout(self.group), wait_all_ranks=True)
                gathered = [None] * self.world
                dist.all_gather_object(gathered, fingerprint, group=control)
        except RuntimeError as error:
            raise self.fail(f"the start of {what} (every rank must call it)", None, error) from error
        return gathered

    def _control_group(self):
        if dist.get_backend(self.group) == "gloo":
            return self.group
        key = id(self.group)
        if key not in _control_groups:
            ranks = dist.get_process_group_ranks(self.group)
            _control_groups[key] = dist.new_group(ranks, backend="gloo")
        return _control_groups[key]


def group_timeout(group):
    """The timeout ``group`` was created with (``monitored_barrier`` would otherwise wait for
    torch's 30-minute default), or None to let torch choose."""
    try:
        backend = group._get_backend(torch.device("cpu"))
        return backend.options._timeout
    except (AttributeError, RuntimeError):
        return None


def circulate(comm: Comm, shard: tuple[Tensor, ...], sizes: list[int]):
    """Pass every rank's ``shard`` (tensors whose first dimension is that rank's size in
    ``sizes``) once around the ring. Yields ``(owner, tensors)`` for owner = rank, rank − 1, …,
    sending the shard held to the next rank and receiving the following one while the caller
    computes. Each rank holds its own shard plus two in transit (the one it works on and the
    one arriving), in two buffers of the largest size allocated once."""
    world, rank = comm.world, comm.rank
    current = tuple(t.contiguous() for t in shard)
    largest = max(sizes)
    buffers = [None, None]
    for step in range(world):
        owner = (rank - step) % world
        works = []
        if step < world - 1:
            if buffers[step % 2] is None:
                buffers[step % 2] = tuple(t.new_empty((largest, *t.shape[1:])) for t in current)
            incoming = tuple(b[: sizes[(owner - 1) % world]] for b in buffers[step % 2])
            works = comm.shift(current, incoming, SHARD_TAG)
        yield owner, current
        if works:
            comm.wait(works)
            current = incoming


class Carry:
    """Accumulators that follow the shards of :func:`circulate` round the ring and come home.

    At step k this rank adds its contribution for shard ``owner`` (:meth:`add`); the partial sum
    arriving from the previous rank (which held that shard at step k − 1) is added to it and
    the total is sent on. After the last step each rank receives the full sum for its own
    shard (:meth:`result`). The transfer of one step overlaps the next step's compute."""

    def __init__(self, comm: Comm, sizes: list[int]):
        self.comm, self.sizes = comm, sizes
        self.pending, self.incoming, self.sent, self.step = [], None, None, 0

    def add(self, contribution: Tensor) -> None:
        comm = self.comm
        if comm.world == 1:
            self.incoming = contribution
            return
        comm.wait(self.pending)
        if self.incoming is not None:
            contribution = contribution + self.incoming
        # the next step's shard belongs to rank − step − 1 (after the last: this rank's own)
        arriving = (comm.rank - self.step - 1) % comm.world
        self.incoming = contribution.new_empty((self.sizes[arriving], *contribution.shape[1:]))
        self.sent = contribution  # kept alive until its send completes
        self.pending = comm.shift((contribution,), (self.incoming,), CARRY_TAG)
        self.step += 1

    def result(self) -> Tensor:
        self.comm.wait(self.pending)
        self.pending, self.sent = [], None
        return self.incoming
