#!/usr/bin/env python3
"""Extract what rosdep can resolve on Ubuntu for Humble, Jazzy and Kilted from a ros/rosdistro checkout.

Writes ``test/fixtures/rosdep/keys.txt.gz`` (read by test/test_rosdep.py, offline):

- every rosdep key of ``rosdep/base.yaml`` and ``rosdep/python.yaml`` with the installer it resolves
  to on Ubuntu 22.04 (jammy, Humble) and 24.04 (noble, Jazzy and Kilted): ``apt``, ``pip``, ``source``,
  or ``-`` (no rule for that release, or an explicit ``null``);
- every package released in ``humble/``, ``jazzy/`` and ``kilted/distribution.yaml`` (REP 143: the
  ``release: packages:`` list, or the repository's own name when the list is absent; a repository
  without a ``release: version`` is not released), with the distributions it is released on.

rosdep resolves a package.xml dependency as a released package of ``$ROS_DISTRO`` first, then as a
key of the rosdep sources (rosdep/sources.list.d/20-default.list: base.yaml and python.yaml on
Ubuntu; ruby.yaml has no key a Python package needs).

Usage (the rosdistro checkout may be a bare git directory; files are read at a commit)::

    python scripts/extract_rosdep_keys.py /path/to/rosdistro [--commit HEAD] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from pathlib import Path

import yaml

DISTROS = {"humble": "jammy", "jazzy": "noble", "kilted": "noble"}  # ROS distro -> its Ubuntu release
UBUNTU = ("jammy", "noble")
INSTALLERS = ("apt", "pip", "source")
OUT = Path(__file__).resolve().parent.parent / "test" / "fixtures" / "rosdep" / "keys.txt.gz"


def git_show(repo: Path, commit: str, path: str) -> str:
    """Text of ``path`` at ``commit`` in the git repository ``repo``."""
    return subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def _installer(rule) -> str:
    """What one resolved rule installs with: a list is the OS's default installer (apt on Ubuntu)."""
    if rule is None:
        return "-"
    if isinstance(rule, list):
        return "apt"
    if isinstance(rule, dict):
        if "packages" in rule:  # {packages: [...]} under the default installer
            return "apt"
        for name in INSTALLERS:
            if name in rule:
                return name if rule[name] is not None else "-"
    return "-"


def ubuntu_installer(entry, codename: str) -> str:
    """Installer a rosdep key resolves to on Ubuntu ``codename`` (rosdep's rule lookup, REP 111)."""
    if not isinstance(entry, dict):
        return "-"
    rules = entry.get("ubuntu", entry.get("*"))
    if rules is None:
        return "-"
    if isinstance(rules, list):
        return "apt"
    if not isinstance(rules, dict):
        return "-"
    if any(k in rules for k in (*INSTALLERS, "packages")):  # installer keys: same rule on every release
        return _installer(rules)
    if codename in rules:  # an explicit null means "not available on this release"
        return _installer(rules[codename])
    return _installer(rules["*"]) if "*" in rules else "-"


def released_packages(distribution: dict) -> set[str]:
    """Package names released in one ``<distro>/distribution.yaml`` (REP 143)."""
    out = set()
    for repo_name, repo in (distribution.get("repositories") or {}).items():
        release = (repo or {}).get("release")
        if not release or not release.get("version"):
            continue
        out.update(release.get("packages") or [repo_name])
    return out


def extract(rosdistro: Path, commit: str) -> tuple[str, str]:
    """Fixture text and the full commit id it was extracted from."""
    sha = subprocess.run(["git", "-C", str(rosdistro), "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    date = subprocess.run(["git", "-C", str(rosdistro), "show", "-s", "--format=%cI", sha], check=True,
                          capture_output=True, text=True).stdout.strip()
    keys: dict[str, dict] = {}
    for src in ("rosdep/base.yaml", "rosdep/python.yaml"):
        for key, entry in (yaml.safe_load(git_show(rosdistro, sha, src)) or {}).items():
            keys[key] = entry
    released: dict[str, list[str]] = {}
    for distro in DISTROS:
        for pkg in released_packages(yaml.safe_load(git_show(rosdistro, sha, f"{distro}/distribution.yaml"))):
            released.setdefault(pkg, []).append(distro)
    lines = [f"# ros/rosdistro {sha} ({date}); written by scripts/extract_rosdep_keys.py",
             "# key <installer on " + "> <installer on ".join(UBUNTU) + ">   (apt | pip | source | -)"]
    for key in sorted(keys):
        inst = [ubuntu_installer(keys[key], c) for c in UBUNTU]
        if any(i != "-" for i in inst):
            lines.append(f"key {key} {' '.join(inst)}")
    lines.append("# pkg <name> <distros it is released on>")
    for pkg in sorted(released):
        lines.append(f"pkg {pkg} {','.join(released[pkg])}")
    return "\n".join(lines) + "\n", sha


def main(argv: list[str] | None = None) -> int:
    """Command line: write the fixture from a rosdistro git checkout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rosdistro", type=Path, help="ros/rosdistro git checkout (or bare repository)")
    ap.add_argument("--commit", default="HEAD", help="commit to read (default: HEAD)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output file (default: {OUT})")
    ns = ap.parse_args(argv)
    text, sha = extract(ns.rosdistro, ns.commit)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    # no name and mtime 0 in the gzip header: the same input gives the same bytes
    ns.out.write_bytes(gzip.compress(text.encode(), mtime=0))
    n_keys = sum(1 for line in text.splitlines() if line.startswith("key "))
    n_pkgs = sum(1 for line in text.splitlines() if line.startswith("pkg "))
    print(f"{ns.out}: {n_keys} rosdep keys, {n_pkgs} released packages, rosdistro {sha}, "
          f"{ns.out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
