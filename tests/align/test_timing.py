"""StepClock: the phases of a step, and a function's forward and backward timed through autograd."""

from __future__ import annotations

import time

import pytest
import torch

from sotalign.align.timing import StepClock


class _Slow(torch.autograd.Function):
    """x·y summed, 30 ms in the forward and 50 ms in the backward."""

    @staticmethod
    def forward(ctx, x, y):
        time.sleep(0.03)
        ctx.save_for_backward(x, y)
        return (x * y).sum()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        x, y = ctx.saved_tensors
        return grad * y, grad * x


def slow_product(x, y, scale):
    return scale * _Slow.apply(x, y)


def test_a_function_is_timed_forward_and_backward_and_its_gradient_is_unchanged():
    x, y = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    (slow_product(x, y, 3.0) ** 2).backward()
    expected = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None

    clock = StepClock(torch.device("cpu"))
    clock.enabled = True
    start = clock.now()
    with clock.phase("forward"):
        value = clock.timed("slow", slow_product, x, y, 3.0)
    with clock.phase("backward"):
        (value**2).backward()
    clock.add("step", start)
    clock.settle()
    assert torch.equal(x.grad, expected[0]) and torch.equal(y.grad, expected[1])
    seconds = clock.seconds
    assert seconds["slow_forward"] >= 0.03 and seconds["slow_backward"] >= 0.05
    assert seconds["forward"] >= seconds["slow_forward"] and seconds["backward"] >= seconds["slow_backward"]
    shares = clock.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["klot_forward"] == 0 and clock.steps == 1


def test_a_disabled_clock_records_nothing():
    clock = StepClock(torch.device("cpu"))
    x = torch.randn(3, requires_grad=True)
    with clock.phase("forward"):
        clock.timed("slow", slow_product, x, x, 1.0).backward()
    clock.add("step", clock.now())
    clock.settle()
    assert not clock.seconds and clock.shares() == {}
