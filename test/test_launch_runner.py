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

from magma_ros.core.errors import ConfigError

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
    """)
    p = plan(f, {"robot": "wx250s"}, exec_map=TALKER)
    procs = {s.label: s for s in p.processes}
    assert list(procs) == ["a", "c", "inner_wx250s", "d"]  # b is off (2.5 > 1)
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
# launch_yaml / launch_ros rules. Expected outcomes and messages are those of the real launch system
# (ros2/launch 3.7.1 + launch_ros 0.28 from source, run on these same snippets with a test package in
# an ament prefix), not of this runner.
# ---------------------------------------------------------------------------------------------

_REJECTED = [
    # set_parameter's value is read as a string (get_attr's default data_type=str)
    ("- set_parameter: {name: use_sim_time, value: true}",
     r"Attribute 'value' of Entity 'set_parameter' expected to be of type '<class 'str'>', got '<class 'bool'>'"),
    ("- set_parameter: {name: rate, value: 3}", r"expected to be of type '<class 'str'>', got '<class 'int'>'"),
    # set_parameter values are YAML-parsed; lists must be non-empty and of one item type; null is no value
    ("- set_parameter: {name: l, value: \"[1, 2.5]\"}", r"non-empty sequence, with items of uniform type.*\"l\""),
    ("- set_parameter: {name: l, value: \"null\"}", r"Got <class 'NoneType'> for \"l\""),
    # node param values: a scalar, or a list whose items share one type (bool is no int here, int no float)
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: [1, 2.5]}]}",
     r"Attribute 'value' of Entity 'param' expected to be of type 'None', got '<class 'list'>'"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: [true, 1]}]}",
     r"Attribute 'value' of Entity 'param' expected to be of type 'None', got '<class 'list'>'"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: [1, \"a\"]}]}", r"non-uniform list"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: [1, true]}]}", r"non-uniform list"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: {a: 1}}]}",
     r"expected to be of type 'None', got '<class 'dict'>'"),
    ("- arg: {name: x, default: \"1\"}\n- arg: {name: y, default: a}\n"
     "- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: [\"$(var x)\", \"$(var y)\"]}]}",
     r"output list is not uniform"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: 1, type: list_of_int}]}",
     r"expected to be of type 'typing.List\[int\]', got '<class 'int'>'"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: \"5\", type: int}]}",
     r"value='5' is not an instance of <class 'int'>"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: 1, type: integer}]}",
     r"invalid type identifier 'integer'"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p, value: }]}",
     r"expected to be of type 'None', got '<class 'NoneType'>'"),
    ("- node: {pkg: magma_ros_test, exec: talker, param: [{name: p}]}",
     r"either a value attribute or nested params are needed"),
    # respawn_delay / sigterm_timeout / sigkill_timeout: data_type=float, then compared with 0.0
    ("- node: {pkg: magma_ros_test, exec: talker, respawn: \"true\", respawn_delay: \"2.0\"}",
     r"'<' not supported between instances of 'str' and 'float'"),
    ("- node: {pkg: magma_ros_test, exec: talker, respawn: \"true\", respawn_delay: 2}",
     r"Attribute 'respawn_delay' of Entity 'node' expected to be of type '<class 'float'>', got '<class 'int'>'"),
    ("- node: {pkg: magma_ros_test, exec: talker, respawn_delay: -1.0}",
     r"Attribute respawn_delay of Entity node expected to be a non-negative value but got `-1.0`"),
    ("- executable: {cmd: \"true\", sigterm_timeout: \"1.0\"}", r"'<' not supported between instances of 'str'"),
    ("- executable: {cmd: \"true\", shell: 1}", r"expected to be of type '<class 'bool'>'"),
]


@pytest.mark.parametrize("text, match", _REJECTED, ids=[f"rejected{i}" for i in range(len(_REJECTED))])
def test_what_ros2_launch_rejects_is_rejected(tmp_path, text, match):
    from magma_ros.core.errors import ConfigError
    from magma_ros.launch_runner import plan

    f = write(tmp_path, "bad.launch.yaml", "launch:\n" + text + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        plan(f, exec_map=TALKER)
    assert "\n" not in str(e.value)


def test_parameters_are_typed_as_launch_ros_types_them(tmp_path):
    from magma_ros.launch_runner import plan

    f = write(tmp_path, "typed.launch.yaml", """
        launch:
        - arg: {name: x, default: "1"}
        - set_parameter: {name: use_sim_time, value: "true"}
        - set_parameter: {name: rate, value: "10"}
        - set_parameter: {name: label, value: fr3}
        - set_parameter: {name: empty, value: ""}
        - node:
            pkg: magma_ros_test
            exec: talker
            name: n1
            respawn: "true"
            respawn_delay: 2.0
            respawn_max_retries: 3
            sigterm_timeout: 1.5
            param:
            - {name: p_plain, value: "true"}
            - {name: p_int, value: 5}
            - {name: l_str, value: [a, b]}
            - {name: l_sub_int, value: ["$(var x)", 2]}
            - {name: l_bool, value: [true, false]}
            - {name: l_empty, value: []}
            - {name: s_sub, value: $(var x)}
            - {name: s_sub_list, value: "[$(var x), 2]"}
            - {name: s_empty, value: ""}
            - {name: t_str, value: $(var x), type: str}
            - {name: t_float, value: $(var x), type: float}
            - {name: t_bool, value: $(var x), type: bool}
    """)
    (spec,) = plan(f, exec_map=TALKER).processes
    # set_parameter: always YAML-parsed ("true" is a bool under ros2 launch)
    assert spec.parameters["use_sim_time"] is True and spec.parameters["rate"] == 10
    assert spec.parameters["label"] == "fr3" and spec.parameters["empty"] == ""
    assert "use_sim_time:=true" in spec.cmd and "rate:=10" in spec.cmd
    # node params: a plain string stays a string, substitutions are YAML-parsed, `type` coerces
    want = {"p_plain": "true", "p_int": 5, "l_str": ["a", "b"], "l_sub_int": [1, 2], "l_bool": [True, False],
            "l_empty": [], "s_sub": 1, "s_sub_list": [1, 2], "s_empty": "", "t_str": "1", "t_float": 1.0,
            "t_bool": True}
    got = {k: spec.parameters[k] for k in want}
    assert got == want and type(got["t_float"]) is float and type(got["s_sub"]) is int
    assert "p_plain:='true'" in spec.cmd and "t_str:='1'" in spec.cmd  # strings on the command line
    assert (spec.respawn, spec.respawn_delay, spec.respawn_max_retries, spec.sigterm_timeout) == (True, 2.0, 3, 1.5)


def test_respawn_max_retries_bounds_the_respawns(tmp_path):
    from magma_ros.launch_runner import LaunchRunner

    f = write(tmp_path, "respawn.launch.yaml", """
        launch:
        - executable: {cmd: "false", name: flaky, respawn: "true", respawn_delay: 0.0, respawn_max_retries: 2}
    """)
    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        runner = LaunchRunner(f, log_dir=tmp_path / "logs", stream=stream)
        runner.start()
        try:
            assert runner.wait(timeout=60) == 1  # `false` exits 1: started once, respawned twice, then done
        finally:
            runner.stop()
    assert out.read_text().count("process started with pid") == 3


def test_a_node_of_a_missing_package_fails_as_ros2_launch_does(tmp_path):
    """real.launch.yaml camera:=realsense2_camera without realsense2_camera: ros2 launch fails with
    ament_index's "package 'realsense2_camera' not found, searching: [...]" and starts nothing."""
    from magma_ros.core.errors import ConfigError
    from magma_ros.launch_runner import plan

    other = _ament_prefix(tmp_path / "other", "some_pkg", {})
    env = dict(os.environ, AMENT_PREFIX_PATH=str(other))
    args = {"robot": "fr3", "camera": "realsense2_camera", "model": "/m"}
    with pytest.raises(ConfigError) as e:
        plan("real.launch.yaml", args, env=env)
    assert str(e.value) == f"package 'realsense2_camera' not found, searching: ['{other}']"
    # installed, but without that executable
    rs = _ament_prefix(tmp_path / "rs", "realsense2_camera", {})
    env["AMENT_PREFIX_PATH"] = f"{rs}{os.pathsep}{other}"
    with pytest.raises(ConfigError, match=r"executable 'realsense2_camera_node' not found on the libexec "
                                          rf"directory '{rs}/lib/realsense2_camera'"):
        plan("real.launch.yaml", args, env=env)
    # installed: the node runs from <prefix>/lib/<pkg>/<exec>, in the camera namespace, with its profile
    _ament_prefix(rs, "realsense2_camera", {"realsense2_camera_node": "true"})
    cam = {s.label: s for s in plan("real.launch.yaml", args, env=env).processes}["camera"]
    assert cam.cmd[0] == str(rs / "lib" / "realsense2_camera" / "realsense2_camera_node")
    assert cam.namespace == "/camera" and cam.parameters["rgb_camera.color_profile"] == "640x480x30"
    # a substitution naming a missing package says the same
    f = write(tmp_path, "share.launch.yaml", "launch:\n- let: {name: x, value: \"$(find-pkg-share nope)\"}\n")
    with pytest.raises(ConfigError, match=r"^package 'nope' not found, searching: \["):
        plan(f, env=env)


