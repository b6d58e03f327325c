"""Online must stay online, in the backward pass too: a KLOT step at n = m = 24000, d = 64
adds well under one dense fp32 n×m matrix (2.2 GB) of peak resident memory.

Each case runs in a fresh process so the measured peak belongs to the step alone. The
iteration count is cut (memory does not depend on it) to keep the test fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import sotalign

SCRIPT = textwrap.dedent("""
    import json, sys, torch, sotalign
    from sotalign.memory import peak_memory
    import importlib
    klot_module = importlib.import_module("sotalign.ot.klot")
    backend, n_iters = sys.argv[1], int(sys.argv[2])
    n, d = 24000, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    y = torch.randn(n, d, generator=g, requires_grad=True)
    x_t, y_t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    routes = []
    original = klot_module.choose_route
    def spy(*args, **kwargs):
        route = original(*args, **kwargs)
        routes.append(route.path)
        return route
    klot_module.choose_route = spy
    with peak_memory() as peak:
        loss = sotalign.klot(x, y, x_t, y_t, n_iters=n_iters, backend=backend)
        loss.backward()
    print(json.dumps({"peak_mib": peak.mib, "path": routes[0], "finite": bool(torch.isfinite(loss))
                      and bool(torch.isfinite(x.grad).all())}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend,n_iters", [("auto", 2), ("torch", 1)])
def test_klot_step_at_24000_stays_online(backend, n_iters):
    if backend == "auto" and "cpu" not in sotalign.available_backends():
        pytest.skip("the C++ extension is not built")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, str(n_iters)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["path"] == "online"
    assert report["finite"]
    assert report["peak_mib"] < 600, report
