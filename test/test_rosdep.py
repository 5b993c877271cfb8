"""`rosdep install` resolves every dependency of package.xml on Humble, Jazzy and Kilted (offline).

The oracle is ros/rosdistro itself, reduced to test/fixtures/rosdep/keys.txt.gz by
scripts/extract_rosdep_keys.py (its first line names the rosdistro commit): the rosdep keys of
rosdep/base.yaml and rosdep/python.yaml with the installer each resolves to on Ubuntu 22.04 (jammy,
Humble) and 24.04 (noble, Jazzy and Kilted), and the packages released in each distribution.yaml.
rosdep resolves a dependency as a released package of $ROS_DISTRO first, then as a key. Keys that
resolve only through rosdep's pip installer are refused: on 24.04 pip refuses the system Python
(PEP 668, externally-managed-environment), so those belong in requirements-ros.txt instead.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "test" / "fixtures" / "rosdep" / "keys.txt.gz"
SCRIPT = REPO / "scripts" / "extract_rosdep_keys.py"
DISTROS = {"humble": "jammy", "jazzy": "noble", "kilted": "noble"}
UBUNTU = ("jammy", "noble")


def load_index(path: Path = FIXTURE) -> tuple[str, dict[str, dict[str, str]], dict[str, set[str]]]:
    """(header, key -> {ubuntu codename: installer}, package -> distros it is released on)."""
    keys: dict[str, dict[str, str]] = {}
    pkgs: dict[str, set[str]] = {}
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    for line in lines:
        if line.startswith("key "):
            _, name, *inst = line.split()
            keys[name] = dict(zip(UBUNTU, inst))
        elif line.startswith("pkg "):
            _, name, distros = line.split()
            pkgs[name] = set(distros.split(","))
    return lines[0], keys, pkgs


def dependencies(package_xml: Path) -> list[tuple[str, str]]:
    """(tag, name) of every dependency rosdep reads from a package.xml (conditions evaluated for ROS 2)."""
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(package_xml))
    pkg.evaluate_conditions({"ROS_VERSION": "2", "ROS_PYTHON_VERSION": "3"})
    out = []
    for tag in ("build_depends", "buildtool_depends", "build_export_depends", "buildtool_export_depends",
                "exec_depends", "test_depends", "doc_depends"):
        out += [(tag[:-1], d.name) for d in getattr(pkg, tag) if d.evaluated_condition is not False]
    for g in pkg.group_depends:
        out.append(("group_depend", g.name))
    return out


def unresolved(package_xml: Path, index=None) -> list[str]:
    """One line per dependency that rosdep cannot install with apt on one of the three distros."""
    _, keys, pkgs = index or load_index()
    problems = []
    for tag, name in dependencies(package_xml):
        for distro, codename in DISTROS.items():
            if distro in pkgs.get(name, ()):
                continue
            inst = keys.get(name, {}).get(codename, "-")
            if inst == "apt":
                continue
            why = {"-": "no released package and no rosdep key",
                   "pip": "a pip-only rosdep key (PEP 668 refuses it on Ubuntu 24.04)"}.get(inst, f"'{inst}'")
            problems.append(f"<{tag}>{name}</{tag}> on {distro} ({codename}): {why}")
    return problems


def test_fixture_names_its_rosdistro_commit_and_is_small():
    header, keys, pkgs = load_index()
    assert re.match(r"# ros/rosdistro [0-9a-f]{40} \(", header), header
    assert SCRIPT.name in header
    assert FIXTURE.stat().st_size < 200_000
    # sanity of the extraction against rosdistro facts that do not change
    assert keys["python3-numpy"] == {"jammy": "apt", "noble": "apt"}
    assert {"rclpy", "launch_yaml", "pinocchio"} <= {p for p, d in pkgs.items() if d == set(DISTROS)}
    assert len(keys) > 1500 and len(pkgs) > 1500


def test_every_package_xml_dependency_resolves_on_humble_jazzy_kilted():
    problems = unresolved(REPO / "package.xml")
    assert not problems, ("rosdep cannot install these (use a released package or an apt rosdep key; "
                          "pip-only Python packages go in requirements-ros.txt):\n" + "\n".join(problems))
    names = {n for _, n in dependencies(REPO / "package.xml")}
    assert {"rclpy", "pinocchio", "launch_ros", "launch_yaml", "ros2launch"} <= names


def _with_dependency(tmp_path: Path, line: str) -> Path:
    text = (REPO / "package.xml").read_text()
    out = tmp_path / "package.xml"
    out.write_text(text.replace("  <test_depend>", f"  {line}\n  <test_depend>", 1))
    return out


@pytest.mark.parametrize("line, expect", [
    ("<exec_depend>python3-magma-made-up-key</exec_depend>", "python3-magma-made-up-key</exec_depend> on humble"),
    # the three dependencies of issue 15 that stopped `rosdep install`
    ("<exec_depend>python3-safetensors</exec_depend>", "no released package and no rosdep key"),
    ("<exec_depend>python3-pinocchio</exec_depend>", "python3-pinocchio</exec_depend> on kilted"),
    ("<buildtool_depend>ament_python</buildtool_depend>", "<buildtool_depend>ament_python"),
    # resolves, but only through pip: refused on 24.04
    ("<exec_depend>python3-transformers-pip</exec_depend>", "pip-only rosdep key"),
])
def test_a_dependency_rosdep_cannot_install_fails_the_check(tmp_path, line, expect):
    bad = _with_dependency(tmp_path, line)
    problems = unresolved(bad)
    assert any(expect in p for p in problems), problems
    assert len(problems) == 3  # reported once per distro, and nothing else in package.xml is


def test_released_on_some_distros_only_is_reported_for_the_others(tmp_path):
    _, _, pkgs = load_index()
    humble_only = sorted(p for p, d in pkgs.items() if d == {"humble"})[0]
    problems = unresolved(_with_dependency(tmp_path, f"<exec_depend>{humble_only}</exec_depend>"))
    assert [p.split(" on ")[1].split()[0] for p in problems] == ["jazzy", "kilted"], problems


# ---------------------------------------------------------------------------------------------
# The extraction script, on a small rosdistro-shaped git repository
# ---------------------------------------------------------------------------------------------

_BASE = """
    libfoo: {ubuntu: [libfoo1]}
    python3-wild: {ubuntu: {'*': [python3-wild], jammy: null}}
    python3-pipped: {ubuntu: {pip: {packages: [pipped]}}}
    python3-jammy-only: {ubuntu: {jammy: [python3-j]}}
    osx-only: {osx: [foo]}
    everywhere: {'*': {pip: {packages: [everywhere]}}}
