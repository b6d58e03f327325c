"""Builds the optional C++ extension ``sotalign._C`` (pybind11 + OpenMP) from csrc/.

The extension is optional: without a working compiler the package still installs, the
``cpu`` backend is reported unavailable and ``backend="auto"`` falls back to ``torch``.
Set ``SOTALIGN_NO_NATIVE=1`` to build without ``-march=native`` (for portable wheels).
"""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


class OptionalBuildExt(build_ext):
    """Turns a failed C++ build into a warning instead of a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # compiler missing or broken
            self.warn(f"sotalign: C++ extension not built ({error}); the 'cpu' backend is unavailable")

    def build_extension(self, ext):
        flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
        if os.environ.get("SOTALIGN_NO_NATIVE") != "1" and self.compiler.compiler_type == "unix":
            flags.append("-march=native")
        ext.extra_compile_args = flags
        ext.extra_link_args = ["-fopenmp"]
        try:
            super().build_extension(ext)
        except Exception as error:
            self.warn(f"sotalign: C++ extension not built ({error}); the 'cpu' backend is unavailable")


setup(
    ext_modules=[
        Pybind11Extension(
            "sotalign._C",
            sorted(glob.glob("csrc/*.cpp")),
            depends=sorted(glob.glob("csrc/*.hpp")),
            include_dirs=["csrc"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
