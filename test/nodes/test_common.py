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
