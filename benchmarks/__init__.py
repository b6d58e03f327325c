"""sotalign's benchmarks, run from the repository root.

* CPU: pytest-benchmark suites ``bench_*.py`` (:mod:`benchmarks.conftest`, timing glue in
  :mod:`benchmarks.cpu`), reported by ``python -m benchmarks.report`` (``make bench``).
* GPU: ``python -m benchmarks.gpu`` (``make gpu-check``, ``make bench-gpu`` for the sweep).
* Shared: the seeded problems (:mod:`benchmarks.problems`), the peer libraries
  (:mod:`benchmarks.peers`), the machine names of result files (:mod:`benchmarks.machine`),
  the report writer (:mod:`benchmarks.report`) and the roofline model (:mod:`benchmarks.roofline`).
"""
