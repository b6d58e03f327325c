"""Passive OpenMP waiting, asked for before torch loads (``sotalign/__init__.py`` imports this first).

The C++ backend shares torch's OpenMP runtime, which reads its wait policy once, when torch
loads. Its idle threads spin by default and then fight other processes for the cores
(measured in ``benchmarks/bench_contention.py``), so sotalign asks for passive waiting unless
the user chose a policy. When torch was imported before sotalign, the runtime has already
read the policy and this changes nothing: export ``OMP_WAIT_POLICY=PASSIVE`` then.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
