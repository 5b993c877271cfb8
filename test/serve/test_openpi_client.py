"""Physical Intelligence's own client, `openpi-client` from PyPI (unmodified, its own venv: numpy < 2),
gets Magma actions from `magma-ros serve`, and is refused without the right token."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import aux_python

from magma_ros.serve.server import PolicyServer, ServerConfig

TOKEN = "openpi-test-token"
CLIENT = r"""
import json, sys
import numpy as np
import websockets
from openpi_client import websocket_client_policy as wcp

port, token = int(sys.argv[1]), sys.argv[2]
out = {"numpy": np.__version__}
for name, key in (("missing", None), ("wrong", "not-the-token")):
    try:
        wcp.WebsocketClientPolicy("127.0.0.1", port, api_key=key)
        out[name] = "accepted"
    except websockets.exceptions.ConnectionClosed as e:
        out[name] = e.rcvd.code
client = wcp.WebsocketClientPolicy("127.0.0.1", port, api_key=token)
meta = client.get_server_metadata()
out["meta"] = {k: meta[k] for k in ("server", "protocol", "stats", "step_period", "action_dim")}
img = (np.arange(96 * 128 * 3) % 251).astype(np.uint8).reshape(96, 128, 3)
r = client.infer({"observation/image": img, "prompt": "put the spoon on the towel"})
out["actions"] = {"shape": list(r["actions"].shape), "dtype": str(r["actions"].dtype),
                  "values": r["actions"].tolist()}
out["tokens"], out["valid"] = [int(t) for t in r["tokens"]], bool(r["valid"])
try:
    client.infer({"image": img[..., :2], "prompt": "x"})
    out["bad"] = "accepted"
except RuntimeError as e:
    out["bad"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def openpi_python():
    return aux_python("openpi")


def test_openpi_client_gets_magma_actions(openpi_python, tiny_checkpoint, tmp_path):
    from magma_ros.model.policy import MagmaPolicy

    magma = MagmaPolicy(str(tiny_checkpoint), device="cpu", constrained=True)
    img = (np.arange(96 * 128 * 3) % 251).astype(np.uint8).reshape(96, 128, 3)
    local = magma.infer({"image": img, "instruction": "put the spoon on the towel"})
    srv = PolicyServer(magma, ServerConfig(port=0, token=TOKEN))
    port = srv.start_in_thread()
    script = tmp_path / "openpi_client_run.py"
    script.write_text(CLIENT)
    try:
        p = subprocess.run([openpi_python, str(script), str(port), TOKEN], capture_output=True, text=True,
                           timeout=300, env={"PATH": "/usr/bin:/bin", "NO_PROXY": "*"})
    finally:
        srv.stop()
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["numpy"].startswith("1.")  # really the other venv
    assert out["missing"] == 1008 and out["wrong"] == 1008
    assert out["meta"] == {"server": "magma_ros", "protocol": 2, "stats": "bridge_orig", "step_period": 0.2,
                           "action_dim": 7}
    assert out["valid"] and out["tokens"] == local["tokens"]
    assert out["actions"]["shape"] == [1, 7] and out["actions"]["dtype"] == "float32"
    np.testing.assert_allclose(out["actions"]["values"][0], local["action"], rtol=0, atol=1e-7)
    assert "Error in inference server" in out["bad"] and "HxWx3" in out["bad"]
    assert "Traceback" not in out["bad"]
