"""Packaging: package.xml as ROS tooling reads it, and what `colcon build` / `pip install` install.

The builds run on a copy of the package sources in a scratch directory, with ROS environment variables
removed (colcon-core + colcon-ros + colcon-python-setup-py from PyPI, no ROS install needed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = "magma_ros"
NODES = ("safety", "servo", "policy", "camera", "sim", "compose")
REQUIRED_EXEC_DEPENDS = ("rclpy", "sensor_msgs", "geometry_msgs", "trajectory_msgs", "std_msgs", "std_srvs",
                         "visualization_msgs", "diagnostic_msgs", "nav_msgs", "rosgraph_msgs")
# What a build needs from the source tree (everything else — tests, venv, caches — stays behind).
SOURCES = ("package.xml", "setup.py", "setup.cfg", "resource", PKG, "launch", "config", "urdf", "README.md")
ROS_ENV = ("AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH", "CMAKE_PREFIX_PATH", "ROS_DISTRO", "ROS_VERSION",
           "ROS_PYTHON_VERSION", "PYTHONPATH")


def test_package_xml_parses_with_catkin_pkg():
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO / "package.xml"))
    pkg.validate()
    assert pkg.package_format == 3
    assert pkg.name == PKG
    assert pkg.get_build_type() == "ament_python"
    assert "ament_python" in {d.name for d in pkg.buildtool_depends}
    exec_depends = {d.name for d in pkg.exec_depends}
    missing = set(REQUIRED_EXEC_DEPENDS) - exec_depends
    assert not missing, f"package.xml lacks exec_depend {sorted(missing)}"
    setup_version = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert pkg.version == setup_version
    assert (REPO / "resource" / PKG).is_file()  # ament index marker


def _copy_sources(dst: Path) -> Path:
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dst / name)
    return dst


def _clean_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ROS_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp)  # keep colcon's user configuration out of it
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def _check_data(share: Path) -> None:
    for sub in ("launch", "config", "urdf"):
        assert (share / sub).is_dir(), f"{share / sub} not installed"
    assert (share / "package.xml").is_file()
    assert list((share / "launch").iterdir()), "no launch files installed"
    for robot in ("fr3", "panda", "wx250s"):
        assert (share / "config" / "robots" / f"{robot}.yaml").is_file()
        assert (share / "urdf" / f"{robot}.urdf").is_file()


def _check_import_from(site: Path, share: Path, tmp: Path, env: dict) -> None:
    """The installed package (not the checkout) finds its installed data and runs the kinematics."""
    code = ("import magma_ros, sys; from magma_ros.core.robot import load_robot;"
            "from magma_ros.core.kinematics import Kinematics;"
            "c = load_robot('wx250s'); print(magma_ros.__file__); print(c.urdf);"
            "print(round(float(Kinematics(c).fk(c.home)[0, 3]), 6))")
    env = dict(env, PYTHONPATH=str(site))
    out = _run([sys.executable, "-c", code], cwd=tmp, env=env).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(site.resolve())
    assert Path(out[1]).resolve() == (share / "urdf" / "wx250s.urdf").resolve()
    assert out[2] == "0.458325"  # WidowX TCP x at home (Interbotix M)


@pytest.mark.slow
def test_colcon_build_installs_executables_and_data(tmp_path):
    ws = tmp_path / "ws"
    _copy_sources(ws / "src" / PKG)
    env = _clean_env(tmp_path)
    colcon = Path(sys.executable).parent / "colcon"
    assert colcon.exists(), "colcon-core is not installed in this environment"
    _run([str(colcon), "build", "--base-paths", "src", "--event-handlers", "console_direct-"], cwd=ws, env=env)
    prefix = ws / "install" / PKG
    for node in NODES:
        exe = prefix / "lib" / PKG / f"magma_ros_{node}"
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing or not executable"
    share = prefix / "share" / PKG
    _check_data(share)
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PKG).is_file()
    sites = list(prefix.glob(f"lib/python3*/site-packages/{PKG}/core/kinematics.py"))
    assert sites, "Python package not installed"
    _check_import_from(sites[0].parents[2], share, tmp_path, env)


@pytest.mark.slow
def test_pip_install_into_a_prefix(tmp_path):
    before = _installed_location(tmp_path)
    src = _copy_sources(tmp_path / "src")
    prefix = tmp_path / "prefix"
    env = _clean_env(tmp_path)
    # --ignore-installed: never touch (uninstall) the copy installed in the running environment.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
          "--ignore-installed", "--disable-pip-version-check", "--prefix", str(prefix), str(src)],
         cwd=tmp_path, env=env)
    share = prefix / "share" / PKG
    _check_data(share)
    scripts = Path(sysconfig.get_path("scripts", vars={"base": str(prefix)}))
    for node in NODES:
        assert (scripts / f"magma_ros_{node}").is_file()
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix)}))
    assert (site / PKG / "core" / "kinematics.py").is_file()
    _check_import_from(site, share, tmp_path, env)
    assert _installed_location(tmp_path) == before, "pip touched the environment's own magma_ros install"


def _installed_location(cwd: Path) -> str:
    code = "import importlib.util as u; s = u.find_spec('magma_ros'); print(s.origin if s else None)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True).stdout
