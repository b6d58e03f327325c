r"""Compile every Triton kernel of sotalign for sm_90 (H100/H200) without a GPU, and report the
registers and stack (spill) bytes of each kernel, variant and config.

    .venv/bin/python -m benchmarks.kernel_resources                 # every config, both tritons
    .venv/bin/python -m benchmarks.kernel_resources --configs first # the first config of each

Each triton version compiles in its own process, with TRITON_INTERPRET unset and that
triton first on PYTHONPATH: the venv's (pinned in the test extra) and, when installed,
triton 3.6 under ``~/.cache/sotalign/triton-3.6.0`` (what torch 2.11 ships; ``make``
installs it there with ``pip install --target``). Triton compiles to PTX and runs its bundled
ptxas to a cubin; ``cuobjdump --dump-resource-usage`` (bundled too) reads REG and STACK off
the cubin. Spilled registers live in the stack frame, so STACK = 0 means no spills.

Writes ``benchmarks/results/sm90-kernel-resources.{md,json}`` (or ``--out PREFIX``).
``tests/kernels/test_kernel_compile.py`` runs the ``--child`` mode on the first configs
under both versions (CI), so every kernel variant, fp64 included, must compile under both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where ``make`` installs the second triton (torch 2.11's) with ``pip install --target``.
TRITON_36 = Path.home() / ".cache" / "sotalign" / "triton-3.6.0"

#: (label, operand dtype, potentials dtype, DOT_PRECISION, PRODUCT_PRECISION): the
#: precision flags as the kernels see them (fp16 and fp16x3 differ only in the half-step).
FAMILIES = [
    ("fp32", "fp32", "fp32", "ieee", "ieee"),
    ("tf32x3", "fp32", "fp32", "tf32x3", "tf32x3"),
    ("tf32", "fp32", "fp32", "tf32", "tf32"),
    ("fp16/fp16x3", "fp16", "fp32", "tf32", "tf32x3"),
    ("fp64", "fp64", "fp64", "ieee", "ieee"),
]


def half_steps(label: str, dot: str):
    """(variant label, D_CEIL, RESIDENT, FP16X3) of the online half-step of a family, as
    ``Operand.resident`` decides: resident rows where they fit, streamed beyond."""
    if label == "fp16/fp16x3":
        return [
            ("fp16 d=256 resident", 256, 256, False),
            ("fp16x3 d=128 resident", 384, 128, True),
            ("fp16x3 d=256", 768, 0, False),
        ]
    resident = 128 if dot != "ieee" else 0
    return [
        (f"{label} d=128{' resident' if resident else ''}", 128, resident, False),
        (f"{label} d=512", 512, 0, False),
    ]


#: The plan-sum kernels' flags on features and on stored matrices.
PLAN_SUMS = {
    "features": [
        ("plan_sum_kernel", dict(DENSE=False, D_CEIL=128, DENSE_B=False, D_CEIL_B=256)),
        ("plan_difference_kernel", dict(DENSE=False, D_CEIL=256, DENSE_T=False, D_CEIL_T=128)),
    ],
    "stored": [
        ("plan_sum_kernel", dict(DENSE=True, D_CEIL=64, DENSE_B=True, D_CEIL_B=64)),
        ("plan_difference_kernel", dict(DENSE=True, D_CEIL=64, DENSE_T=True, D_CEIL_T=64)),
    ],
}


def variants():
    """(kernel name, variant label, operand dtype, potentials dtype, constexprs, configs kind)."""
    for label, op, acc, dot, product in FAMILIES:
        for variant, d_ceil, resident, fp16x3 in half_steps(label, dot):
            flags = dict(D_CEIL=d_ceil, DOT_PRECISION=dot, RESIDENT=resident, FP16X3=fp16x3, X_LO_PART=0)
            yield ("lse_kernel", variant, op, acc, dict(flags, EPILOGUE=True), "online")
        for name, flags in PLAN_SUMS["features"]:
            yield (name, f"{label} features", op, acc, dict(flags, DOT_PRECISION=dot), "online")
        yield (
            "plan_product_kernel",
            f"{label} KLOT backward, 256 wide",
            op,
            acc,
            dict(
                DENSE=False,
                D_CEIL=256,
                DENSE_T=False,
                D_CEIL_T=128,
                HAS_TEACHER=True,
                DOT_PRECISION=dot,
                PRODUCT_PRECISION=product,
                BLOCK_K=256,
            ),
            "product",
        )
    for acc in ("fp32", "fp64"):
        yield ("lse_dense_kernel", acc, acc, acc, dict(EPILOGUE=True), "dense")
        for name, flags in PLAN_SUMS["stored"]:
            yield (name, f"{acc} stored", acc, acc, dict(flags, DOT_PRECISION="ieee"), "online")
        yield (
            "plan_product_kernel",
            f"{acc} stored, plan product",
            acc,
            acc,
            dict(
                DENSE=True,
                D_CEIL=64,
                DENSE_T=True,
                D_CEIL_T=64,
                HAS_TEACHER=False,
                DOT_PRECISION="ieee",
                PRODUCT_PRECISION="ieee",
                BLOCK_K=64,
            ),
            "product",
        )
        yield ("update_kernel", acc, acc, acc, dict(BLOCK=1024), None)


#: The tuple arguments that carry a plan, and the flag that says whether its affinity is stored.
PLAN_ARGUMENTS = {"S": "DENSE", "A": "DENSE", "T": "DENSE_T", "B": "DENSE_B"}
#: Per-element products of 32-bit integers in the Triton IR: an offset computed as
#: rows × stride in i32, which wraps silently past 2^31 elements.
I32_TENSOR_PRODUCT = re.compile(r"arith\.muli .*: tensor<[0-9x]*xi32>")


def signature(fn, name: str, op: str, acc: str, constexprs: dict) -> dict:
    """The argument types of a kernel variant: the affinity and plan tuples field by field
    (features in the operand dtype, a stored K and the vectors in the potentials' dtype)."""
    from sotalign.kernels.triton.plan import Plan
    from sotalign.kernels.triton.tiles import Features, Stored

    def affinity(dense: bool):
        if dense:
            return Stored(f"*{acc}", "i32", "i32", "i32")
        return Features(f"*{op}", f"*{op}", "i32", "i32", "i32", "i32", "i32", "fp32")

    types = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            types[arg] = "constexpr"
        elif arg == "K":
            types[arg] = affinity(name == "lse_dense_kernel")
        elif arg in PLAN_ARGUMENTS:
            types[arg] = Plan(affinity(constexprs[PLAN_ARGUMENTS[arg]]), f"*{acc}", f"*{acc}")
        elif arg.endswith("_ptr"):
            types[arg] = f"*{acc}"
        else:
            types[arg] = "i32"
    return types


def child(first_only: bool) -> None:
    """Compile the variants with the triton on sys.path; print one JSON line per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from sotalign.kernels.triton import lse, plan, tiles

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    configs = {
        "online": tiles.online_configs(),
        "dense": tiles.dense_configs(),
        "product": tiles.product_configs(),
        None: [triton.Config({}, num_warps=4, num_stages=1)],
    }
    kernels = {name: getattr(lse, name, None) or getattr(plan, name) for name, *_ in variants()}
    for name, label, op, acc, flags, kind in variants():
        fn = kernels[name]
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        for index, config in enumerate(configs[kind][:1] if first_only else configs[kind]):
            constexprs = {
                key: value for key, value in dict(config.kwargs, **flags).items() if key in fn.arg_names
            }
            types = signature(fn, name, op, acc, constexprs)
            row = dict(
                triton=triton.__version__,
                kernel=name,
                variant=label,
                config=index,
                tile=" ".join(f"{k}={v}" for k, v in config.kwargs.items()),
                warps=config.num_warps,
                stages=config.num_stages,
            )
            try:
                compiled = triton.compile(
                    ASTSource(fn, types, constexprs),
                    target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
                )
                with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                    cubin.write(compiled.asm["cubin"])
                    cubin.flush()
                    usage = subprocess.run(
                        [str(cuobjdump), "--dump-resource-usage", cubin.name],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                row["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
                row["stack"] = int(re.search(r"STACK:(\d+)", usage).group(1))
                row["i32_products"] = len(I32_TENSOR_PRODUCT.findall(compiled.asm["ttir"]))
            except Exception as error:  # reported, and the test fails on it
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            print(json.dumps(row), flush=True)


def run_child(triton_path: Path | None, first_only: bool, timeout: float = 1800) -> list[dict]:
    """The child mode in a fresh process (TRITON_INTERPRET unset, ``triton_path`` first)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    paths = ([str(triton_path)] if triton_path else []) + [str(ROOT), env.get("PYTHONPATH", "")]
    with tempfile.TemporaryDirectory() as cache:
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in paths if p),
            TRITON_CACHE_DIR=cache,
            TRITON_DEFAULT_FP_FUSION="1",
        )
        result = subprocess.run(
            [sys.executable, __file__, "--child"] + (["--configs", "first"] if first_only else []),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not rows:
        raise RuntimeError(
            f"compiling under {triton_path or 'the venv triton'} failed:\n{result.stderr[-3000:]}"
        )
    return rows


def tritons() -> list[Path | None]:
    """The venv's triton (None), and triton 3.6 when installed."""
    return [None] + ([TRITON_36] if (TRITON_36 / "triton").is_dir() else [])


def markdown(rows: list[dict]) -> str:
    versions = sorted({row["triton"] for row in rows})
    by_key: dict[tuple, dict] = {}
    for row in rows:
        key = (row["kernel"], row["variant"], row["config"], row["tile"], row["warps"], row["stages"])
        by_key.setdefault(key, {})[row["triton"]] = row
    header = (
        "| kernel | variant | config | " + " | ".join(f"triton {v}: regs / stack B" for v in versions) + " |"
    )
    configs = (
        "every autotune config" if any(row["config"] > 0 for row in rows) else "the first autotune config"
    )
    wrapping = sum(1 for row in rows if row.get("i32_products"))
    lines = [
        "# sotalign's Triton kernels compiled for sm_90 (no GPU: bundled ptxas, cuobjdump)",
        "",
        "Registers per thread and stack-frame bytes (spills live in the stack frame: 0 = no "
        f"spills) of every kernel variant at {configs}, compiled for sm_90a by each "
        "triton version; written by benchmarks/kernel_resources.py. `error` = did not compile. "
        f"Compiles with 32-bit per-element offset products (rows × stride) in the IR: {wrapping}.",
        "",
        header,
        "|---|---|---|" + "---:|" * len(versions),
    ]
    for (kernel, variant, _, tile, warps, stages), per_version in by_key.items():
        cells = []
        for version in versions:
            row = per_version.get(version)
            cells.append(
                "—"
                if row is None
                else f"error: {row['error']}"
                if "error" in row
                else f"{row['registers']} / {row['stack']}"
            )
        lines.append(
            f"| {kernel} | {variant} | {tile}, {warps} warps, {stages} stages | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", choices=("all", "first"), default="all")
    parser.add_argument("--child", action="store_true", help="compile with the triton on sys.path")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sm90-kernel-resources"))
    args = parser.parse_args()
    if args.child:
        child(args.configs == "first")
        return
    rows = [row for path in tritons() for row in run_child(path, args.configs == "first")]
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(rows))
    print(markdown(rows))
    failed = [row for row in rows if "error" in row]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
