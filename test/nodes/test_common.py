"""declare_config: ROS parameters parsed into a typed config dataclass in one place."""

from dataclasses import dataclass

import pytest
import rclpy
from rclpy.parameter import Parameter

from magma_ros.core.errors import ConfigError
from magma_ros.nodes._common import declare_config


@dataclass(frozen=True)
class _Cfg:
    rate: float = 10.0
    count: int = 3
    name: str = "x"
    enabled: bool = True
    gains: tuple[float, ...] = (1.0, 2.0)


def _node(ctx, overrides):
    return rclpy.create_node(
        "cfg_test", context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()]
    )


@pytest.fixture
def ctx(ros_env):
    c = rclpy.Context()
    rclpy.init(context=c)
    yield c
    rclpy.shutdown(context=c)


def test_defaults_and_int_for_float_are_accepted(ctx):
    node = _node(ctx, {"rate": 5, "gains": [3, 4, 5]})
    cfg = declare_config(node, _Cfg)
    assert cfg.rate == 5.0 and isinstance(cfg.rate, float)
    assert cfg.gains == (3.0, 4.0, 5.0) and all(isinstance(g, float) for g in cfg.gains)
    assert (cfg.count, cfg.name, cfg.enabled) == (3, "x", True)
    node.destroy_node()


def test_defaults_can_be_overridden_per_call(ctx):
    node = _node(ctx, {})
    cfg = declare_config(node, _Cfg, rate=100.0, name="fr3")
    assert (cfg.rate, cfg.name) == (100.0, "fr3")
    node.destroy_node()


@pytest.mark.parametrize(("key", "value"), [("rate", "fast"), ("count", 2.5), ("enabled", "yes")])
def test_wrong_types_are_one_line_config_errors(ctx, key, value):
    node = _node(ctx, {key: value})
    with pytest.raises(ConfigError, match=key):
        declare_config(node, _Cfg)
    node.destroy_node()


@pytest.mark.parametrize("t", [0.0, 1.5, 2.9999999999, 1795620987.1164391, 0.2, -0.25])
def test_time_and_duration_messages_round_trip_with_nanosec_in_range(t):
    from magma_ros.nodes._common import to_duration_msg, to_seconds, to_time_msg

    for msg in (to_duration_msg(t), to_time_msg(t) if t >= 0 else to_duration_msg(t)):
        assert 0 <= msg.nanosec < 1_000_000_000  # 2.9999999999 s must not give nanosec == 1e9
        assert abs(to_seconds(msg) - t) < 1e-6


def test_dds_defaults_fill_only_what_the_user_left_unset():
    """Every node process publishes synchronously and uses config/fastdds.xml (shared memory with a
    segment a 640x480 image fits in), unless the environment already chose; the profile is a Fast DDS
    participant profile whose SHM segment holds a 640x480 RGB image in one piece."""
    import xml.etree.ElementTree as ET

    from magma_ros.nodes._common import dds_defaults

    env = dds_defaults({})
    assert env["RMW_FASTRTPS_PUBLICATION_MODE"] == "SYNCHRONOUS"
    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(env["FASTDDS_DEFAULT_PROFILES_FILE"]).getroot()
    shm = [t for t in root.iterfind(".//d:transport_descriptor", ns) if t.findtext("d:type", namespaces=ns) == "SHM"]
    assert len(shm) == 1 and int(shm[0].findtext("d:segment_size", namespaces=ns)) >= 4 * 640 * 480 * 3
    part = root.find(".//d:participant", ns)
    assert part.get("is_default_profile") == "true"
    assert part.findtext("d:rtps/d:useBuiltinTransports", namespaces=ns) == "false"
    used = [e.text for e in part.iterfind("d:rtps/d:userTransports/d:transport_id", ns)]
    assert shm[0].findtext("d:transport_id", namespaces=ns) in used and len(used) == 2  # + UDPv4 (discovery)
    mine = {"RMW_FASTRTPS_PUBLICATION_MODE": "ASYNCHRONOUS", "FASTRTPS_DEFAULT_PROFILES_FILE": "/lab/dds.xml"}
    assert dds_defaults(dict(mine)) == mine  # the user's choices stay, and no second profile is added
