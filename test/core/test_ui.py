"""UI navigation: candidate boxes with OpenCV, boxes from JSON, and the never-raising answer parser."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from magma_ros.core.errors import ConfigError
from magma_ros.core.ui import UiAnswerFormat, detect_candidates, draw_choice, load_boxes, parse_ui_answer

W, H = 640, 400
BOXES = np.array([[40, 30, 200, 80], [260, 30, 420, 80], [460, 300, 600, 360]], float)


def screenshot() -> np.ndarray:
    """A flat UI: three buttons (filled, outlined) with a word of 'text' (small dark bars) in each."""
    img = Image.new("RGB", (W, H), (245, 245, 245))
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in BOXES:
        d.rounded_rectangle([x0, y0, x1, y1], radius=6, fill=(60, 120, 220), outline=(30, 60, 140), width=2)
        for k in range(5):  # letters
            lx = x0 + 20 + 18 * k
            d.rectangle([lx, y0 + 18, lx + 10, y1 - 18], fill=(255, 255, 255))
    return np.asarray(img)


def _iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_opencv_candidates_cover_every_button():
    found = detect_candidates(screenshot())
    assert 3 <= len(found) <= 20
    for b in BOXES:
        assert max(_iou(b, f) for f in found) > 0.7, (b, found)
    # reading order: top row before the bottom button
    tops = [max(range(len(found)), key=lambda i: _iou(b, found[i])) for b in BOXES]
    assert tops[0] < tops[1] < tops[2]
    with pytest.raises(ValueError):
        detect_candidates(np.zeros((10, 10), np.uint8))


def test_boxes_from_json_pixels_normalised_and_errors(tmp_path):
    assert np.allclose(load_boxes("[[10, 20, 30, 40]]", W, H), [[10, 20, 30, 40]])
    assert np.allclose(load_boxes('{"boxes": [{"bbox": [0.5, 0.5, 0.25, 0.25]}]}', W, H), [[160, 100, 320, 200]])
    f = tmp_path / "b.json"
    f.write_text("[[1, 2, 3, 4], [5, 6, 7, 8]]")
    assert load_boxes(str(f), W, H).shape == (2, 4)
    for bad, msg in (("[[1, 2, 3]]", "4 finite numbers"), ("[]", "non-empty"), ("{oops", "not JSON"),
                     (str(tmp_path / "missing.json"), "not found")):
        with pytest.raises(ConfigError, match=msg):
            load_boxes(bad, W, H)


def test_well_formed_answers_each_of_the_demos_fallbacks():
    # 1. Mark: N -> that mark's box (0-based labels, as the demo draws them)
    r = parse_ui_answer("(0.19, 0.14) Mark: 1", BOXES, W, H)
    assert (r["action"], r["mark"], r["source"]) == ("click", 1, "mark")
    assert r["box"] == [260, 30, 420, 80] and r["point"] == [340, 55] and r["reason"] == ""
    # 1-based convention (a parameter: UNVERIFIED which one Magma-8B uses)
    r = parse_ui_answer("Mark: 1", BOXES, W, H, UiAnswerFormat(mark_base=1))
    assert r["box"] == [40, 30, 200, 80]
    # 2. <box>(x0,y0),(x1,y1)</box> on 0..1000 -> its centre
    r = parse_ui_answer("Click <box>(100,200),(300,400)</box>", BOXES, W, H)
    assert r["source"] == "box" and r["point"] == [128.0, 120.0] and r["box"] == [64.0, 80.0, 192.0, 160.0]
    # 3. a normalised point, or four floats = a box's centre
    assert parse_ui_answer("(0.5, 0.25)", BOXES, W, H)["point"] == [320.0, 100.0]
    assert parse_ui_answer("[0.1, 0.2, 0.3, 0.4]", BOXES, W, H)["point"] == [128.0, 120.0]
    # a mark the screen does not have: the coordinates in the answer are used, with a note
    r = parse_ui_answer("(0.5, 0.5) Mark: 9", BOXES, W, H)
    assert r["source"] == "point" and r["point"] == [320.0, 200.0] and "mark 9 is not one of the 3" in r["reason"]


def test_type_and_scroll_actions():
    r = parse_ui_answer('Type "magma robot" into the search box. Mark: 0', BOXES, W, H)
    assert (r["action"], r["text"], r["mark"]) == ("type", "magma robot", 0)
    r = parse_ui_answer("Scroll down at (0.5, 0.9)", BOXES, W, H)
    assert (r["action"], r["direction"]) == ("scroll", "down")


@pytest.mark.parametrize("answer,why", [
    ("", "empty answer"),
    ("the the the the", "no mark, box or point"),
    ("<box>(120,340),(2", "without a complete <box>"),
    ("Mark: 17", "mark 17 is not one of the 3"),
    ("(1.5, 3.2)", "not a normalised point"),
    (None, "expected text"),
    (b"\xff\xfe", "no mark, box or point"),
])
def test_truncated_and_garbage_answers_give_no_action_and_a_reason(answer, why):
    r = parse_ui_answer(answer, BOXES, W, H)
    assert r["action"] is None and why in r["reason"]
    assert set(r) >= {"action", "mark", "box", "point", "source", "reason"}


def test_parser_never_raises_on_bad_boxes_or_sizes():
    r = parse_ui_answer("Mark: 0", [[1, 2]], W, H)  # boxes of the wrong shape
    assert r["action"] is None and r["reason"]
    r = parse_ui_answer("Mark: 0", None, W, H)
    assert r["action"] is None and "not one of the 0 marks" in r["reason"]


def test_bad_answer_patterns_are_config_errors():
    with pytest.raises(ConfigError):
        UiAnswerFormat(mark_pattern="Mark: (")


def test_choice_overlay_draws_box_and_point():
    img = screenshot()
    out = draw_choice(img, {"box": [40, 30, 200, 80], "point": [120, 55]})
    assert out.shape == img.shape and (out != img).any()
    assert tuple(out[30, 120]) == (0, 200, 0)  # the box outline, top edge
