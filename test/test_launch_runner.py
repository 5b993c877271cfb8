"""The YAML launch runner: schema, substitutions, and real rclpy processes over DDS.

Small test nodes live at the bottom of this file (``python test_launch_runner.py talker``) so the
runner can be exercised before / independently of the package's own nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
TALKER = {"magma_ros_test/talker": [sys.executable, str(HERE), "talker"]}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---------------------------------------------------------------------------------------------
# Substitutions and schema (no processes)
# ---------------------------------------------------------------------------------------------

def test_substitutions_conditions_and_scoping(tmp_path, monkeypatch):
    from magma_ros.launch_runner import plan

    monkeypatch.setenv("MAGMA_TEST_GREETING", "hello from env")
    write(tmp_path, "inner.launch.yaml", """
        launch:
        - arg: {name: who, default: nobody}
        - let: {name: leaked, value: "from-inner"}
        - node: {pkg: magma_ros_test, exec: talker, name: "inner_$(var who)"}
    """)
    f = write(tmp_path, "outer.launch.yaml", """
        launch:
        - arg: {name: robot, default: fr3, choice: [{value: fr3}, {value: panda}, {value: wx250s}]}
        - arg: {name: camera, default: external}
        - arg: {name: rate, default: "2.5"}
        - let: {name: greeting, value: "$(env MAGMA_TEST_GREETING)"}
        - node:
            pkg: magma_ros_test
            exec: talker
            name: a
            if: $(eval '"$(var camera)" == "external"')
            param:
            - {name: robot, value: $(var robot)}
            - {name: rate, value: $(var rate)}
            - {name: greeting, value: $(var greeting)}
            - {name: literal, value: "2.5"}
            - {name: flag, value: true}
            - {name: nested, param: [{name: depth, value: 3}]}
        - node: {pkg: magma_ros_test, exec: talker, name: b, unless: "$(eval '$(var rate) > 1')"}
        - group:
            scoped: true
            children:
            - push_ros_namespace: {namespace: arm1}
            - let: {name: robot, value: panda}
            - node: {pkg: magma_ros_test, exec: talker, name: c, param: [{name: robot, value: $(var robot)}]}
        - include:
            file: $(dirname)/inner.launch.yaml
            arg: [{name: who, value: "$(var robot)"}]
        - node: {pkg: magma_ros_test, exec: talker, name: d, param: [{name: leaked, value: $(var leaked)}]}
        - node: {pkg: realsense2_camera, exec: realsense2_camera_node, name: camera}
    """)
    p = plan(f, {"robot": "wx250s"}, exec_map=TALKER)
    procs = {s.label: s for s in p.processes}
    assert list(procs) == ["a", "c", "inner_wx250s", "d"]  # b is off (2.5 > 1), camera skipped
    a = procs["a"].parameters
    # substituted strings are YAML-typed (launch_ros semantics), literal strings stay strings
    assert a["robot"] == "wx250s" and a["rate"] == 2.5 and a["literal"] == "2.5" and a["flag"] is True
    assert a["greeting"] == "hello from env" and a["nested.depth"] == 3
    cmd_a = procs["a"].cmd
    assert cmd_a[:3] == TALKER["magma_ros_test/talker"] and "--ros-args" in cmd_a
    assert "literal:='2.5'" in cmd_a and "rate:=2.5" in cmd_a and "__node:=a" in cmd_a
    # the scoped group pushed a namespace and its `let` did not leak out
    assert procs["c"].namespace == "/arm1" and procs["c"].parameters["robot"] == "panda"
    assert "__ns:=/arm1" in procs["c"].cmd and procs["a"].namespace is None
    # include sets its args in the including scope (not scoped, as in ros2 launch)
    assert procs["d"].parameters["leaked"] == "from-inner"
    assert any("realsense2_camera_node" in s and "not found" in s for s in p.skipped)
    assert p.arguments["robot"] == "wx250s" and p.arguments["rate"] == "2.5"


@pytest.mark.parametrize("text, args, match", [
    ("- arg: {name: robot, default: fr3, choice: [{value: fr3}, {value: panda}]}", {"robot": "fr4"},
     r"invalid value 'fr4' for launch argument 'robot' \(did you mean 'fr3'\?\); valid: fr3, panda"),
    ("- arg: {name: robot, default: fr3}", {"robto": "panda"}, r"'robto' \(did you mean 'robot'\?\)"),
    ("- arg: {name: model}", {}, r"launch argument 'model' is required"),
    ("- arg: {name: rate, default: 2.5}", {}, r"'default' must be a string"),
    ("- node: {pkg: magma_ros_test, exec: talker, nmae: x}", {}, r"unexpected key 'nmae' in 'node'"),
    ("- nod: {pkg: magma_ros_test, exec: talker}", {}, r"unknown launch entity .* 'nod' \(did you mean 'node'"),
    ("- let: {name: x, value: \"$(eval '__import__(\\\"os\\\").getcwd()')\"}", {}, r"only literals"),
    ("- let: {name: x, value: \"$(command 'rm -rf /tmp/x')\"}", {}, r"\$\(command\) .* not supported"),
    ("- let: {name: x, value: \"$(var nope)\"}", {}, r"launch configuration 'nope' does not exist"),
    ("- node: {pkg: magma_ros, exec: magma_ros_no_such_node}", {}, r"unknown executable of package magma_ros"),
    ("- include: {file: /no/such/file.launch.yaml}", {}, r"launch file not found: /no/such/file.launch.yaml"),
    ("- node: {pkg: magma_ros_test, exec: talker, if: \"maybe\"}", {}, r"expected true/false/1/0, got 'maybe'"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, text, args, match):
    from magma_ros.core.errors import ConfigError
    from magma_ros.launch_runner import plan

    f = write(tmp_path, "bad.launch.yaml", "launch:\n" + text + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        plan(f, args, exec_map=TALKER)
    assert "\n" not in str(e.value)


def test_cli_errors_and_show_args(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = [sys.executable, "-m", "magma_ros.launch_runner"]
    r = subprocess.run(run + ["sim.launch.yaml", "robot:=ur5"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'ur5'" in r.stderr and "fr3, panda, wx250s" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(run + ["simm.launch.yaml"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "did you mean 'sim.launch.yaml'" in r.stderr
    r = subprocess.run(run + ["sim.launch.yaml", "--show-args"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("robot", "policy", "model", "controller", "namespace", "instruction", "use_sim_time"):
        assert f"  {name}:" in r.stdout


# ---------------------------------------------------------------------------------------------
# The package's launch files
# ---------------------------------------------------------------------------------------------

def _launch_files():
    return sorted((REPO / "launch").glob("*.launch.yaml"))


@pytest.mark.parametrize("path", _launch_files(), ids=lambda p: p.name)
def test_launch_files_follow_launch_yaml_schema(path):
    """Every entity is a one-key mapping and attribute types are what launch_yaml accepts."""
    from magma_ros.launch_runner import _SCHEMA

    tree = yaml.safe_load(path.read_text())
    assert list(tree) == ["launch"]

    def walk(items):
        for it in items:
            assert isinstance(it, dict) and len(it) == 1
            (kind, attrs), = it.items()
            assert kind in _SCHEMA, kind
            assert set(attrs) <= _SCHEMA[kind] | {"if", "unless"}, (kind, attrs)
            for k in ("name", "default", "description", "value", "if", "unless", "exec", "pkg", "namespace",
                      "file", "output"):
                if k in attrs and not (kind == "set_parameter" and k == "value"):
                    assert isinstance(attrs[k], str), (kind, k, attrs[k])
            if kind == "group":
                walk(attrs["children"])

    walk(tree["launch"])


@pytest.mark.parametrize("robot", ["fr3", "panda", "wx250s"])
def test_sim_launch_plans_the_closed_loop(robot):
    from magma_ros.core.robot import load_robot
    from magma_ros.launch_runner import plan

    p = plan("sim.launch.yaml", {"robot": robot, "policy": "scripted", "namespace": "arm1",
                                 "controller": "forward"})
    procs = {s.label: s for s in p.processes}
    assert set(procs) == {"sim", "safety", "servo", "policy"}
    for s in procs.values():
        assert s.cmd[1:3] == ["-m", f"magma_ros.nodes.{s.label}"]
        assert s.namespace == "/arm1" and s.parameters["robot"] == robot
        assert s.parameters["use_sim_time"] is True
    assert procs["safety"].parameters["controller"] == "forward"
    assert procs["sim"].parameters["controller"] == "forward"
    assert procs["policy"].parameters["policy"] == "scripted"
    # the servo applies each twist for exactly the policy's step period
    assert procs["servo"].parameters["step_period"] == procs["policy"].parameters["step_period"]
    load_robot(robot)  # the robot the plan names exists


def test_real_and_collect_launch_plan():
    from magma_ros.launch_runner import plan

    p = plan("real.launch.yaml", {"robot": "panda", "camera": "pyrealsense", "model": "/models/magma"})
    labels = [s.label for s in p.processes]
    assert "camera" in labels and "safety" in labels and "policy" in labels and "sim" not in labels
    for s in p.processes:
        assert s.parameters.get("use_sim_time") is False
    assert {s.label: s for s in p.processes}["policy"].parameters["model"] == "/models/magma"
    p = plan("real.launch.yaml", {"robot": "panda", "camera": "external"})
    assert "camera" not in [s.label for s in p.processes]
    p = plan("collect.launch.yaml", {"robot": "fr3"})
    assert {"safety", "sim"} <= {s.label for s in p.processes}


# ---------------------------------------------------------------------------------------------
# Real processes over DDS
# ---------------------------------------------------------------------------------------------

def _wait(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_runner_starts_real_nodes_with_params_remaps_namespace(ros_env, rclpy_node, tmp_path):
    from std_msgs.msg import String

    from magma_ros.launch_runner import LaunchRunner

    f = write(tmp_path, "t.launch.yaml", """
        launch:
        - arg: {name: greeting, default: hi}
        - arg: {name: namespace, default: ""}
        - group:
            children:
            - push_ros_namespace: {namespace: $(var namespace)}
            - set_remap: {from: chatter, to: chat_remapped}
            - node:
                pkg: magma_ros_test
                exec: talker
                name: talker_a
                output: screen
                param: [{name: greeting, value: $(var greeting)}, {name: use_sim_time, value: false}]
    """)
    got = []
    rclpy_node.create_subscription(String, "/ns1/chat_remapped", lambda m: got.append(m.data), 10)
    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        runner = LaunchRunner(f, {"greeting": "bonjour", "namespace": "ns1"}, env=ros_env, exec_map=TALKER,
                              log_dir=tmp_path / "logs", stream=stream)
        with runner:
            assert rclpy_node.spin_until(lambda: got, timeout=30), runner.log_text("talker_a")
            names = rclpy_node.get_node_names_and_namespaces()
            assert ("talker_a", "/ns1") in names
            proc = runner.processes["talker_a"]
            assert proc.poll() is None
        assert proc.poll() is not None  # stopped on exit of the with block (SIGINT: clean exit)
        assert proc.returncode == 0, runner.log_text("talker_a")
    assert got[0].startswith("talker_a|/ns1|bonjour")
    text = out.read_text()
    assert "[talker_a] talker up" in text  # output: screen is prefixed with the process name
    assert "talker up" in (tmp_path / "logs" / "talker_a.log").read_text()


def test_required_exit_and_signal_escalation(ros_env, tmp_path):
    from magma_ros.launch_runner import LaunchRunner

    stubborn = f"{sys.executable} {HERE} stubborn"
    f = write(tmp_path, "t.launch.yaml", f"""
        launch:
        - node: {{pkg: magma_ros_test, exec: talker, name: quitter, on_exit: shutdown,
                 param: [{{name: exit_after, value: 1.5}}, {{name: exit_code, value: 3}}]}}
        - node: {{pkg: magma_ros_test, exec: talker, name: bystander}}
        - executable: {{cmd: "{stubborn}", name: stubborn, sigterm_timeout: "1.0"}}
    """)
    runner = LaunchRunner(f, env=ros_env, exec_map=TALKER, log_dir=tmp_path / "logs", echo=False)
    runner.start()
    try:
        rc = runner.wait(timeout=60)
        assert rc == 3, (rc, runner.exit_codes)
        procs = runner.processes
        assert all(p.poll() is not None for p in procs.values())
        assert procs["bystander"].returncode == 0  # SIGINT -> clean rclpy shutdown
        assert procs["stubborn"].returncode == -signal.SIGTERM  # ignored SIGINT, escalated
    finally:
        runner.stop()


def test_cli_sigterm_stops_every_child(ros_env, tmp_path):
    f = write(tmp_path, "t.launch.yaml", """
        launch:
        - node: {pkg: magma_ros_test, exec: talker, name: one, output: screen}
        - node: {pkg: magma_ros_test, exec: talker, name: two, output: screen}
    """)
    # the CLI has no exec_map: put the test talker on PATH as a foreign package's executable
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "talker"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE} talker \"$@\"\n")
    exe.chmod(0o755)
    env = dict(ros_env, PATH=f"{bindir}{os.pathsep}{ros_env['PATH']}", PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "magma_ros.launch_runner", str(f), "--log-dir",
                          str(tmp_path / "logs")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        pids = []
        lines = []
        end = time.monotonic() + 60
        while time.monotonic() < end and (len(pids) < 2 or sum("talker up" in x for x in lines) < 2):
            line = p.stdout.readline()
            lines.append(line)
            if "process started with pid" in line:
                pids.append(int(line.split("[")[2].split("]")[0]))
        assert len(pids) == 2 and sum("talker up" in x for x in lines) == 2, "".join(lines)
        assert any(x.startswith("[one] ") for x in lines) and any(x.startswith("[two] ") for x in lines)
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=30)
        assert p.returncode == 0, rest
        for pid in pids:
            assert _wait(lambda pid=pid: not _alive(pid), 5), f"child {pid} still alive"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Test nodes (run as separate processes)
# ---------------------------------------------------------------------------------------------

def _talker() -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from std_msgs.msg import String

    rclpy.init()
    node = Node("talker")
    greeting = node.declare_parameter("greeting", "hello").value
    exit_after = float(node.declare_parameter("exit_after", 0.0).value)
    exit_code = int(node.declare_parameter("exit_code", 0).value)
    pub = node.create_publisher(String, "chatter", 10)
    t0 = time.monotonic()
    sim = node.get_parameter("use_sim_time").value

    def tick():
        pub.publish(String(data=f"{node.get_name()}|{node.get_namespace()}|{greeting}|{sim}"))

    node.create_timer(0.1, tick)
    print("talker up", flush=True)
    try:
        while rclpy.ok():
            rclpy.spin_once(node, timeout_sec=0.1)
            if exit_after and time.monotonic() - t0 > exit_after:
                return exit_code
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _stubborn() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ignoring SIGINT", flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit({"talker": _talker, "stubborn": _stubborn}[sys.argv[1]]())
