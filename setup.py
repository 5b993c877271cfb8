"""ament_python / pip install for magma_ros.

The same file serves `colcon build` in a ROS 2 workspace (data files land under
share/magma_ros) and `pip install -e .` in a plain venv whose ROS 2 comes from wheels.
"""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "magma_ros"
NODES = ["safety", "servo", "policy", "camera", "sim", "tom_follower", "teleop", "recorder"]


def _files(pattern):
    return [f for f in glob(pattern, recursive=True) if not f.endswith("/")]


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "benchmarks"]),
    package_data={PACKAGE: ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", _files("launch/*.launch.*")),
        (f"share/{PACKAGE}/urdf", _files("urdf/*.urdf")),
        (f"share/{PACKAGE}/config", _files("config/*.yaml") + _files("config/*.xml")),
        (f"share/{PACKAGE}/config/robots", _files("config/robots/*.yaml")),
        (f"share/{PACKAGE}/config/cameras", _files("config/cameras/*.yaml")),
        (f"share/{PACKAGE}/config/sim", _files("config/sim/*.yaml")),
        (f"share/{PACKAGE}/config/stats", _files("config/stats/*.json")),
        (f"share/{PACKAGE}/config/controllers", _files("config/controllers/*.yaml")),
        (f"share/{PACKAGE}/config/teleop", _files("config/teleop/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="magma_ros developers",
    maintainer_email="magma-ros@example.com",
    description="ROS 2 manipulation stack running Microsoft's Magma on Franka FR3/Panda and WidowX 250s",
    license="MIT",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [f"magma_ros_{n} = {PACKAGE}.nodes.{n}:main" for n in NODES]
        + ["magma-ros = magma_ros.cli:main"],
    },
)
