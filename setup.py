"""Build script for halrp_fast.

Package metadata lives in pyproject.toml.  This file exists for what pyproject.toml cannot say:
the top-level ``kernels/`` folder (Triton sources) installs as ``halrp_fast.kernels``.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["halrp_fast", "halrp_fast.*"]) + ["halrp_fast.kernels"]

setup(
    packages=packages,
    package_dir={"halrp_fast.kernels": "kernels"},
)
