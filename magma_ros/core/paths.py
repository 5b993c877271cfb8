"""Locate the package's data (config/, urdf/, launch/) in a source checkout, a pip install or a colcon install."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from magma_ros.core.errors import ConfigError

PACKAGE = "magma_ros"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent.parent  # .../magma_ros (the Python package)
    out = []
    if os.environ.get("MAGMA_ROS_SHARE"):
        out.append(Path(os.environ["MAGMA_ROS_SHARE"]))
    out.append(here.parent)  # source checkout / editable install: repo root holds config/ urdf/
    # colcon/pip install: <prefix>/lib/pythonX.Y/site-packages/magma_ros -> <prefix>/share/magma_ros
    for parent in here.parents:
        out.append(parent / "share" / PACKAGE)
    out.append(Path(sys.prefix) / "share" / PACKAGE)
    try:  # a sourced ROS 2 workspace
        from ament_index_python.packages import get_package_share_directory

        out.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # noqa: BLE001 - ament_index is optional here
        pass
    return out


@lru_cache(maxsize=1)
def share_dir() -> Path:
    """Directory holding ``config/``, ``urdf/`` and ``launch/``."""
    for c in _candidates():
        if (c / "config" / "robots").is_dir() and (c / "urdf").is_dir():
            return c
    raise ConfigError("cannot find magma_ros data (config/, urdf/); set MAGMA_ROS_SHARE to the package share dir")


def data_path(*parts: str) -> Path:
    """Path of a file under the package data, e.g. ``data_path('urdf', 'fr3.urdf')``."""
    return share_dir().joinpath(*parts)
