"""Without a C++ compiler the package still builds, installs and imports; backend="auto"
then falls back to torch with one warning. And where a compiler exists, the extension must
really be there (a silently skipped cpu backend would hide a broken build)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import sotalign

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_extension_is_built_here():
    if os.environ.get("SOTALIGN_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("SOTALIGN_ALLOW_NO_EXTENSION=1")
    assert "cpu" in sotalign.available_backends(), "sotalign._C did not build or import"


@pytest.mark.slow
def test_install_without_a_compiler(tmp_path):
    # a clean copy of the sources: no extension built earlier may be reused
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".*cache", "results"))
    environment = dict(os.environ, CC="/bin/false", CXX="/bin/false", LDSHARED="/bin/false")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        env=environment, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheels").glob("sotalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sotalign/ot/klot.py" in names
    assert "sotalign/ot/dispatch.json" in names     # read by the dispatch at import
    assert not [name for name in names if name.startswith("sotalign/_C")]

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    # an editable install of this checkout would still resolve sotalign._C: hide its finder
    probe = ("import sys\n"
             "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"
             "import warnings, torch, sotalign\n"
             "print(sotalign.__file__)\n"
             "print(sotalign.available_backends())\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    x = torch.randn(8, 3)\n"
             "    r1 = sotalign.sinkhorn(x, x)\n"
             "    r2 = sotalign.sinkhorn(x, x)\n"
             "print(r1.backend, r2.backend, len([w for w in caught if 'sotalign._C' in str(w.message)]))\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    assert run.returncode == 0, run.stderr
    location, backends, summary = run.stdout.strip().splitlines()
    assert location.startswith(str(target))
    # the optional triton/keops backends may be listed (they do not need sotalign's compiler)
    assert "'cpu'" not in backends and backends.startswith("['reference', 'torch'")
    assert summary == "torch torch 1"
