"""What is specific to the chunked ``torch`` backend: batches visited in blocks of rows across
the whole batch, and −inf biases and potentials (zero weights), against the float64 reference
(the shared checks of ``batch_cases``). Every block border is crossed: blocks are at most 7
rows here."""

from __future__ import annotations

import pytest
from batch_cases import BatchChecks

from sotalign.kernels import base, load_backend


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of at most 7 rows for a batch of three problems of 270 columns in float64."""
    monkeypatch.setattr(base, "BLOCK_BYTES", 7 * 3 * 270 * 8)


class TestBatches(BatchChecks):
    backend = load_backend("torch")
