"""Packages for setuptools; everything else is in pyproject.toml.

The config tree stays at the top level (`conf/`) in the repository but ships as the
package `harness.conf`, so a wheel carries it and the CLI finds it as `pkg://harness.conf`
in a wheel and an editable install alike. pyproject.toml alone cannot add a mapped package
to the ones `packages.find` discovers, hence this file.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["harness*", "plugins*", "hydra_plugins*"]),
        "harness.conf",
    ],
    package_dir={"harness.conf": "conf"},
)
