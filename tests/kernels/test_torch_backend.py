"""What is specific to the chunked ``torch`` backend: batches visited in blocks of rows across
the whole batch, and −inf biases and potentials (zero weights), against the float64 reference
(the shared checks of ``batch_cases``). Every block border is crossed: blocks are at most 7
rows here."""

from __future__ import annotations

import pytest
import torch
from batch_cases import check_klot_value_zero_weights, check_neg_inf_biases, check_padded_batch

from sotalign.kernels import base, load_backend

TORCH = load_backend("torch")
PATHS = pytest.mark.parametrize("path", ["online", "dense"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of at most 7 rows for a batch of three problems of 270 columns in float64."""
    monkeypatch.setattr(base, "BLOCK_BYTES", 7 * 3 * 270 * 8)


@DTYPES
@PATHS
def test_padded_batch_equals_each_problem_alone(path, dtype):
    check_padded_batch(TORCH, path, dtype)


@DTYPES
@PATHS
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
def test_neg_inf_biases(path, dtype, batched):
    check_neg_inf_biases(TORCH, path, dtype, batched)


@DTYPES
@PATHS
def test_klot_value_zero_weights(path, dtype):
    check_klot_value_zero_weights(TORCH, path, dtype)
