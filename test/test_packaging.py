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
NODES = ("safety", "servo", "policy", "camera", "sim", "tom_follower", "teleop", "recorder")
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
    # the build type is declared in <export> only: ament_python is no package or rosdep key (test_rosdep.py)
    assert "ament_python" not in {d.name for d in pkg.buildtool_depends}
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


def _launch_needs() -> tuple[set[str], set[str]]:
    """(magma_ros executables, share-relative files) that the source launch files refer to."""
    import yaml

    execs, files = set(), set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("pkg") == PKG and isinstance(node.get("exec"), str):
                execs.add(node["exec"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            files.update(re.findall(r"\$\(find-pkg-share " + PKG + r"\)/([\w./-]+)", node))

    for f in (REPO / "launch").glob("*.launch.*"):
        walk(yaml.safe_load(f.read_text()))
    return execs, files


def _check_launch_needs(prefix: Path, share: Path) -> None:
    """Every launch file, every magma_ros executable and share file the launch files name, is installed."""
    execs, files = _launch_needs()
    assert execs >= {f"magma_ros_{n}" for n in ("sim", "safety", "servo", "policy", "camera")}
    assert files, "the launch files name no $(find-pkg-share magma_ros) file (the parser above is wrong)"
    for exe in execs:
        p = prefix / "lib" / PKG / exe
        assert p.is_file() and os.access(p, os.X_OK), f"launch files run {exe}, not installed at {p}"
    for rel in files:
        assert (share / rel).is_file(), f"launch files use $(find-pkg-share {PKG})/{rel}, not installed"
    src = {f.name for f in (REPO / "launch").glob("*.launch.*")}
    assert {f.name for f in (share / "launch").iterdir()} == src


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
    # as the README says: `python -m colcon build` with the venv's Python
    _run([sys.executable, "-m", "colcon", "build", "--base-paths", "src", "--event-handlers", "console_direct-"],
         cwd=ws, env=env)
    prefix = ws / "install" / PKG
    # the nodes, and the CLI as `ros2 run magma_ros magma-ros ...` (README: make-tiny-checkpoint)
    for name in [f"magma_ros_{n}" for n in NODES] + ["magma-ros"]:
        exe = prefix / "lib" / PKG / name
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing or not executable"
        # they start with the interpreter colcon ran under (the venv's, where torch & co. are)
        shebang = Path(exe.read_text().splitlines()[0].removeprefix("#!").split()[0])
        assert shebang.parent.resolve() == Path(sys.executable).parent.resolve(), (exe, shebang)
    share = prefix / "share" / PKG
    _check_data(share)
    _check_launch_needs(prefix, share)
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
