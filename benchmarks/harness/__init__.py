"""The benchmark harnesses behind benchmarks/conftest.py: :mod:`.cpu`, :mod:`.gpu` and what
they share (:mod:`.common`)."""
