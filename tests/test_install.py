"""Packaging: ``pip install sotalign`` needs torch and numpy only (the kernels import nothing
of the trainer's extras; the trainer's names are lazy and say which extra is missing); a
wheel built without a C++ compiler installs and imports in a fresh venv, where
backend="auto" falls back to torch with one warning. And where a compiler exists, the
extension must really be there (a silently skipped cpu backend would hide a broken build)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest

import sotalign

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_extension_is_built_here():
    if os.environ.get("SOTALIGN_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("SOTALIGN_ALLOW_NO_EXTENSION=1")
    assert "cpu" in sotalign.available_backends(), "sotalign._C did not build or import"


#: The modules of the ``train`` extra, which the kernels must never import.
TRAIN_MODULES = ("rich", "typer", "lion_pytorch", "safetensors", "ot")


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kwargs)


def test_the_kernels_import_none_of_the_trainers_dependencies():
    probe = (
        "import sys, torch, sotalign\n"
        "x = torch.randn(12, 4)\n"
        "loss = sotalign.klot(x.requires_grad_(), x, x, x, n_iters=5)\n"
        "loss.backward()\n"
        "sotalign.sinkhorn(x.detach(), x.detach(), n_iters=5).apply(torch.ones(12, 1))\n"
        "sotalign.KLOTLoss(n_iters=5)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAIN_MODULES!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('sotalign.') and m.split('.')[1] in "
        "('align', 'data', 'eval', 'cli')))\n"
    )
    run = run_python(probe)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["[]", "[]"]


def test_trainer_names_are_lazy_and_name_the_extra_when_it_is_missing():
    names = ("fit", "compare", "load", "AlignedModel", "TrainConfig")
    probe = (
        "import sys\nimport sotalign\n"
        "print(sotalign.fit.__module__, sotalign.load.__module__)\n"
        "sys.modules.update(lion_pytorch=None, typer=None)  # as if not installed\n"
        "for name in ('sotalign.align', 'sotalign.align.trainer', 'sotalign.align.model', 'sotalign.cli'):\n"
        "    sys.modules.pop(name, None)\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        getattr(sotalign, name)\n"
        "    except ImportError as error:\n"
        "        print(name, error)\n"
        "try:\n"
        "    import sotalign.cli\n"
        "except ImportError as error:\n"
        "    print('cli', error)\n"
        "try:\n"
        "    sotalign.nope\n"
        "except AttributeError as error:\n"
        "    print('nope', error)\n"
    )
    run = run_python(probe)
    assert run.returncode == 0, run.stderr
    first, *missing, cli, nope = run.stdout.splitlines()
    assert first.split() == ["sotalign.align.trainer", "sotalign.align.model"]
    assert [line.split()[0] for line in missing] == list(names)
    for line in missing:
        assert "sotalign.align (the trainer) needs typer, lion_pytorch from the 'train' extra" in line
        assert "pip install 'sotalign[train]'" in line
    assert "the sotalign command needs typer, lion_pytorch from the 'train' extra" in cli
    assert "module 'sotalign' has no attribute 'nope'" in nope


def core_site(directory: pathlib.Path) -> pathlib.Path:
    """A folder with only torch, numpy and torch's own requirements (symlinks into this
    environment): what ``pip install sotalign`` brings, without the extras."""
    directory.mkdir()
    names, pending = set(), ["torch", "numpy"]
    while pending:  # torch, numpy and everything they require, transitively
        name = pending.pop()
        if name.lower() in names:
            continue
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # a requirement whose marker excludes this platform
            continue
        names.add(name.lower())
        for requirement in requirements:
            if "extra ==" not in requirement:
                pending.append(re.split(r"[ ;<>=!~\[(]", requirement)[0])
    for name in names:
        for file in metadata.distribution(name).files or []:
            top = file.parts[0]
            source = pathlib.Path(file.locate()).resolve()
            if top.startswith("..") or top.endswith(".dist-info") or (directory / top).exists():
                continue
            (directory / top).symlink_to(
                source if len(file.parts) == 1 else source.parents[len(file.parts) - 2]
            )
    return directory


@pytest.mark.slow
def test_a_wheel_built_without_a_compiler_installs_and_imports_in_a_fresh_venv(tmp_path):
    """`python -m build` with no C++ compiler, then a fresh venv holding only torch and numpy:
    no network (no build isolation, no index), as in CI."""
    # a clean copy of the sources: no extension built earlier may be reused
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".*cache", "results"
        ),
    )
    environment = dict(os.environ, CC="/bin/false", CXX="/bin/false", LDSHARED="/bin/false")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path / "wheels"),
            str(source),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheels").glob("sotalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sotalign/ot/klot.py" in names
    assert "sotalign/ot/dispatch.json" in names  # read by the dispatch at import
    assert not [name for name in names if name.startswith("sotalign/_C")]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = pathlib.Path(
        subprocess.run(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
        ).stdout.strip()
    )
    (site / "core.pth").write_text(str(core_site(tmp_path / "core")) + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "import warnings, torch, sotalign\n"
        "print(sotalign.__file__)\n"
        "print(sotalign.available_backends())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(8, 3)\n"
        "    r1 = sotalign.sinkhorn(x, x)\n"
        "    r2 = sotalign.sinkhorn(x, x)\n"
        "    loss = sotalign.klot(x, x, x, x)\n"
        "print(r1.backend, r2.backend, len([w for w in caught if 'sotalign._C' in str(w.message)]))\n"
        "try:\n"
        "    sotalign.fit\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    run = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    location, backends, summary, missing = run.stdout.strip().splitlines()
    assert location.startswith(str(site))
    # the optional triton/keops backends are not installed in this venv
    assert backends == "['reference', 'torch']"
    assert summary == "torch torch 1"
    assert "pip install 'sotalign[train]'" in missing