"""
_DISTRO = """
    repositories:
      multi:
        release: {packages: [multi_a, multi_b], version: 1.0.0-1}
      single:
        release: {version: 2.0.0-1}
      unreleased:
        release: {packages: [ghost]}
      source_only:
        source: {type: git}
"""


def test_extractor_follows_rosdep_rules(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")  # pragma: no cover
    src = tmp_path / "rosdistro"
    (src / "rosdep").mkdir(parents=True)
    (src / "rosdep" / "base.yaml").write_text(textwrap.dedent(_BASE))
    (src / "rosdep" / "python.yaml").write_text("python3-numpy: {ubuntu: [python3-numpy]}\n")
    for d in DISTROS:
        (src / d).mkdir()
        (src / d / "distribution.yaml").write_text(textwrap.dedent(_DISTRO) if d != "kilted" else "{}\n")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    out = tmp_path / "keys.txt.gz"
    subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(out)], check=True, capture_output=True)
    header, keys, pkgs = load_index(out)
    sha = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert sha in header
    assert keys["libfoo"] == {"jammy": "apt", "noble": "apt"}
    assert keys["python3-wild"] == {"jammy": "-", "noble": "apt"}  # explicit null on jammy
    assert keys["python3-pipped"] == {"jammy": "pip", "noble": "pip"}
    assert keys["python3-jammy-only"] == {"jammy": "apt", "noble": "-"}
    assert keys["everywhere"] == {"jammy": "pip", "noble": "pip"}
    assert "osx-only" not in keys and "python3-numpy" in keys
    assert pkgs == {"multi_a": {"humble", "jazzy"}, "multi_b": {"humble", "jazzy"}, "single": {"humble", "jazzy"}}
    # the same input gives the same bytes (the committed fixture can be regenerated and diffed)
    out2 = tmp_path / "again.txt.gz"
    subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(out2)], check=True, capture_output=True)
    assert out.read_bytes() == out2.read_bytes()


# ---------------------------------------------------------------------------------------------
# The pip half: requirements-ros.txt
# ---------------------------------------------------------------------------------------------

# Third-party modules the package imports -> where a ROS workspace install gets them.
# "rosdep:<dep>" must be a package.xml dependency; "pip:<dist>" must be in requirements-ros.txt;
# "optional" is imported inside try/except (extra features) and installed by nobody.
IMPORT_SOURCES = {
    "rclpy": "rosdep:rclpy", "rcl_interfaces": "rosdep:rcl_interfaces",
    "builtin_interfaces": "rosdep:builtin_interfaces", "sensor_msgs": "rosdep:sensor_msgs",
    "geometry_msgs": "rosdep:geometry_msgs", "trajectory_msgs": "rosdep:trajectory_msgs",
    "std_msgs": "rosdep:std_msgs", "std_srvs": "rosdep:std_srvs", "visualization_msgs": "rosdep:visualization_msgs",
    "diagnostic_msgs": "rosdep:diagnostic_msgs", "nav_msgs": "rosdep:nav_msgs", "rosgraph_msgs": "rosdep:rosgraph_msgs",
    "tf2_msgs": "rosdep:tf2_msgs", "ament_index_python": "rosdep:ament_index_python",
    "pinocchio": "rosdep:pinocchio", "numpy": "rosdep:python3-numpy", "yaml": "rosdep:python3-yaml",
    "PIL": "rosdep:python3-pil", "msgpack": "rosdep:python3-msgpack", "tqdm": "rosdep:python3-tqdm",
    "torch": "pip:torch", "torchvision": "pip:torchvision", "transformers": "pip:transformers", "timm": "pip:timm",
    "safetensors": "pip:safetensors", "tokenizers": "pip:tokenizers", "huggingface_hub": "pip:huggingface-hub",
    "mujoco": "pip:mujoco", "pyrealsense2": "pip:pyrealsense2", "imageio": "pip:imageio",
    "cv2": "rosdep:python3-opencv", "av": "pip:av", "pyarrow": "pip:pyarrow", "mcap": "pip:mcap-ros2-support",
    "websockets": "pip:websockets", "ray": "optional",
    "franka_msgs": "optional", "torchao": "optional", "bitsandbytes": "optional",
}


def _third_party_imports() -> set[str]:
    import ast

    out = set()
    for p in (REPO / "magma_ros").rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                names = [n.module]
            else:
                continue
            out |= {x.split(".")[0] for x in names}
    return {m for m in out if m not in sys.stdlib_module_names and m != "magma_ros"}


def _requirements(path: Path) -> dict[str, list[str]]:
    """dist name (normalised) -> its requirement lines (without comments)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.match(r"[A-Za-z0-9._-]+", line).group(0).lower().replace("_", "-")
            out.setdefault(name, []).append(line)
    return out