def test_cli_fails_on_a_missing_package_and_starts_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), AMENT_PREFIX_PATH=str(_ament_prefix(tmp_path / "p", "x", {})))
    r = subprocess.run([sys.executable, "-m", "magma_ros.launch_runner", "real.launch.yaml", "robot:=fr3",
                        "camera:=realsense2_camera", "--log-dir", str(tmp_path / "logs")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"[magma_ros] error: package 'realsense2_camera' not found, searching: " \
                               f"['{tmp_path / 'p'}']"
    assert "process started" not in r.stdout


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
                if k in attrs:
                    assert isinstance(attrs[k], str), (kind, k, attrs[k])
            for k in ("respawn_delay", "sigterm_timeout", "sigkill_timeout"):
                if k in attrs:
                    assert type(attrs[k]) is float, (kind, k, attrs[k])
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
    # the gamepad driver (package joy) is not installed here: as under ros2 launch, that is an error ...
    with pytest.raises(ConfigError, match="package 'joy' not found"):
        plan("collect.launch.yaml", {"robot": "fr3"})
    # ... and driver:=false (your own joy publisher, or `magma-ros collect`'s scripted one) starts the rest
    p = plan("collect.launch.yaml", {"robot": "fr3", "driver": "false"})
    assert {"safety", "sim", "teleop", "recorder"} <= {s.label for s in p.processes}


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
            # the node's name reaches the graph by discovery, which may come after its first message
            assert rclpy_node.spin_until(lambda: ("talker_a", "/ns1") in rclpy_node.get_node_names_and_namespaces(),
                                         timeout=15), rclpy_node.get_node_names_and_namespaces()
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
        - executable: {{cmd: "{stubborn}", name: stubborn, sigterm_timeout: 1.0}}
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
    # the CLI has no exec_map: install the test talker as a foreign package in an ament index prefix
    prefix = _ament_prefix(tmp_path / "prefix", "magma_ros_test", {"talker": f"{sys.executable} {HERE} talker"})
    env = dict(ros_env, AMENT_PREFIX_PATH=str(prefix), PYTHONPATH=str(REPO))
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


def _ament_prefix(prefix: Path, pkg: str, execs: dict[str, str]) -> Path:
    """An install prefix as colcon leaves it: the ament index marker and ``lib/<pkg>/<exec>`` scripts."""
    (prefix / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True, exist_ok=True)
    (prefix / "share" / "ament_index" / "resource_index" / "packages" / pkg).write_text("")
    (prefix / "share" / pkg).mkdir(exist_ok=True)
    (prefix / "lib" / pkg).mkdir(parents=True, exist_ok=True)
    for name, cmd in execs.items():
        exe = prefix / "lib" / pkg / name
        exe.write_text(f"#!/bin/sh\nexec {cmd} \"$@\"\n")
        exe.chmod(0o755)
    return prefix


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
