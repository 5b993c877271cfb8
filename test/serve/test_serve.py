"""Wire format safety, and the policy server + RemotePolicy end to end with the tiny checkpoint."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magma_ros.serve import BasePolicy
from magma_ros.serve.client import PolicyTimeout, RemotePolicy, RemotePolicyError
from magma_ros.serve.server import PolicyServer, ServerConfig
from magma_ros.serve.wire import WireError, WireLimits, frame, packb, recv_frame, unpackb

# --------------------------------------------------------------------------- wire


def test_round_trip_keeps_arrays_scalars_and_structure():
    rng = np.random.default_rng(0)
    msg = {
        "image": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
        "f32": rng.standard_normal(7).astype(np.float32),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float64),
        "scalar": np.float32(1.5),
        "nested": [{"x": np.int64(3)}, "text", 1, 2.5, None, b"raw"],
        "tuple": (1, 2),
    }
    out = unpackb(packb(msg))
    for k in ("image", "f32", "bool", "empty"):
        assert out[k].dtype == msg[k].dtype and out[k].shape == msg[k].shape
        np.testing.assert_array_equal(out[k], msg[k])
    np.testing.assert_array_equal(out["big_endian"], msg["big_endian"])
    assert out["big_endian"].dtype.isnative
    assert out["scalar"] == np.float32(1.5) and out["scalar"].dtype == np.float32
    assert out["nested"][0]["x"] == 3 and out["nested"][1:] == ["text", 1, 2.5, None, b"raw"]
    assert out["tuple"] == [1, 2]
    out["image"][0, 0, 0] = 1  # decoded arrays are writable copies


def test_unsafe_objects_are_never_sent():
    with pytest.raises(WireError, match="dtype object"):
        packb({"a": np.array([object()], dtype=object)})
    with pytest.raises(WireError, match="type"):
        packb({"a": object()})


def _arr(dtype, shape, data):
    d = {"__ndarray__": True, "dtype": dtype, "shape": shape, "data": data}
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("payload,msg", [
    (_arr("|O", [1], b"\0" * 8), "not allowed"),
    (_arr("<U4", [1], b"\0" * 16), "not allowed"),
    (_arr("<f4", [2, 2], b"\0" * 12), "needs 16 bytes"),
    (_arr("<f4", [2**40, 2**40], b""), "exceeds"),
    (_arr("<f4", [-1], b""), "bad array shape"),
    (_arr("<f4", [1], "text"), "bytes"),
    (b"\xc1", "malformed"),
    (msgpack.packb({"a": 1})[:-1], "malformed"),
])
def test_malformed_payloads_raise_wire_error(payload, msg):
    with pytest.raises(WireError, match=msg):
        unpackb(payload)


def test_size_caps():
    small = WireLimits(max_frame_bytes=1000, max_array_bytes=100)
    with pytest.raises(WireError, match="exceeds"):
        unpackb(packb({"a": np.zeros(200, np.uint8)}), small)
    with pytest.raises(WireError, match="exceeds"):
        unpackb(b"\0" * 2000, small)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_wire_error(data):
    try:
        unpackb(data)
    except WireError:
        pass


# --------------------------------------------------------------------------- server + client


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    from magma_ros.model.policy import MagmaPolicy

    return MagmaPolicy(str(tiny_checkpoint), device="cpu", constrained=True)


@pytest.fixture(scope="module")
def server(policy):
    srv = PolicyServer(policy, ServerConfig(port=0, limits=WireLimits(max_frame_bytes=8 << 20)))
    srv.start_in_thread()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)


def _raw_connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    meta = unpackb(recv_frame(s))
    assert meta["type"] == "metadata"
    return s


def _raw_request(s, payload: bytes):
    s.sendall(frame(payload))
    return unpackb(recv_frame(s))


def test_remote_matches_local(policy, server, image):
    obs = {"image": image, "instruction": "put the spoon on the towel"}
    local = policy.infer(obs)
    with RemotePolicy("127.0.0.1", server.port, timeout=60) as remote:
        assert isinstance(remote, BasePolicy)
        assert remote.step_period == pytest.approx(0.2)
        assert remote.metadata["stats"] == "bridge_orig" and remote.metadata["protocol"] == 1
        r = remote.infer(obs)
        assert r["valid"] and r["tokens"] == local["tokens"]
        assert r["action"].dtype == np.float32
        np.testing.assert_array_equal(r["action"], local["action"])
        with pytest.raises(ValueError, match="HxWx3"):  # checked before sending
            remote.infer({"image": image[..., 0], "instruction": "x"})
        assert remote.ping() < 5


def test_concurrent_clients_share_the_server(policy, server, image):
    obs = [{"image": image, "instruction": "pick coke can", "robot_id": "left"},
           {"image": image[::-1].copy(), "instruction": "open the drawer", "robot_id": "right"}]
    want = [policy.infer(o)["tokens"] for o in obs]
    got = [None, None]

    def run(i):
        with RemotePolicy("127.0.0.1", server.port, timeout=60) as c:
            got[i] = c.infer(obs[i])["tokens"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    with RemotePolicy("127.0.0.1", server.port, timeout=60) as c:
        assert [r["tokens"] for r in c.infer_batch(obs)] == want
        c.reset("left")  # per-arm gripper state on the server
        c.reset()
        with pytest.raises(RemotePolicyError, match="robot_id"):
            c.reset(3)


def test_malformed_requests_get_error_replies_and_the_server_lives_on(server, image):
    s = _raw_connect(server.port)
    try:
        r = _raw_request(s, b"\xc1\xff garbage")
        assert r["ok"] is False and "malformed" in r["error"]
        r = _raw_request(s, packb({"id": 7, "type": "infer", "obs": {"image": np.zeros((4, 4), np.uint8)}}))
        assert r["id"] == 7 and r["ok"] is False and "missing 'instruction'" in r["error"]
        r = _raw_request(s, packb({"id": 8, "type": "infer", "obs": {"image": image[..., :2].copy(),
                                                                    "instruction": "x"}}))
        assert r["ok"] is False and "HxWx3" in r["error"]
        r = _raw_request(s, packb({"id": 9, "type": "explode"}))
        assert r["ok"] is False and "unknown request type" in r["error"]
        r = _raw_request(s, packb([1, 2, 3]))
        assert r["ok"] is False
        evil = {"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}
        req = {"id": 10, "type": "infer", "obs": {"image": evil, "instruction": "x"}}
        r = _raw_request(s, msgpack.packb(req))
        assert r["ok"] is False and "not allowed" in r["error"]
        assert _raw_request(s, packb({"id": 11, "type": "ping"}))["result"] == "pong"
        # a frame over the cap: error reply, then this connection is closed
        s.sendall(struct.pack(">I", 100 << 20))
        r = unpackb(recv_frame(s))
        assert r["ok"] is False and "exceeds" in r["error"]
        assert s.recv(1) == b""
    finally:
        s.close()
    with RemotePolicy("127.0.0.1", server.port, timeout=30) as c:  # others are unaffected
        assert c.ping() < 5


class SlowPolicy:
    """A policy whose inference takes as long as the instruction says (timeout tests)."""

    def infer(self, obs):
        time.sleep(float(obs["instruction"]))
        return {"action": np.zeros(7, np.float32), "tokens": [], "latency_s": 0.0, "valid": False,
                "reason": "slow"}


def test_client_timeout_disconnect_and_reconnect(image):
    srv = PolicyServer(SlowPolicy(), ServerConfig(port=0))
    port = srv.start_in_thread()
    try:
        c = RemotePolicy("127.0.0.1", port, timeout=0.3)
        with pytest.raises(PolicyTimeout, match="no reply within 0.3 s"):
            c.infer({"image": image, "instruction": "1.0"})
        c.timeout = 10
        assert c.infer({"image": image, "instruction": "0"})["reason"] == "slow"  # reconnected
    finally:
        srv.stop()
    with pytest.raises(RemotePolicyError, match="connection lost|cannot connect"):
        c.infer({"image": image, "instruction": "0"})
    with pytest.raises(RemotePolicyError, match="cannot connect"):
        RemotePolicy("127.0.0.1", port, timeout=1).infer({"image": image, "instruction": "0"})


def test_server_flags_reach_the_policy(tiny_checkpoint, capsys):
    """`magma-ros serve` passes its decoding flags to MagmaPolicy: a bad one is a one-line error, exit 2."""
    from magma_ros.serve.server import main

    assert main(["--model", str(tiny_checkpoint), "--device", "cpu", "--temperature", "-0.5"]) == 2
    assert "error: temperature must be >= 0" in capsys.readouterr().out
    assert main(["--model", str(tiny_checkpoint), "--device", "cpu", "--temperature", "0.7",
                 "--top-k", "-3"]) == 2
    assert "error: top_k must be >= 0" in capsys.readouterr().out
