"""The magma-ros command line: JSON out, one-line errors with exit status 2, subcommand dispatch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from magma_ros.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "ckpt"
    assert main(["make-tiny-checkpoint", str(d), "--seed", "2"]) == 0  # dispatches to model.checkpoint
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    return d


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "frame.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(p)
    return p


def test_predict_subprocess_prints_json(ckpt, image_file, tmp_path):
    overlay = tmp_path / "tom.png"
    proc = subprocess.run(
        [sys.executable, "-m", "magma_ros.cli", "predict", "--model", str(ckpt), "--image", str(image_file),
         "--task", "put the spoon on the towel", "--constrained", "--tom", "--marks", "4",
         "--max-new-tokens", "8", "--overlay", str(overlay)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert out["valid"] is True and len(out["action"]) == 7 and len(out["tokens"]) == 7
    assert all(127744 <= t < 128000 for t in out["tokens"])
    assert out["action"][6] in (0.0, 1.0) and out["step_period"] == 0.2 and out["stats"] == "bridge_orig"
    assert set(out["tom"]) >= {"traces", "starts", "errors", "text"}
    assert out["tom"]["width"] == 160 and out["tom"]["height"] == 120
    assert Image.open(overlay).size == (160, 120)


def test_ask_in_process(ckpt, image_file, capsys):
    assert main(["ask", "--model", str(ckpt), "--image", str(image_file), str(image_file),
                 "--question", "What changed?", "--max-new-tokens", "3", "--engine", "plain"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["answer"], str)


@pytest.mark.parametrize("args,msg", [
    (["--stats", "brige_orig"], "did you mean 'bridge_orig'"),
    (["--engine", "fastest"], "unknown engine"),
    (["--dtype", "fp8"], "unknown dtype"),
])
def test_user_mistakes_are_one_line_errors(ckpt, image_file, capsys, args, msg):
    rc = main(["predict", "--model", str(ckpt), "--image", str(image_file), "--task", "x"] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) >= 1 and err[-1].startswith("error: ") and msg in err[-1]


def test_missing_files_are_one_line_errors(ckpt, image_file, tmp_path, capsys):
    assert main(["predict", "--model", str(ckpt), "--image", str(tmp_path / "no.png"), "--task", "x"]) == 2
    assert "image not found" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["ask", "--model", str(ckpt), "--image", str(bad), "--question", "?"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    nockpt = str(tmp_path / "nockpt")
    assert main(["predict", "--model", nockpt, "--image", str(image_file), "--task", "x"]) == 2
    assert "neither a local directory nor a hub id" in capsys.readouterr().err


def test_passthrough_subcommands(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nockpt"), "--port", "0"]) == 2
    assert "error:" in capsys.readouterr().out
    assert main(["launch", str(tmp_path / "missing.launch.yaml")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
