r"""The roofline bound of one log-domain Sinkhorn iteration and of one KLOT step (docs/design.md §4).

The model. One Sinkhorn iteration is two half-steps (a row and a column
log-sum-exp), each touching every one of the n·m entries of K:

* **online** (K recomputed from the d-dimensional features in every half-step): the
  recomputation costs 2·n·m·d flops per half-step on the matrix units, so an iteration needs
  ``4·n·m·d`` flops at the peak of the dot precision used. Each entry also needs one
  exponential per half-step, so the bound is ``max(4nmd / F, 2nm / E)``; for d ≥ 128 on
  fp16 tensor cores (and every d on the slower units) the flops dominate.
* **dense** (K stored once in fp32, read once per half-step): ``2·n·m·4`` bytes per iteration
  at the sustained HBM bandwidth, or ``2nm / E`` if the exponentials were slower.

``F`` depends on the ``precision`` of the dot products that recompute K:

=========  =============================================================================
fp32       FP32 CUDA-core FMA peak (what an IEEE-fp32 ``tl.dot`` or KeOps runs on)
tf32x3     a third of the TF32 peak (three tf32 products per fp32 product: hi/lo split)
fp16x3     a third of the FP16 peak (the same split, in fp16 on the host)
tf32       dense TF32 tensor-core peak (no sparsity)
fp16       dense FP16/BF16 tensor-core peak with fp32 accumulation (no sparsity)
=========  =============================================================================

docs/design.md's two H100 figures at n = m = 16384, d = 512 are this model with fp16 tensor cores
(online: 5.50e11 flop / 989.4 TFLOP/s = 0.556 ms) and a stored fp32 K read at 3.0 TB/s
(dense: 2.15 GB / 3.0 TB/s = 0.716 ms); ``python -m benchmarks.roofline`` prints them and
``test_roofline_reproduces_design`` in tests/test_benchmarks.py checks them. The best bound of a shape,
:func:`best_iteration_bound`, is the smaller of the two (what a perfect library choosing its
path would reach); it is the bound the GPU targets (targets.json) are stated against.

Spec numbers (NVIDIA H100 Tensor Core GPU datasheet, and the H200 product brief; the
datasheets quote tensor-core throughput *with* 2:4 sparsity, which is halved here):

=================  ==========  ============  ============  ===========  ====  ==========
GPU                FP32 FMA    TF32 tensor   FP16 tensor   HBM (spec)   SMs   boost clk
=================  ==========  ============  ============  ===========  ====  ==========
H100 SXM5 80 GB    67 TF/s     494.7 TF/s    989.4 TF/s    3.35 TB/s    132   1.83 GHz*
H100 PCIe 80 GB    51 TF/s     378 TF/s      756 TF/s      2.0 TB/s     114   1.755 GHz
H100 NVL 94 GB     60 TF/s     417.5 TF/s    835 TF/s      3.9 TB/s     132   1.785 GHz
H200 SXM 141 GB    67 TF/s     494.7 TF/s    989.4 TF/s    4.8 TB/s     132   1.83 GHz*
=================  ==========  ============  ============  ===========  ====  ==========

\* the clock used for the exponential throughput (SXM boost is up to 1.98 GHz).
The exponential throughput is the MUFU rate, 16 ex2/clk/SM × SMs × clock (3.9e12/s on an
H100 SXM). The sustained bandwidth is the spec × 3.0/3.35: docs/design.md's 3.0 TB/s for an H100
SXM, the rate a streaming read reaches in practice; the same fraction is used on the others.
"""

from __future__ import annotations

from dataclasses import dataclass

#: docs/design.md's sustained HBM bandwidth on an H100 SXM over its spec bandwidth.
SUSTAINED_FRACTION = 3.0 / 3.35
PRECISIONS = ("fp32", "tf32x3", "fp16x3", "tf32", "fp16")
PATHS = ("online", "dense")


@dataclass(frozen=True)
class GPU:
    """Peak rates of one GPU model (flop/s, byte/s, exp/s); see the module table."""

    name: str
    fp32_flops: float
    tf32_flops: float
    fp16_flops: float
    hbm_spec_bytes: float
    sms: int
    clock_hz: float
    memory_gib: float

    @property
    def hbm_bytes(self) -> float:
        """Sustained HBM bandwidth of the model (byte/s)."""
        return self.hbm_spec_bytes * SUSTAINED_FRACTION

    @property
    def exp_rate(self) -> float:
        """MUFU exponentials per second: 16 per clock per SM."""
        return 16 * self.sms * self.clock_hz

    def flops(self, precision: str) -> float:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        # tf32x3 / fp16x3: three tensor-core products per fp32 product (hi·hi + hi·lo + lo·hi)
        return {
            "fp32": self.fp32_flops,
            "tf32x3": self.tf32_flops / 3,
            "fp16x3": self.fp16_flops / 3,
            "tf32": self.tf32_flops,
            "fp16": self.fp16_flops,
        }[precision]


