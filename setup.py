"""Packaging: every subpackage of ``cahfp_ops`` plus the C++ sources it compiles on first use.

``csrc/`` is installed as ``cahfp_ops/_csrc`` so that an installed (non-editable) package can
compile its kernels with ``torch.utils.cpp_extension.load``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["cahfp_ops", "cahfp_ops.*"]), "cahfp_ops._csrc"],
    package_dir={"cahfp_ops._csrc": "csrc"},
    package_data={"cahfp_ops._csrc": ["*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.h"]},
    include_package_data=False,
)
