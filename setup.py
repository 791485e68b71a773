"""Builds ktengine_ext, the C/Cython extension with the CPU expert kernels.

Every kernel is compiled for plain x86-64; the AVX512 and AMX paths carry their own
target attributes and are chosen at run time, so one build runs on any x86-64 CPU.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

sources = ["ktengine_ext/_moe.pyx"] + sorted(glob.glob("ktengine_ext/csrc/*.c"))
extra_compile_args = ["-O3", "-std=c11", "-fopenmp-simd", "-pthread", "-Wall", "-Wno-unused-function"]
if os.environ.get("KTENGINE_DEBUG_BUILD"):
    extra_compile_args += ["-g", "-O0"]

ext = Extension(
    "ktengine_ext._moe",
    sources=sources,
    include_dirs=["ktengine_ext/csrc"],
    extra_compile_args=extra_compile_args,
    extra_link_args=["-pthread"],
)

setup(ext_modules=cythonize([ext], language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}))
