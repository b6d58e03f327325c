"""Where a training step's time goes, measured without stalling the device.

:class:`StepClock` times the phases of each step. On CPU a mark is ``time.perf_counter()``; on
CUDA it is an event recorded in the stream, read once it has completed (:meth:`StepClock.settle`,
called where the trainer reads the step's loss anyway), so timing adds no host synchronisation:
a phase's time is the device's time between its marks, which for a host-side phase (reading
the batch) is how long the device sat waiting for it.

The phases of a step: ``load`` (waiting for the batch and moving it to the device), ``teacher``
(the teacher's features of the unpaired batch, the input of its affinities), ``forward`` (the
loss terms, of which ``klot_forward`` is KLOT's own), ``backward`` (of which ``klot_backward``
is KLOT's, from the gradient reaching its value to leaving its inputs), ``update`` (the
optimizer and scheduler) and the ``step`` as a whole (including validation, the log and
checkpoints).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

#: The parts of a step reported as shares (their sum with "rest" is the whole step).
SHARES = ("load", "teacher", "klot_forward", "klot_backward", "forward_backward_other", "update", "rest")


class _BackwardMark(torch.autograd.Function):
    """Identity; its backward calls ``mark()`` (when the gradient passes through)."""

    @staticmethod
    def forward(ctx, mark, *tensors):
        ctx.mark = mark
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.mark()
        return (None, *grads)


class StepClock:
    """Seconds spent in each phase of the timed steps (disabled until :attr:`enabled` is set)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0  # timed steps folded into `seconds`
        self._spans: list = []  # (phase, start mark, end mark) not yet folded
        self._backward_starts: dict[str, object] = {}

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, phase: str, start) -> None:
        """Close the span of ``phase`` begun at mark ``start``."""
        if self.enabled:
            self._spans.append((phase, start, self.now()))

    @contextmanager
    def phase(self, name: str):
        start = self.now() if self.enabled else None
        yield
        self.add(name, start)

    def timed(self, name: str, fn, img: torch.Tensor, txt: torch.Tensor, *rest, **options):
        """``fn(img, txt, *rest, **options)``, its forward timed as ``<name>_forward`` and its
        backward as ``<name>_backward`` (when the gradient reaches the value and leaves ``img``
        and ``txt``)."""
        if not self.enabled:
            return fn(img, txt, *rest, **options)
        phase = f"{name}_backward"
        start = self.now()
        img, txt = _BackwardMark.apply(lambda: self.add(phase, self._backward_starts.pop(phase)), img, txt)
        value = fn(img, txt, *rest, **options)
        self.add(f"{name}_forward", start)

        def backward_starts():
            self._backward_starts[phase] = self.now()

        (value,) = _BackwardMark.apply(backward_starts, value)
        return value

    def settle(self, wait: bool = False) -> None:
        """Fold the spans whose marks have completed into :attr:`seconds` (``wait``: all)."""
        pending = []
        for phase, start, end in self._spans:
            if self.cuda:
                if not (wait or end.query()):
                    pending.append((phase, start, end))
                    continue
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                seconds = end - start
            self.seconds[phase] += seconds
            self.steps += phase == "step"
        self._spans = pending

    def shares(self) -> dict[str, float]:
        """Each part's share of the timed steps' time (see :data:`SHARES`); empty before any."""
        total = self.seconds.get("step", 0.0)
        if not total:
            return {}
        s = self.seconds
        parts = {
            "load": s["load"],
            "teacher": s["teacher"],
            "klot_forward": s["klot_forward"],
            "klot_backward": s["klot_backward"],
            "forward_backward_other": s["forward"] + s["backward"] - s["klot_forward"] - s["klot_backward"],
            "update": s["update"],
        }
        parts["rest"] = total - sum(parts.values())
        return {name: value / total for name, value in parts.items()}
