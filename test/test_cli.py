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


# --------------------------------------------------------------------------- ask --video, ui
CHAT_HEAD = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are agent that can see, talk and act."
             "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
CHAT_TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
IMG = "<image_start><image><image_end>\n"


def test_ask_prompt_is_magmas_multi_image_prompt(ckpt, image_file, capsys):
    assert main(["ask", "--model", str(ckpt), "--image", str(image_file), str(image_file),
                 "--question", "What changed?", "--max-new-tokens", "2", "--engine", "plain"]) == 0
    out = json.loads(capsys.readouterr().out)
    # MAGMA_FACTS §4 (one <image> per frame at the start of the user turn) + §3.1 (" Answer the question briefly.")
    assert out["prompt"] == CHAT_HEAD + IMG * 2 + "What changed? Answer the question briefly." + CHAT_TAIL


def _write_video(path, n=12):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=6)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for k in range(n):
            img = np.full((64, 96, 3), 20 * k, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def test_ask_video_samples_frames_uniformly(ckpt, tmp_path, capsys):
    v = tmp_path / "clip.mp4"
    _write_video(v)
    assert main(["ask", "--model", str(ckpt), "--video", str(v), "--frames", "4", "--question", "What happened?",
                 "--max-new-tokens", "2", "--engine", "plain"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == [0, 3, 7, 11] and len(out["times_s"]) == 4
    assert out["prompt"] == CHAT_HEAD + IMG * 4 + "What happened? Answer the question briefly." + CHAT_TAIL
    assert isinstance(out["answer"], str)
    assert main(["ask", "--model", str(ckpt), "--video", str(tmp_path / "none.mp4"), "--question", "?"]) == 2
    assert "video not found" in capsys.readouterr().err
    assert main(["ask", "--model", str(ckpt), "--video", str(v), "--frames", "20", "--question", "?"]) == 2
    assert "--frames must be 1..8" in capsys.readouterr().err


@pytest.fixture(scope="module")
def screenshot_file(tmp_path_factory):
    from PIL import ImageDraw

    img = Image.new("RGB", (320, 200), (250, 250, 250))
    d = ImageDraw.Draw(img)
    for x0, y0 in ((20, 20), (170, 20), (20, 120)):
        d.rectangle([x0, y0, x0 + 120, y0 + 40], fill=(40, 90, 200))
        for k in range(4):
            d.rectangle([x0 + 15 + 22 * k, y0 + 12, x0 + 27 + 22 * k, y0 + 28], fill=(255, 255, 255))
    p = tmp_path_factory.mktemp("ui") / "shot.png"
    img.save(p)
    return p


def test_ui_end_to_end_on_the_tiny_checkpoint(ckpt, screenshot_file, tmp_path, capsys):
    over = tmp_path / "ui.png"
    assert main(["ui", "--model", str(ckpt), "--screenshot", str(screenshot_file), "--task", "click the search button",
                 "--overlay", str(over), "--max-new-tokens", "4", "--engine", "plain"]) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object
    assert out["prompt"] == (CHAT_HEAD + IMG + 'In this view I need to click a button to "click the search button"? '
                             "Provide the coordinates and the mark index of the containing bounding box if "
                             "applicable." + CHAT_TAIL)
    assert out["marks"] >= 3 and out["boxes_source"] == "opencv" and isinstance(out["raw"], str)
    # random weights answer garbage: no action, and why (never a traceback)
    if out["action"] is None:
        assert out["reason"]
    else:
        assert out["point"] is not None
    assert Image.open(over).size == (320, 200)


def test_ui_with_json_boxes(ckpt, screenshot_file, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[20, 20, 140, 60], [170, 20, 290, 60]]))
    assert main(["ui", "--model", str(ckpt), "--screenshot", str(screenshot_file), "--task", "open settings",
                 "--boxes", str(boxes), "--max-new-tokens", "2", "--engine", "plain", "--mark-base", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["marks"] == 2 and out["boxes_source"] == "json"
    assert main(["ui", "--model", str(ckpt), "--screenshot", str(screenshot_file), "--task", "x",
                 "--boxes", "[[1, 2]]"]) == 2
    assert "boxes[0]" in capsys.readouterr().err
