"""Builds jitrope's Python extension jitrope._C from csrc/sources.txt with the flags and default
CUDA archs of cmake/flags.txt (CMakeLists.txt reads both files too).

CUDA kernels are built when torch is a CUDA build and nvcc is found, unless JITROPE_CPU_ONLY=1.
TORCH_CUDA_ARCH_LIST, when set, replaces the default arch list.
"""
import os
import sys
import glob
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_sources():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def read_flags():
    """cmake/flags.txt as {key: value}: `key = value` lines, # comments."""
    flags = {}
    for line in (ROOT / "cmake" / "flags.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            flags[key.strip()] = value.strip()
    return flags


def _find_cuda_home():
    # torch guesses CUDA_HOME from the folder of `nvcc` on PATH, which is wrong when that is a
    # wrapper in /usr/local/bin; prefer the toolkit's standard location.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if Path(home, "bin", "nvcc").exists():
            os.environ["CUDA_HOME"] = home
            return


def make_extensions():
    _find_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    flags = read_flags()
    cpu_only = os.environ.get("JITROPE_CPU_ONLY", "0") not in ("", "0")
    with_cuda = not cpu_only and torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = flags["cuda_arch_list"]
    print(
        f"jitrope: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels"
        + (f" for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "")
    )

    sources = [s for s in read_sources() if with_cuda or not s.endswith(".cu")]
    sources.append("csrc/python_module.cpp")
    macros = []
    # Colour only for the terminal: under ninja the compiler writes to a pipe and would not colour.
    cxx = flags["cxx"].split() + ["-fdiagnostics-color=always"]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is inline: without -fopenmp the CPU kernels run on one thread whatever
        # torch.set_num_threads says. Compile-only: GOMP_* resolve at load time to the OpenMP
        # runtime torch already loaded, so there is one thread pool, sized by torch.
        cxx.append("-fopenmp")
    nvcc = flags["nvcc"].split()
    if with_cuda:
        macros.append(("JITROPE_WITH_CUDA", "1"))
    include_dirs = [str(ROOT / "csrc")]
    if with_cuda:
        # ATen's CUDA headers include cuSPARSE/cuBLAS headers; a minimal toolkit lacks them and
        # the torch wheel's nvidia/* packages provide them.
        site = Path(torch.__file__).resolve().parent.parent
        include_dirs += sorted(glob.glob(str(site / "nvidia" / "*" / "include")))
    ext = (CUDAExtension if with_cuda else CppExtension)(
        name="jitrope._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        py_limited_api=True,
    )
    return [ext]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="jitrope",
    version="0.1.0",
    description="Fused 2D RoPE and factorized 2D position ops for a JiT diffusion transformer",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=make_extensions(),
    cmdclass=cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
)
