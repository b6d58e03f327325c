"""Every Triton kernel variant compiles for sm_90 (H100/H200) under both triton versions the
package supports, fp64 included, with no GPU: triton's own compiler and bundled ptxas, in a
subprocess with TRITON_INTERPRET unset (benchmarks/kernel_resources.py, first autotune
config of each kernel; the full table over every config is
benchmarks/results/sm90-kernel-resources.md).

* the venv's triton (3.9, pinned in the test extra, what torch 2.13 ships);
* triton 3.6 (what torch 2.11 ships, the GPU machines' version), which ``make`` installs
  under ``~/.cache/sotalign/triton-3.6.0`` with ``pip install --target``.

The interpreter skips the real compiler's checks (tl.dot dtypes and precisions, fp64 math,
layouts, shared memory), which is why this runs beside the interpreter tests. The compiled IR
also shows what no small test can: every per-element offset product (rows × stride) is
64-bit, so offsets do not wrap past 2^31 elements (n·d ≥ 2^31, e.g. n = 700k at fp16x3,
d = 1024, a size the interpreter cannot allocate).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_resources  # noqa: E402


def _ptxas_or_skip() -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(90)
    except RuntimeError:
        pytest.skip("this triton has no ptxas")


@pytest.mark.slow
@pytest.mark.parametrize("version", ["venv", "3.6"])
def test_kernels_compile_for_hopper(version, capsys):
    _ptxas_or_skip()
    path = None
    if version == "3.6":
        path = kernel_resources.TRITON_36
        if not (path / "triton").is_dir():
            pytest.skip(f"triton 3.6 is not installed under {path} (`make install` puts it there)")
    rows = kernel_resources.run_child(path, first_only=True, timeout=900)
    names = {row["kernel"] for row in rows}
    assert names == {
        "lse_kernel",
        "lse_dense_kernel",
        "update_kernel",
        "plan_sum_kernel",
        "plan_difference_kernel",
        "plan_product_kernel",
    }
    assert any("fp64" in row["variant"] for row in rows)
    if version == "3.6":
        assert {row["triton"] for row in rows} == {"3.6.0"}
    with capsys.disabled():
        print("\n" + kernel_resources.markdown(rows))
    failed = [f"{row['kernel']} [{row['variant']}]: {row['error']}" for row in rows if "error" in row]
    assert not failed, "\n".join(failed)
    assert any(row["variant"] == "fp16x3 d=128 resident" for row in rows)
    wrapping = [f"{row['kernel']} [{row['variant']}]" for row in rows if row["i32_products"]]
    assert not wrapping, f"32-bit per-element products (offsets that wrap past 2^31): {wrapping}"
