"""Build script: pure-Python package, plus the C++/CUDA extension when a compiler (and CUDA toolkit) is present.

Metadata lives in pyproject.toml.  See README.md "Building the C++/CUDA backends" for the environment variables.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"mvloss setup: {msg}", file=sys.stderr)


def _find_cuda_home():
    """The CUDA toolkit root, or None.  Set CUDA_HOME for torch when only /usr/local/cuda has nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            return root
    for root in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root  # torch would otherwise guess /usr/local from `which nvcc`
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        os.environ["CUDA_HOME"] = root
        return root
    return None


def _nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _default_max_jobs() -> str:
    """Parallel compile jobs: CPUs, limited to one job per ~3 GB of RAM (nvcc is memory hungry)."""
    cpus = os.cpu_count() or 1
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        cpus = min(cpus, max(1, int(ram_gb // 3)))
    except (ValueError, OSError, AttributeError):
        pass
    return str(max(1, cpus))


def extension_kwargs() -> dict:
    """ext_modules / cmdclass for the optional C++ and CUDA backends ({} when they cannot be built)."""
    if os.environ.get("MVLOSS_SKIP_CPP_BUILD") == "1":
        _log("MVLOSS_SKIP_CPP_BUILD=1: pure-Python install")
        return {}
    cuda_home = None
    want_cuda = os.environ.get("MVLOSS_SKIP_CUDA_BUILD") != "1"
    if want_cuda:
        cuda_home = _find_cuda_home()  # before importing torch.utils.cpp_extension (it reads CUDA_HOME at import)
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # build isolation without torch: still installable, as pure Python
        _log(f"torch is not importable at build time ({exc}); building pure Python (no C++ backends)")
        return {}
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        _log("no C++ compiler found; building pure Python (no C++ backends)")
        return {}
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())

    def rel(pattern):  # paths relative to setup.py (glob's root_dir needs Python >= 3.10)
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu")
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O3"]  # torch adds the C++ standard it needs (C++20 for torch >= 2.10)
    if sys.platform != "win32":
        # GCC keeps the epilogue's selects (clamps, masks) as branches under its default trapping math and then
        # leaves the AVX2 build's exp and dc loops scalar (csrc/README.md); clang's default already is this
        cxx_flags += ["-fno-trapping-math"]
        cxx_flags += ["-fopenmp"] if sys.platform.startswith("linux") else []
    link_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []

    force_cuda = os.environ.get("MVLOSS_FORCE_CUDA") == "1"
    build_cuda = want_cuda and (cuda_home is not None or force_cuda) and torch.version.cuda is not None
    if build_cuda and not force_cuda and cuda_home is not None:
        toolkit = _nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if toolkit is None or toolkit[0] != torch_major:
            # torch refuses to build with a toolkit of another major version; keep the CPU backend at least
            _log(f"CUDA toolkit {toolkit} at {cuda_home} does not match torch's CUDA {torch.version.cuda}: "
                 "building the CPU extension only (MVLOSS_FORCE_CUDA=1 to try anyway)")
            build_cuda = False
    if force_cuda and not build_cuda:
        raise RuntimeError("MVLOSS_FORCE_CUDA=1 but no CUDA toolkit (CUDA_HOME / nvcc) or torch without CUDA")
    if want_cuda and not build_cuda:
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found (CUDA_HOME, nvcc)"
        _log(f"building the CPU extension only: {why}")

    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _log(f"building CPU + CUDA extension (CUDA_HOME={os.environ.get('CUDA_HOME')}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = cpp_extension.CUDAExtension(
            name="mvloss._C",
            sources=sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("MVLOSS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="mvloss._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build_ext}}


setup(**extension_kwargs())