def test_every_import_comes_from_rosdep_or_requirements_ros():
    deps = {n for _, n in dependencies(REPO / "package.xml")}
    ws = _requirements(REPO / "requirements-ros.txt")
    unknown = sorted(_third_party_imports() - IMPORT_SOURCES.keys())
    assert not unknown, f"new third-party imports {unknown}: add them to package.xml (rosdep) or " \
                        f"requirements-ros.txt (pip) and to IMPORT_SOURCES"
    for mod in _third_party_imports():
        kind, _, name = IMPORT_SOURCES[mod].partition(":")
        if kind == "rosdep":
            assert name in deps, f"{mod} is imported but package.xml lacks {name}"
        elif kind == "pip":
            assert name in ws, f"{mod} is imported but requirements-ros.txt lacks {name}"


def test_requirements_ros_has_the_project_pins_and_no_ros_wheels():
    pins = _requirements(REPO / "requirements.txt")
    ws = _requirements(REPO / "requirements-ros.txt")
    assert not [n for n in ws if n.startswith("ros-")], "ROS 2 wheels would shadow /opt/ros's rclpy"
    rosdep_provided = {"numpy", "pillow", "pyyaml", "msgpack", "tqdm", "pin"}
    assert not (ws.keys() & rosdep_provided - {"numpy"}), "rosdep installs these from apt"
    assert ws["numpy"] == ["numpy<2"]  # the distro's numpy 1.x that ROS 2's bindings are built against
    for name, lines in ws.items():
        if name == "numpy":
            continue
        assert name in pins, f"{name} is not in requirements.txt"
        # for Python >= 3.11 (and unconditional lines) the pin is exactly requirements.txt's
        main = [x for x in lines if "python_version <" not in x]
        assert main and main[0].split(";")[0].strip() == pins[name][0].split(";")[0].strip(), (name, main, pins[name])
