"""Several nodes of the graph in one process, on one executor (ROS 2 manual composition).

    python -m magma_ros.nodes.compose sim safety servo policy --ros-args -p robot:=fr3 -p use_sim_time:=true

The positional arguments name the nodes, built in that order (``sim``, ``safety``, ``servo``,
``policy``, ``camera``); everything after ``--ros-args`` is shared by all of them, as in any ROS 2
process: a ``-p name:=value`` reaches every node that declares ``name`` (the nodes' parameter names
agree where they overlap: ``robot``, ``controller``, ``step_period``, ``use_sim_time``) and a
node-specific remap is written ``-r policy:from:=to``. Do not rename the process's nodes with
``__node`` (that would give them all one name).

What it saves against one process per node (measured in docs/performance.md): a Python executor
loop per process, the per-process ``/clock`` subscriptions (one shared TimeSource drives every
node's clock), and Fast DDS delivers between the nodes inside one participant. What it costs: the
nodes share one interpreter lock, and one crash takes all of them down. ``launch/sim.launch.yaml``
runs it with ``compose:=true`` (off by default).
"""

from __future__ import annotations

import importlib
import sys

from magma_ros.core.errors import ConfigError
from magma_ros.nodes._common import run_nodes

# node name -> (module, factory): the same factories the single-node entry points run
FACTORIES = {"sim": ("magma_ros.nodes.sim", "_make_node"), "safety": ("magma_ros.nodes.safety", "SafetyNode"),
             "servo": ("magma_ros.nodes.servo", "make_node"), "policy": ("magma_ros.nodes.policy", "make_node"),
             "camera": ("magma_ros.nodes.camera", "_make_node")}


SWITCH_INTERVAL = 0.001  # [s] sys.setswitchinterval for the composed process (Python's default: 0.005)


def parse_names(argv: list[str]) -> list[str]:
    """The node names before ``--ros-args`` (comma or space separated); ConfigError if unknown/duplicate."""
    if "--ros-args" in argv:
        argv = argv[: argv.index("--ros-args")]
    names = [n for a in argv for n in a.replace(",", " ").split()]
    if not names:
        raise ConfigError(f"compose: name the nodes to run, e.g. 'sim safety servo policy' (of {', '.join(FACTORIES)})")
    for n in names:
        if n not in FACTORIES:
            raise ConfigError(f"compose: unknown node '{n}' (known: {', '.join(FACTORIES)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"compose: a node is named twice in {names}")
    return names


def factory(name: str):
    """The zero-argument node factory of ``name``."""
    module, attr = FACTORIES[name]
    return getattr(importlib.import_module(module), attr)


def main(args=None) -> int:
    """Entry point: ``python -m magma_ros.nodes.compose NODE [NODE ...] [--ros-args ...]``."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        names = parse_names(argv)
    except ConfigError as e:
        print(f"[magma_ros] error: {e}", file=sys.stderr)
        return 2
    ros_args = None if args is None else ["compose", *argv]
    # one interpreter lock for the physics thread, the renderer, inference and every callback: hand it
    # over every 1 ms instead of 5 ms so a callback waiting for it is not held up by a busy thread
    sys.setswitchinterval(SWITCH_INTERVAL)
    # one executor thread per node: each node's callbacks stay mutually exclusive (its default group)
    return run_nodes([factory(n) for n in names], args=ros_args, threads=max(2, len(names)), share_clock=True)


if __name__ == "__main__":
    raise SystemExit(main())