GPUS = {
    "h100-sxm": GPU("H100 SXM5 80 GB", 67e12, 494.7e12, 989.4e12, 3.35e12, 132, 1.83e9, 80),
    "h100-pcie": GPU("H100 PCIe 80 GB", 51e12, 378e12, 756e12, 2.0e12, 114, 1.755e9, 80),
    "h100-nvl": GPU("H100 NVL 94 GB", 60e12, 417.5e12, 835e12, 3.9e12, 132, 1.785e9, 94),
    "h200": GPU("H200 SXM 141 GB", 67e12, 494.7e12, 989.4e12, 4.8e12, 132, 1.83e9, 141),
}


def gpu_key(device_name: str) -> str | None:
    """The :data:`GPUS` key of a ``torch.cuda.get_device_name()`` string, or None if unknown.

    ``NVIDIA H100 80GB HBM3`` is the SXM part; PCIe and NVL name themselves.
    """
    name = device_name.lower()
    if "h200" in name:
        return "h200"
    if "h100" in name:
        if "pcie" in name:
            return "h100-pcie"
        if "nvl" in name:
            return "h100-nvl"
        return "h100-sxm"
    return None


def _gpu(gpu: str | GPU) -> GPU:
    return gpu if isinstance(gpu, GPU) else GPUS[gpu]


def sinkhorn_iteration_bound(
    n: int, m: int, d: int, path: str, gpu: str | GPU = "h100-sxm", precision: str = "fp32"
) -> float:
    """Lower bound in seconds of one Sinkhorn iteration (two half-steps) on ``path``.

    online: max(4·n·m·d / F(precision), 2·n·m / E); dense: max(2·n·m·4 B / B_HBM, 2·n·m / E)
    (the stored K is fp32 whatever the dot precision that built it).
    """
    spec = _gpu(gpu)
    exps = 2 * n * m / spec.exp_rate
    if path == "online":
        return max(4 * n * m * d / spec.flops(precision), exps)
    if path == "dense":
        return max(2 * n * m * 4 / spec.hbm_bytes, exps)
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def best_iteration_bound(n: int, m: int, d: int, gpu: str | GPU = "h100-sxm") -> float:
    """The smaller of the fp16-online and the fp32-dense bound (docs/design.md's roofline)."""
    return min(
        sinkhorn_iteration_bound(n, m, d, "online", gpu, "fp16"),
        sinkhorn_iteration_bound(n, m, d, "dense", gpu),
    )


def _pass_bound(
    n: int, m: int, dims: tuple[int, ...], path: str, spec: GPU, precision: str, products: int = 0
) -> float:
    """One streaming pass over the affinities of ``dims`` (K recomputed or read once each),
    plus ``products`` n×m×d plan-times-features products of the student dimension dims[0]."""
    flops = 2 * n * m * dims[0] * products
    if path == "online":
        flops += sum(2 * n * m * d for d in dims)
        return max(flops / spec.flops(precision), len(dims) * n * m / spec.exp_rate)
    read = len(dims) * n * m * 4 / spec.hbm_bytes
    return max(read, flops / spec.flops(precision), len(dims) * n * m / spec.exp_rate)


def klot_step_bound(
    n: int,
    m: int,
    d: int,
    d_teacher: int,
    path: str,
    gpu: str | GPU = "h100-sxm",
    precision: str = "fp32",
    n_iters: int = 100,
) -> float:
    """Lower bound in seconds of one KLOT step (forward + backward) from features.

    * dense only: build K and K* once (2nm(d + d*) flops, 8nm bytes written);
    * ``n_iters`` student iterations at d and ``n_iters`` teacher iterations at d*;
    * the value: one pass over K and K* (recompute or read both);
    * the backward: G = (P − P*)/ε formed tile by tile from K and K* (a second pass over
      both) and the two products G·ŷ and Gᵀ·x̂ (2 × 2nmd flops).

    The symmetric half-steps are left out (they add < 1 %).
    """
    spec = _gpu(gpu)
    total = n_iters * (
        sinkhorn_iteration_bound(n, m, d, path, spec, precision)
        + sinkhorn_iteration_bound(n, m, d_teacher, path, spec, precision)
    )
    if path == "dense":
        build = 2 * n * m * (d + d_teacher) / spec.flops(precision)
        total += max(build, 2 * n * m * 4 / spec.hbm_bytes)
    total += _pass_bound(n, m, (d, d_teacher), path, spec, precision)
    total += _pass_bound(n, m, (d, d_teacher), path, spec, precision, products=2)
    return total


if __name__ == "__main__":
    n, d = 16384, 512
    for key, spec in GPUS.items():
        online = ", ".join(
            f"online {p} {sinkhorn_iteration_bound(n, n, d, 'online', key, p) * 1e3:.3f} ms"
            for p in PRECISIONS
        )
        dense = sinkhorn_iteration_bound(n, n, d, "dense", key) * 1e3
        print(f"{spec.name}: n = m = {n}, d = {d} per iteration: dense fp32 K {dense:.3f} ms, {online}")
