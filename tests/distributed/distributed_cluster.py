"""A few CPU processes joined in one gloo group, kept alive for a whole test module.

Spawning processes and importing torch costs seconds, so a module starts one
:class:`Cluster` and sends it tasks: a module-level function ``fn(rank, world, *args)`` run on
every rank at once, whose return values (or tracebacks) come back in rank order.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, timeout: float, tasks, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                results.put((rank, True, fn(rank, world, *args)))
            except BaseException as error:  # reported to the test, which decides
                results.put((rank, False, (type(error).__name__, str(error), traceback.format_exc())))
    finally:
        dist.destroy_process_group()


class Cluster:
    """``world`` spawned ranks in a gloo group whose collectives time out after ``timeout`` s."""

    def __init__(self, world: int, timeout: float = 30.0):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_serve, args=(rank, world, port, timeout, self.tasks[rank], self.results), daemon=True
            )
            for rank in range(world)
        ]
        for p in self.procs:
            p.start()

    def outcomes(self, fn, *args, wait: float = 180.0, ranks=None) -> list[tuple[bool, object]]:
        """(ok, value or (error type, message, traceback)) of ``fn`` on each rank; only
        ``ranks`` (default all) are waited for, the others' answers are None."""
        for q in self.tasks:
            q.put((fn, args))
        got = {}
        expected = set(range(self.world) if ranks is None else ranks)
        while not expected <= set(got):
            try:
                rank, ok, value = self.results.get(timeout=wait)
            except queue.Empty:
                raise AssertionError(
                    f"ranks {sorted(set(range(self.world)) - set(got))} did not answer within {wait} s"
                ) from None
            got[rank] = (ok, value)
        return [got.get(rank) for rank in range(self.world)]

    def run(self, fn, *args, wait: float = 180.0) -> list:
        """The value of ``fn`` on each rank; fails the test with every rank's traceback."""
        outcomes = self.outcomes(fn, *args, wait=wait)
        failed = [f"rank {r}:\n{value[2]}" for r, (ok, value) in enumerate(outcomes) if not ok]
        if failed:
            raise AssertionError("\n".join(failed))
        return [value for _, value in outcomes]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
