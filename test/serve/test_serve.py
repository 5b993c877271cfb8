"""The policy server and `RemotePolicy` end to end over real WebSockets.

Transport tests serve a real scripted `BasePolicy` (`ProbePolicy`: its answer depends on the
observation, so cross-talk between clients would show); the model test serves the tiny checkpoint.
"""

from __future__ import annotations

import socket
import threading
import time

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from magma_ros.core.errors import ConfigError
from magma_ros.core.policy_api import BasePolicy
from magma_ros.serve.auth import load_token
from magma_ros.serve.client import AuthError, PolicyTimeout, RemotePolicy, RemotePolicyError
from magma_ros.serve.server import PolicyServer, ServerConfig
from magma_ros.serve.wire import WireLimits, packb, unpackb

TOKEN = "test-token-0123456789"


class ProbePolicy:
    """A real policy: action[0] = the image's mean / 255, action[1] = len(instruction), action[6] = the
    gripper it holds for the observation's robot_id (set by an instruction ``grip <x>``). Optional delay."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0
        self.resets: list[str] = []
        self.grip: dict[str, float] = {}
        self.lock = threading.Lock()

    def infer(self, obs: dict) -> dict:
        with self.lock:
            self.calls += 1
        if obs["instruction"] == "explode":
            raise RuntimeError("engine exploded\nTraceback (most recent call last): secret internals")
        if obs["instruction"].startswith("sleep"):
            time.sleep(float(obs["instruction"].split()[1]))
        elif self.delay:
            time.sleep(self.delay)
        rid = obs["robot_id"]
        if obs["instruction"].startswith("grip"):
            self.grip[rid] = float(obs["instruction"].split()[1])
        a = np.zeros(7, np.float32)
        a[0] = obs["image"].mean() / 255.0
        a[1] = len(obs["instruction"])
        a[6] = self.grip.get(rid, 1.0)
        return {"action": a, "tokens": [], "latency_s": 0.0, "valid": True, "reason": "", "robot_id": rid}

    def reset(self, robot_id: str) -> None:
        self.resets.append(robot_id)
        self.grip.pop(robot_id, None)

    def metadata(self) -> dict:
        return {"policy": "probe", "step_period": 0.25}


def _image(value: int = 7, h: int = 24, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _obs(value: int = 7, text: str = "go", **kw) -> dict:
    return {"image": _image(value), "instruction": text, **kw}


@pytest.fixture()
def start():
    servers = []

    def _start(policy=None, **cfg):
        cfg.setdefault("token", TOKEN)
        srv = PolicyServer(policy or ProbePolicy(), ServerConfig(port=0, **cfg))
        srv.start_in_thread()
        servers.append(srv)
        return srv

    yield _start
    for s in servers:
        s.stop()


def _client(srv, **kw) -> RemotePolicy:
    kw.setdefault("token", TOKEN)
    kw.setdefault("timeout", 20.0)
    return RemotePolicy("127.0.0.1", srv.port, **kw)


def _raw(srv, token: str | None = TOKEN, scheme: str = "Api-Key"):
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else None
    return connect(f"ws://127.0.0.1:{srv.port}", additional_headers=headers, proxy=None, open_timeout=10,
                   max_size=None, compression=None)


def _closed_code(ws, timeout: float = 20.0) -> int | None:
    """Read until the server closes; the close code."""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ws.recv(timeout=max(0.1, end - time.monotonic()))
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None
    except TimeoutError:
        return None
    return None


# --------------------------------------------------------------------------- configuration


def test_a_token_is_always_required_and_no_auth_only_on_loopback(tmp_path):
    with pytest.raises(ConfigError, match="token is required"):
        ServerConfig(port=0).check()
    with pytest.raises(ConfigError, match="only allowed on a loopback"):
        ServerConfig(host="0.0.0.0", no_auth=True).check()
    ServerConfig(host="::1", no_auth=True).check()
    with pytest.raises(ConfigError, match="both --certfile and --keyfile"):
        ServerConfig(token="x", certfile="c.pem").check()
    f = tmp_path / "tok"
    f.write_text("  file-token \n")
    assert load_token(str(f), env={}) == "file-token"
    assert load_token(None, env={"MAGMA_ROS_TOKEN": "env-token"}) == "env-token"
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_token(str(tmp_path / "missing"))
    assert "test-token" not in repr(ServerConfig(token=TOKEN))  # the secret is never logged


# --------------------------------------------------------------------------- auth


def test_auth_missing_wrong_and_right_token(start):
    pol = ProbePolicy()
    srv = start(pol)
    with pytest.raises(AuthError, match="unauthorized"):
        _client(srv, token="").infer(_obs())
    with pytest.raises(AuthError, match="unauthorized"):
        _client(srv, token="wrong-token").infer(_obs())
    with pytest.raises(AuthError):
        _client(srv, token=TOKEN[:-1]).infer(_obs())  # a prefix is not the token
    for tok, scheme in ((None, ""), ("nope", "Api-Key"), (TOKEN, "Basic")):  # the raw protocol: 1008 first
        ws = _raw(srv, tok, scheme)
        assert _closed_code(ws) == 1008
    assert pol.calls == 0 and srv.stats.rejected_auth == 6  # nothing reached the policy
    c = _client(srv)
    assert isinstance(c, BasePolicy)
    r = c.infer(_obs(51, "pick"))
    assert r["action"][0] == pytest.approx(0.2) and r["actions"].shape == (1, 7)
    assert r["actions"].dtype == np.float32 and c.step_period == 0.25
    ws = _raw(srv, TOKEN, "Bearer")  # Bearer works as well
    meta = unpackb(ws.recv(timeout=10))
    assert meta["server"] == "magma_ros" and meta["protocol"] == 2 and meta["action_dim"] == 7
    ws.send(packb(_obs(102, "x")))
    assert unpackb(ws.recv(timeout=10))["action"][0] == pytest.approx(0.4)
    ws.close()


def test_env_token_reaches_the_client(start, monkeypatch):
    srv = start()
    monkeypatch.setenv("MAGMA_ROS_TOKEN", TOKEN)
    assert RemotePolicy("127.0.0.1", srv.port).infer(_obs())["valid"]


def test_tls_wss_with_a_self_signed_certificate(start, tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    srv = start(certfile=str(certfile), keyfile=str(keyfile), handshake_timeout=1.0)
    assert srv.url.startswith("wss://")
    c = _client(srv, ca_file=str(certfile))
    assert c.infer(_obs(51))["action"][0] == pytest.approx(0.2)
    with pytest.raises(AuthError):  # TLS does not replace the token
        _client(srv, ca_file=str(certfile), token="wrong").infer(_obs())
    with pytest.raises(RemotePolicyError, match="cannot connect"):  # an untrusted certificate is refused
        _client(srv, tls=True).infer(_obs())
    with pytest.raises(RemotePolicyError):  # plain ws:// to a wss:// server
        _client(srv).infer(_obs())
    stall = socket.create_connection(("127.0.0.1", srv.port), timeout=30)  # TCP open, no TLS hello
    assert stall.recv(1) == b""  # closed after the handshake timeout
    stall.close()


# --------------------------------------------------------------------------- faults


def test_malformed_bad_observations_and_oversized_close_only_that_client(start):
    pol = ProbePolicy()
    srv = start(pol, limits=WireLimits(max_message_bytes=1 << 20, max_array_bytes=1 << 20))
    good = _client(srv)
    assert good.infer(_obs())["valid"]
    bad_inputs = [
        b"\xc1\xff garbage",  # malformed msgpack
        packb([1, 2, 3]),  # not a map
        packb(_obs() | {"image": _image()[..., :2].copy()}),  # wrong image shape
        packb(_obs() | {"image": _image().astype(np.float32)}),  # wrong dtype
        packb({"instruction": "x"}),  # no image
        msgpack.packb({"image": {b"__ndarray__": True, b"dtype": "|O", b"shape": [1], b"data": b"\0" * 8},
                       "prompt": "x"}),  # object dtype: never unpickled
        packb(_obs(robot_id="bad id with spaces")),
        "a text message",
    ]
    expect = ["malformed", "must be a map", "HxWx3", "uint8", "missing 'image'", "not allowed", "robot_id",
              "binary"]
    for payload, what in zip(bad_inputs, expect):
        ws = _raw(srv)
        ws.recv(timeout=10)  # metadata
        ws.send(payload)
        err = ws.recv(timeout=10)
        assert isinstance(err, str) and what in err and "\n" not in err and "Traceback" not in err
        assert _closed_code(ws) == 1007
    ws = _raw(srv)  # oversized: the WebSocket layer closes with 1009 before decoding
    ws.recv(timeout=10)
    ws.send(b"\0" * (2 << 20))
    assert _closed_code(ws) == 1009
    assert pol.calls == 1  # none of it reached the policy
    assert good.infer(_obs(51))["action"][0] == pytest.approx(0.2)  # the others are served throughout
    with pytest.raises(ValueError, match="HxWx3"):  # RemotePolicy checks before sending
        good.infer({"image": _image()[..., 0], "instruction": "x"})


def test_engine_errors_are_one_line_and_the_connection_lives_on(start):
    srv = start()
    c = _client(srv)
    with pytest.raises(RemotePolicyError, match="inference failed: engine exploded") as e:
        c.infer(_obs(text="explode"))
    assert "Traceback" not in str(e.value) and "secret" not in str(e.value)
    assert c.infer(_obs())["valid"] and c.state == "connected" and c.reconnects == 0


def test_slow_loris_and_silent_clients_are_closed_while_others_are_served(start):
    srv = start(handshake_timeout=1.0, idle_timeout=1.0)
    c = _client(srv)
    loris = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    loris.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    silent = _raw(srv)
    silent.recv(timeout=10)  # metadata, then nothing
    trickle = _raw(srv)
    trickle.recv(timeout=10)
    frame = packb(_obs())
    # a WebSocket frame header announcing the whole message, then one byte: the message never completes
    hdr = bytes([0x82, 0xFE]) + len(frame).to_bytes(2, "big") + b"\0\0\0\0"
    trickle.socket.sendall(hdr + frame[:1])
    for _ in range(5):  # meanwhile everyone else is served
        assert c.infer(_obs())["valid"]
    assert loris.recv(1024) == b""  # the server hung up on the unfinished handshake
    assert _closed_code(silent) == 1001
    assert _closed_code(trickle) == 1001  # idle: its message never completed
    loris.close()
    assert c.infer(_obs())["valid"]


def test_connection_cap(start):
    srv = start(max_connections=2)
    a, b = _client(srv), _client(srv)
    a.connect()
    b.connect()
    with pytest.raises(RemotePolicyError, match="1013"):
        _client(srv).infer(_obs())
    a.close()
    deadline = time.monotonic() + 20
    while srv.stats.connections > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _client(srv).infer(_obs())["valid"]


def test_late_answers_are_dropped_and_given_up_requests_never_reach_the_policy(start):
    pol = ProbePolicy()
    srv = start(pol)
    busy = _client(srv, robot_id="busy")
    t = threading.Thread(target=lambda: busy.infer(_obs(text="sleep 3")))
    t.start()
    while pol.calls == 0:
        time.sleep(0.01)
    quitter = _client(srv, timeout=0.5, robot_id="quitter")
    with pytest.raises(PolicyTimeout, match="no reply within 0.5 s"):
        quitter.infer(_obs(text="never"))  # queued behind the sleeper, then given up
    assert quitter.state == "disconnected" and quitter.timeouts == 1
    t.join(30)
    assert pol.calls == 1 and srv.stats.dropped_gone == 1  # dropped before it reached the policy
    quitter.timeout = 20.0
    r = quitter.infer(_obs(51, "fresh"))  # reconnects; gets its own answer, not the late one
    assert r["action"][1] == len("fresh") and quitter.reconnects == 1


def test_bounded_queue_answers_busy(start):
    srv = start(ProbePolicy(), max_queue=1)
    errors, done = [], []

    def run(i):
        try:
            _client(srv, robot_id=f"arm{i}").infer(_obs(text="sleep 1.5"))
            done.append(i)
        except RemotePolicyError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors and all("server busy" in e for e in errors) and done
    assert srv.stats.busy == len(errors)


def test_eight_clients_hundred_requests_each(start):
    srv = start(ProbePolicy())
    errors, counts = [], [0] * 8

    def run(i):
        try:
            with _client(srv, robot_id=f"arm{i}") as c:
                for k in range(100):
                    v = (i * 31 + k) % 256
                    r = c.infer(_obs(v, "x" * (i + 1)))
                    assert r["robot_id"] == f"arm{i}" and r["action"][1] == i + 1
                    assert r["action"][0] == pytest.approx(v / 255, abs=1e-6)  # its own image's answer
                    counts[i] += 1
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert errors == [] and counts == [100] * 8
    assert srv.stats.requests == 800 and srv.stats.errors == 0


# --------------------------------------------------------------------------- per-arm state


def test_robot_id_state_is_per_arm_and_reset_only_touches_ones_own(start):
    pol = ProbePolicy()
    srv = start(pol, max_robots=2)
    left, right = _client(srv, robot_id="/left"), _client(srv, robot_id="/right")
    assert left.infer(_obs(text="grip 0.0"))["action"][6] == 0.0
    assert right.infer(_obs(text="go"))["action"][6] == 1.0  # the left gripper is not the right's
    assert left.infer(_obs(text="go"))["action"][6] == 0.0
    right.reset()
    assert pol.resets == ["/right"]
    assert left.infer(_obs())["action"][6] == 0.0  # left untouched by right's reset
    with pytest.raises(ValueError, match="own robot_id"):
        right.reset("/left")
    ws = _raw(srv)  # one connection cannot speak for another arm
    ws.recv(timeout=10)
    ws.send(packb(_obs(robot_id="/left")))
    unpackb(ws.recv(timeout=10))
    ws.send(packb(_obs(robot_id="/right")))
    assert "differs from this connection's '/left'" in ws.recv(timeout=10)
    ws.send(packb({"type": "reset"}))
    assert unpackb(ws.recv(timeout=10)) == {"ok": True, "robot_id": "/left"}
    ws.close()
    pol.resets.clear()
    _client(srv, robot_id="/third").infer(_obs())  # a third arm: the least recently used is forgotten
    assert pol.resets == ["/right"]


def test_anonymous_connections_get_their_own_state(start):
    pol = ProbePolicy()
    srv = start(pol)
    a, b = _raw(srv), _raw(srv)
    for ws in (a, b):
        ws.recv(timeout=10)
    a.send(packb({"image": _image(), "prompt": "grip 0.0"}))
    assert unpackb(a.recv(timeout=10))["action"][6] == 0.0
    b.send(packb({"image": _image(), "prompt": "go"}))
    rb = unpackb(b.recv(timeout=10))
    assert rb["action"][6] == 1.0 and rb["robot_id"].startswith("anon-")
    a.close()
    deadline = time.monotonic() + 20
    while not pol.resets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pol.resets) == 1 and pol.resets[0].startswith("anon-")  # its state went with it
    b.close()


# --------------------------------------------------------------------------- reconnect


def test_reconnect_with_backoff_after_the_server_restarts():
    pol = ProbePolicy()
    srv = PolicyServer(pol, ServerConfig(port=0, token=TOKEN))
    port = srv.start_in_thread()
    c = RemotePolicy("127.0.0.1", port, token=TOKEN, timeout=5, backoff=0.5, max_backoff=2.0)
    assert c.infer(_obs(text="grip 0.0"))["action"][6] == 0.0  # sticky state for this arm on the server
    srv.stop()
    with pytest.raises(RemotePolicyError, match="connection (closed|lost)|cannot connect"):
        c.infer(_obs())
    if c.state != "backoff":  # the close arrived before the call: that call found the old connection
        with pytest.raises(RemotePolicyError, match="cannot connect"):
            c.infer(_obs())
    assert c.state == "backoff"
    with pytest.raises(RemotePolicyError, match="reconnecting in"):  # no hammering during the backoff
        c.infer(_obs())
    c.reset()  # a new episode while the server is away: not lost, delivered before the next observation
    assert pol.resets == []
    srv2 = PolicyServer(pol, ServerConfig(port=port, token=TOKEN))
    srv2.start_in_thread()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = c.infer(_obs())
                break
            except RemotePolicyError:
                assert time.monotonic() < deadline, c.status()
                time.sleep(0.2)
        assert pol.resets == ["default"] and r["action"][6] == 1.0  # reset first, then the observation
        st = c.status()
        assert st["state"] == "connected" and st["reconnects"] == 1 and st["failures"] >= 1
    finally:
        srv2.stop()


# --------------------------------------------------------------------------- the tiny checkpoint


@pytest.fixture(scope="module")
def magma(tiny_checkpoint):
    from magma_ros.model.policy import MagmaPolicy

    return MagmaPolicy(str(tiny_checkpoint), device="cpu", constrained=True)


def test_remote_matches_local_with_the_tiny_checkpoint(magma, start):
    img = np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    local = magma.infer({"image": img, "instruction": "put the spoon on the towel"})
    srv = start(magma, max_batch=magma.max_batch)
    c = _client(srv, timeout=120, robot_id="arm")
    assert c.metadata == {} and c.step_period == pytest.approx(0.2)
    assert c.metadata["stats"] == "bridge_orig" and c.metadata["dtype"] == "float32"
    r = c.infer({"image": img, "prompt": "put the spoon on the towel"})  # openpi's key works too
    assert r["valid"] and r["tokens"] == local["tokens"]
    np.testing.assert_array_equal(r["action"], local["action"])
    np.testing.assert_array_equal(r["actions"], local["action"][None])


def test_serve_cli_checks_auth_and_flags(tiny_checkpoint, capsys, monkeypatch):
    """`magma-ros serve`: no token -> one-line error; a bad decoding flag reaches MagmaPolicy -> error, exit 2."""
    from magma_ros.serve.server import main

    monkeypatch.delenv("MAGMA_ROS_TOKEN", raising=False)
    assert main(["--model", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert "error: a token is required" in capsys.readouterr().out
    assert main(["--model", str(tiny_checkpoint), "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "only allowed on a loopback host" in capsys.readouterr().out
    monkeypatch.setenv("MAGMA_ROS_TOKEN", TOKEN)
    assert main(["--model", str(tiny_checkpoint), "--device", "cpu", "--temperature", "-0.5"]) == 2
    assert "error: temperature must be >= 0" in capsys.readouterr().out
