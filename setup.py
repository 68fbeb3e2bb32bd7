"""Build: the package, its Triton kernels (kernels/ installed as tokdistill_fast.kernels) and the optional C++
pieces: the aligner, the fused CPU kernels (csrc/fused.cpp) and the library that answers MKL's vendor check
(csrc/mkl_dispatch.cpp). TOKDISTILL_NO_EXT=1 skips them (Python fallbacks only; MKL's own dispatch);
TOKDISTILL_REQUIRE_EXT=1 makes a failed compile an error instead of a silent fallback (CI sets it)."""

import os
import platform

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import Extension, setup

ext = []
if os.environ.get("TOKDISTILL_NO_EXT") != "1" and os.path.exists("csrc/align.cpp"):
    optional = os.environ.get("TOKDISTILL_REQUIRE_EXT") != "1"
    ext = [Pybind11Extension("tokdistill_fast._align_ext", ["csrc/align.cpp"], cxx_std=17,
                             extra_compile_args=["-O3"], optional=optional),
           Pybind11Extension("tokdistill_fast._fused_ext", ["csrc/fused.cpp"], cxx_std=17,
                             extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                                                 "-fopenmp"]
                             + (["-mprefer-vector-width=512"] if platform.machine() == "x86_64" else []),
                             extra_link_args=["-fopenmp"], optional=optional),
           Extension("tokdistill_fast._mkl_dispatch", ["csrc/mkl_dispatch.cpp"], optional=optional)]

setup(
    ext_modules=ext,
    cmdclass={"build_ext": build_ext},
    # The pipeline stages at the top of the package, then its subpackages (see tokdistill_fast/__init__.py).
    packages=["tokdistill_fast", "tokdistill_fast.student", "tokdistill_fast.modeling", "tokdistill_fast.control",
              "tokdistill_fast.evaluation", "tokdistill_fast.tools", "tokdistill_fast.kernels"],
    package_dir={"tokdistill_fast": "tokdistill_fast", "tokdistill_fast.kernels": "kernels"},
    package_data={"tokdistill_fast.tools": ["llama_ids.cpp"]},  # compiled on demand by tools/runtimes.py
)
