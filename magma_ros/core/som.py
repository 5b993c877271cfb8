"""Set-of-Mark drawing with PIL: numbered marks, ToM traces and labelled boxes (numpy in, numpy out).

Styles follow Magma's code (MAGMA_FACTS §2.6, §3.2): ToM marks are red filled circles with the
white mark number, sized from the image width; UI marks are red box outlines with 0-based labels
on a red filled rectangle. Points are image pixels ``(x, y)``, origin top-left. Inputs are
HxWx3 uint8 RGB arrays; outputs are new arrays (the input is not modified).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RED = (255, 0, 0)
WHITE = (255, 255, 255)
# distinct colours for traces (tab10)
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _as_image(image) -> Image.Image:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {a.shape} dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


@lru_cache(maxsize=64)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


@lru_cache(maxsize=64)
def _font_for(min_text_dim: float, text: str):
    """Smallest font whose rendering of ``text`` has min(w, h) >= ``min_text_dim`` (Magma's rule)."""
    for size in range(6, 200):
        f = _font(size)
        x0, y0, x1, y1 = f.getbbox(text)
        if min(x1 - x0, y1 - y0) >= min_text_dim:
            return f
    return _font(200)


def _text_centered(d: ImageDraw.ImageDraw, x: float, y: float, text: str, font, fill) -> None:
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
    d.text((x - (x0 + x1) / 2, y - (y0 + y1) / 2), text, fill=fill, font=font)


def draw_marks(image, points, labels=None, color=RED, text_color=WHITE, scale: float = 0.03) -> np.ndarray:
    """Red filled circles with white numbers at ``points`` (N, 2) pixel ``(x, y)``; labels 1..N default.

    The font grows until the smaller side of "55" is ``scale * width`` (Magma's ``som_prompting``);
    the circle diameter is the label's larger side + 2.
    """
    img = _as_image(image)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = [str(i + 1) for i in range(len(pts))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(labels)} labels")
    font = _font_for(max(3.0, scale * img.width), "55")
    d = ImageDraw.Draw(img)
    for (x, y), lab in zip(pts, labels):
        if not np.isfinite([x, y]).all():
            continue
        x0, y0, x1, y1 = d.textbbox((0, 0), lab, font=font)
        r = (max(x1 - x0, y1 - y0) + 2) / 2
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)
        _text_centered(d, x, y, lab, font, text_color)
    return np.asarray(img)


def draw_traces(image, traces, starts=None, width: int = 2, colors=PALETTE) -> np.ndarray:
    """Polylines for ToM traces: ``traces`` {id: (T, 2)} (or a list), optional ``starts`` {id: (2,)}.

    Each trace starts at its start point when given, gets its own colour and ends in a dot.
    """
    img = _as_image(image)
    d = ImageDraw.Draw(img)
    items = traces.items() if isinstance(traces, dict) else enumerate(traces)
    for i, (k, tr) in enumerate(items):
        pts = np.asarray(tr, dtype=np.float64).reshape(-1, 2)
        if starts is not None and k in starts:
            pts = np.vstack([np.asarray(starts[k], dtype=np.float64).reshape(1, 2), pts])
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) == 0:
            continue
        c = tuple(colors[i % len(colors)])
        if len(pts) > 1:
            d.line([tuple(p) for p in pts], fill=c, width=width, joint="curve")
        x, y = pts[-1]
        r = width + 1
        d.ellipse([x - r, y - r, x + r, y + r], fill=c)
    return np.asarray(img)


def draw_tom(image, marks, traces=None, starts=None, labels=None) -> np.ndarray:
    """ToM overlay: traces first, then numbered marks on top (marks at ``starts`` when given)."""
    out = np.asarray(image)
    if traces:
        out = draw_traces(out, traces, starts)
    return draw_marks(out, marks, labels)


def draw_boxes_with_marks(image, boxes, labels=None, color=RED, text_color=WHITE) -> np.ndarray:
    """UI Set-of-Mark as Magma's ``plot_boxes_with_marks``: boxes (N, 4) ``[x0, y0, x1, y1]`` px, red
    outline width 2, labels (0..N-1 by default) in white on a red rectangle at the corner of the box
    that overlaps the other boxes and the labels already placed least (MAGMA_FACTS §3.2)."""
    img = _as_image(image)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b = np.column_stack([b[:, [0, 2]].min(1), b[:, [1, 3]].min(1), b[:, [0, 2]].max(1), b[:, [1, 3]].max(1)])
    labels = [str(i) for i in range(len(b))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(b):
        raise ValueError(f"{len(b)} boxes but {len(labels)} labels")
    font = _font_for(max(3.0, min(30.0, 0.04 * min(img.width, img.height))), "555")
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in b:
        d.rectangle([x0, y0, x1, y1], outline=color, width=2)
    placed: list[np.ndarray] = []
    for i, ((x0, y0, x1, y1), lab) in enumerate(zip(b, labels)):
        tx0, ty0, tx1, ty1 = d.textbbox((0, 0), lab, font=font)
        w, h = tx1 - tx0 + 4, ty1 - ty0 + 4
        others = np.delete(b, i, axis=0)
        best, best_cost = None, np.inf
        for cx, cy in ((x0, y0 - h), (x1 - w, y0 - h), (x0, y1), (x1 - w, y1), (x0, y0)):
            r = np.array([cx, cy, cx + w, cy + h])
            off = max(0, -r[0]) + max(0, -r[1]) + max(0, r[2] - img.width) + max(0, r[3] - img.height)
            cost = _overlap(r, others) + 3 * _overlap(r, placed) + 50 * off * h
            if cost < best_cost - 1e-9:
                best, best_cost = r, cost
        placed.append(best)
        d.rectangle(list(best), fill=color)
        _text_centered(d, (best[0] + best[2]) / 2, (best[1] + best[3]) / 2, lab, font, text_color)
    return np.asarray(img)


def _overlap(r: np.ndarray, others) -> float:
    """Total area [px^2] of rectangle r (4,) covered by rectangles ``others`` (N, 4)."""
    if not len(others):
        return 0.0
    o = np.asarray(others)
    w = np.clip(np.minimum(r[2], o[:, 2]) - np.maximum(r[0], o[:, 0]), 0, None)
    h = np.clip(np.minimum(r[3], o[:, 3]) - np.maximum(r[1], o[:, 1]), 0, None)
    return float((w * h).sum())
