"""diagnostic_array: the one place the nodes build their diagnostics message."""

import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

from magma_ros.nodes._common import diagnostic_array


def test_one_status_with_name_message_hardware_id_and_string_values_in_order():
    arr = diagnostic_array(12.25, "magma_ros: servo", 1, "joint states stale",
                           {"joint_states": "no", "applied": 3, "step_period_s": 0.2, "empty": ""},
                           hardware_id="panda")
    assert isinstance(arr, DiagnosticArray)
    assert (arr.header.stamp.sec, arr.header.stamp.nanosec) == (12, 250_000_000)
    assert len(arr.status) == 1
    st = arr.status[0]
    assert (st.name, st.message, st.hardware_id) == ("magma_ros: servo", "joint states stale", "panda")
    assert st.level == DiagnosticStatus.WARN
    assert [(kv.key, kv.value) for kv in st.values] == [
        ("joint_states", "no"), ("applied", "3"), ("step_period_s", "0.2"), ("empty", "")]


@pytest.mark.parametrize("level, expected", [(0, DiagnosticStatus.OK), (1, DiagnosticStatus.WARN),
                                             (2, DiagnosticStatus.ERROR), (3, DiagnosticStatus.STALE),
                                             (DiagnosticStatus.WARN, DiagnosticStatus.WARN),
                                             (DiagnosticStatus.ERROR, DiagnosticStatus.ERROR)])
def test_level_from_int_or_from_the_message_constant(level, expected):
    assert diagnostic_array(0.0, "x", level, "").status[0].level == expected


@pytest.mark.parametrize("level", [-1, 4, 255, b"", b"\x00\x01", True, 1.0, "1"])
def test_a_level_outside_ok_warn_error_stale_is_refused(level):
    with pytest.raises(ValueError, match="level"):
        diagnostic_array(0.0, "x", level, "")


def test_stamp_from_a_time_message_is_kept_and_values_default_to_none():
    arr = diagnostic_array(Time(sec=7, nanosec=5), "camera", 2, "no device")
    assert (arr.header.stamp.sec, arr.header.stamp.nanosec) == (7, 5)
    st = arr.status[0]
    assert (st.level, st.hardware_id, list(st.values)) == (DiagnosticStatus.ERROR, "", [])
    # a float stamp is rounded to the nanosecond, nanosec always in [0, 1e9)
    arr = diagnostic_array(3.9999999999, "sim", 0, "")
    assert (arr.header.stamp.sec, arr.header.stamp.nanosec) == (4, 0)
