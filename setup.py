"""Packaging: the Python package plus the C++ sources it compiles on first use.

``csrc/`` is installed as ``cahfp_ops/_csrc`` so that an installed (non-editable)
package can compile its kernels with ``torch.utils.cpp_extension.load``.
"""

from setuptools import setup

setup(
    packages=["cahfp_ops", "cahfp_ops._csrc"],
    package_dir={"cahfp_ops": "cahfp_ops", "cahfp_ops._csrc": "csrc"},
    package_data={"cahfp_ops._csrc": ["*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.h"]},
    include_package_data=False,
)
