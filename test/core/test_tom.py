"""Trace-of-Mark: placement, the never-raising trace parser, and Set-of-Mark drawing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magma_ros.core.som import draw_boxes_with_marks, draw_marks, draw_tom, draw_traces
from magma_ros.core.tom import (
    TraceResult,
    feature_marks,
    format_traces,
    from_grid,
    grid_marks,
    marks_text,
    parse_traces,
    to_grid,
    trace_speed,
)

# Answer format of MAGMA_FACTS §2.2, as the model writes it (grid cells on 256x256).
WELL_FORMED = (
    "Mark 2 at [120,85], Mark 5 at [140,90] should be moved, and their future positions are:\n\n"
    '"Mark 2": "[[122,86],[125,88],[129,91]]"\n\n'
    '"Mark 5": "[[141,92],[143,95],[146,99]]"\n\n'
)


def test_well_formed_answer_in_pixels():
    w, h = 640, 480
    r = parse_traces(WELL_FORMED, w, h)
    assert r.ok and r.errors == []
    assert sorted(r.traces) == [2, 5]
    # x = x_q / 256 * width, y = y_q / 256 * height (Magma's demo)
    np.testing.assert_allclose(r.traces[2], [[122 * 2.5, 86 * 1.875], [125 * 2.5, 88 * 1.875],
                                             [129 * 2.5, 91 * 1.875]])
    np.testing.assert_allclose(r.starts[5], [140 * 2.5, 90 * 1.875])
    ids, arr = r.padded()
    assert ids == [2, 5] and arr.shape == (2, 3, 2)


def test_prompt_echo_and_trace_tokens_are_tolerated():
    text = ("system You are agent... The image is split into 256x256 grids and is labeled with numeric marks "
            "[1, 2, 3].\nThe robot is doing: pick. ... steps?\nassistant\n\n<trace_start>" + WELL_FORMED
            + "<trace_end>")
    r = parse_traces(text, 256, 256)
    assert r.ok and sorted(r.traces) == [2, 5]
    np.testing.assert_allclose(r.traces[5][-1], [146, 99])


def test_truncated_output_keeps_complete_points_and_says_why():
    text = WELL_FORMED[: WELL_FORMED.index("[146")] + "[14"
    r = parse_traces(text, 256, 256)
    assert not r.ok
    assert len(r.traces[2]) == 3 and len(r.traces[5]) == 2
    assert "Mark 5: trace truncated after 2 points" in r.reason


def test_mixed_good_and_bad_entries():
    text = ("Mark 1 at [10,10] should be moved, and their future positions are:\n\n"
            '"Mark 1": "[[12,12],[300,14],[16,16]]"\n\n'
            '"Mark 3": "banana"\n\n'
            '"Mark 1": "[[1,1]]"\n\n'
            '"Mark 4": "[[0.50,0.25],[0.75,0.25]]"\n\n')
    r = parse_traces(text, 512, 512)
    assert len(r.traces[1]) == 2  # the out-of-grid point is dropped
    assert 3 not in r.traces
    np.testing.assert_allclose(r.traces[4], [[256, 128], [384, 128]])  # normalized-float variant
    joined = r.reason
    assert "Mark 1: 1 points outside" in joined and "Mark 3: expected a list" in joined
    assert "Mark 1: duplicate" in joined


@pytest.mark.parametrize("text,why", [
    ("", "empty output"),
    ("the the the the", "no traces found"),
    (None, "expected text"),
    (12345, "expected text"),
    ("should be moved, and their future positions are:\n\nnothing", "no '\"Mark k\""),
    ('"Mark 1": "[[', "no complete [x,y] point"),
    ("\x00\xff" * 50, "no traces found"),
])
def test_garbage_never_raises(text, why):
    r = parse_traces(text, 100, 100)
    assert isinstance(r, TraceResult) and not r.ok and r.traces == {}
    assert why in r.reason


def test_bad_image_size_is_reported_not_raised():
    r = parse_traces(WELL_FORMED, 0, float("nan"))
    assert r.traces == {} and "bad image size" in r.reason


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('Mark 0123456789[],:"\n abc.-')), max_size=300))
def test_parser_never_raises_on_random_text(text):
    r = parse_traces(text, 320, 240)
    for tr in r.traces.values():
        assert tr.ndim == 2 and tr.shape[1] == 2 and np.all(tr >= 0) and np.all(tr <= [320, 240])


def test_format_then_parse_round_trips_within_one_cell():
    w, h = 640, 480
    starts = {1: np.array([100.0, 200.0]), 7: np.array([400.0, 50.0])}
    traces = {1: np.array([[110.0, 210.0], [120.0, 220.0]]), 7: np.array([[410.0, 60.0]])}
    r = parse_traces(format_traces(starts, traces, w, h), w, h)
    assert r.ok
    for k in traces:
        assert np.all(np.abs(r.traces[k] - traces[k]) <= [w / 256, h / 256])
        assert np.all(np.abs(r.starts[k] - starts[k]) <= [w / 256, h / 256])


def test_grid_coordinates_truncate_like_magma():
    cells = to_grid([[639.9, 479.9], [0, 0], [320, 240]], 640, 480)
    assert cells.tolist() == [[255, 255], [0, 0], [128, 128]]
    np.testing.assert_allclose(from_grid([[128, 128]], 640, 480), [[320, 240]])
    assert marks_text([[320, 240], [0, 0]], 640, 480) == "Mark 1 at [128,128], Mark 2 at [0,0]"
    assert trace_speed([[0, 0], [3, 4], [6, 8]]) == pytest.approx(5.0)


def test_grid_marks_cover_the_image():
    m = grid_marks(640, 480, 9)
    assert m.shape == (9, 2)
    assert len({tuple(p) for p in m}) == 9
    assert np.all((m[:, 0] > 0) & (m[:, 0] < 640) & (m[:, 1] > 0) & (m[:, 1] < 480))
    with pytest.raises(ValueError):
        grid_marks(640, 480, 0)


def test_feature_marks_find_corners_and_keep_apart():
    img = np.zeros((120, 160, 3), np.uint8)
    img[30:60, 40:80] = 255  # one bright rectangle: 4 corners at (40,30) (79,30) (40,59) (79,59)
    m = feature_marks(img, 4, min_distance=10)
    corners = np.array([[40, 30], [79, 30], [40, 59], [79, 59]], float)
    for c in corners:
        assert np.min(np.linalg.norm(m - c, axis=1)) <= 3, f"no mark near corner {c}: {m}"
    big = np.zeros((960, 1280, 3), np.uint8)  # large frames are searched at <= 320 px, scaled back
    big[300:600, 400:800] = 255
    m = feature_marks(big, 4, min_distance=40)
    for c in corners * 10:
        assert np.min(np.linalg.norm(m - c, axis=1)) <= 12, f"no mark near corner {c}: {m}"
    flat = feature_marks(np.zeros((50, 50, 3), np.uint8), 5)  # no texture: grid fallback
    assert flat.shape == (5, 2)


def test_som_drawing_puts_red_marks_and_traces_where_asked():
    img = np.zeros((200, 300, 3), np.uint8)
    out = draw_marks(img, [[50, 60], [250, 150]])
    assert out.shape == img.shape and out.dtype == np.uint8 and img.max() == 0  # input untouched
    near = out[55:66, 45:56].reshape(-1, 3)
    assert (near == [255, 0, 0]).all(axis=1).any()  # red disc
    assert (near.min(axis=1) > 200).any()  # white (anti-aliased) digit on it
    assert (out[:20, :20] == 0).all()  # far from any mark
    tr = draw_traces(img, {1: [[10, 100], [290, 100]]})
    assert (tr[100, 20:280] != 0).any(axis=1).all()  # a horizontal line across
    both = draw_tom(img, [[10, 100]], {1: [[290, 100]]}, starts={1: [10, 100]})
    assert (both[100, 150] != 0).any()
    boxes = draw_boxes_with_marks(img, [[100, 50, 200, 150]])
    assert (boxes[100, 100] == [255, 0, 0]).all() and (boxes[100, 150] == 0).all()
    with pytest.raises(ValueError, match="uint8"):
        draw_marks(img.astype(np.float32), [[1, 1]])
