"""Trace-of-Mark (ToM): mark placement, prompt pieces and a never-raising trace parser (numpy only).

Coordinates (MAGMA_FACTS §2.4): Magma speaks in integer cells of a 256x256 grid laid over the
image, ``[x, y]`` with the origin at the top-left, ``x_q = int(256 x / width)``,
``y_q = int(256 y / height)``. Everything this module returns is in *image pixel* coordinates
``(x, y)`` (float, origin top-left, x to the right, y down) of the image the marks were placed on;
grid cells convert back as Magma's demo does: ``x = x_q / 256 * width``.

The model answers (§2.2)::

    Mark 2 at [120,85], Mark 5 at [140,90] should be moved, and their future positions are:

    "Mark 2": "[[122,86],[125,88],[129,91]]"

    "Mark 5": "[[141,92],[143,95],[146,99]]"

The future lists exclude the start point. :func:`parse_traces` reads that text, keeps every point
it can and records why the rest failed; it never raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

GRID_SIZE = 256  # Magma's spatial quantization (spatial_quant_size)
DEFAULT_SPEED = 8  # ToM demo defaults (Gradio): speed 8, steps 8, 10 marks
DEFAULT_STEPS = 8
DEFAULT_MARKS = 10
FUTURE_HEADER = "and their future positions are:"

# ----------------------------------------------------------------------------- coordinates


def to_grid(points, width: int, height: int, grid: int = GRID_SIZE) -> np.ndarray:
    """Pixel points (N, 2) ``(x, y)`` -> Magma grid cells (N, 2) int, truncated as Magma does."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    q = np.stack([grid * p[:, 0] / width, grid * p[:, 1] / height], axis=1)
    return np.clip(np.trunc(q), 0, grid - 1).astype(np.int64)


def from_grid(cells, width: int, height: int, grid: int = GRID_SIZE) -> np.ndarray:
    """Grid cells (..., 2) ``[x_q, y_q]`` -> pixel points (..., 2) float, ``x = x_q / grid * width``."""
    c = np.asarray(cells, dtype=np.float64)
    return np.stack([c[..., 0] / grid * width, c[..., 1] / grid * height], axis=-1)


# ----------------------------------------------------------------------------- mark placement


def grid_marks(width: int, height: int, n: int = DEFAULT_MARKS, margin: float = 0.1) -> np.ndarray:
    """``n`` marks (n, 2) pixel ``(x, y)`` on a regular grid covering the image minus ``margin``.

    Rows x cols is the most square layout with rows * cols >= n, filled row by row.
    """
    if n < 1:
        raise ValueError("need at least one mark")
    if width < 1 or height < 1:
        raise ValueError(f"bad image size {width}x{height}")
    cols = max(1, math.ceil(math.sqrt(n * width / height)))
    rows = math.ceil(n / cols)
    xs = np.linspace(margin * width, (1 - margin) * width, cols) if cols > 1 else np.array([width / 2])
    ys = np.linspace(margin * height, (1 - margin) * height, rows) if rows > 1 else np.array([height / 2])
    pts = np.array([(x, y) for y in ys for x in xs], dtype=np.float64)
    return pts[:n]


def _box_sum(a: np.ndarray, r: int) -> np.ndarray:
    """Sum over a (2r+1)^2 window, same shape as ``a`` (edges use the part inside the image)."""
    h, w = a.shape
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = a.cumsum(0).cumsum(1)
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    return ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0]


def feature_marks(image, n: int = DEFAULT_MARKS, min_distance: float | None = None,
                  window: int = 3) -> np.ndarray:
    """``n`` marks (n, 2) pixel ``(x, y)`` on strong corners (Shi-Tomasi response), spread apart.

    A numpy stand-in for Magma's CoTracker + k-means placement (which needs video): points are
    picked greedily by corner strength at least ``min_distance`` pixels apart (default: 1/12 of
    the image diagonal). Fewer corners than ``n`` (flat images) are topped up from
    :func:`grid_marks`.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    h, w = img.shape[:2]
    f = max(1, math.ceil(max(h, w) / 320))  # corners on a <= 320 px copy, scaled back: ~10x faster
    if f > 1:
        small = feature_marks(img[::f, ::f], n, None if min_distance is None else min_distance / f, window)
        return np.clip(small * f, 0, [w - 1, h - 1])
    gray = img.astype(np.float64).mean(axis=2) if img.ndim == 3 else img.astype(np.float64)
    gy, gx = np.gradient(gray)
    a = _box_sum(gx * gx, window)
    b = _box_sum(gx * gy, window)
    c = _box_sum(gy * gy, window)
    resp = (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b)  # smaller eigenvalue, (H, W)
    border = max(2, int(0.03 * min(h, w)))
    resp[:border] = resp[-border:] = 0
    resp[:, :border] = resp[:, -border:] = 0
    if min_distance is None:
        min_distance = math.hypot(w, h) / 12
    flat = resp.ravel()
    k = min(flat.size, 20 * n + 2000)
    cand = np.argpartition(-flat, k - 1)[:k]
    cand = cand[np.argsort(-flat[cand])]
    thresh = 1e-3 * max(float(flat[cand[0]]), 1e-12)
    chosen: list[tuple[float, float]] = []
    for idx in cand:
        if flat[idx] <= thresh or len(chosen) == n:
            break
        y, x = divmod(int(idx), w)
        if all((x - cx) ** 2 + (y - cy) ** 2 >= min_distance**2 for cx, cy in chosen):
            chosen.append((float(x), float(y)))
    if len(chosen) < n:
        for x, y in grid_marks(w, h, n):
            if len(chosen) == n:
                break
            if all((x - cx) ** 2 + (y - cy) ** 2 >= (min_distance / 2) ** 2 for cx, cy in chosen):
                chosen.append((float(x), float(y)))
        while len(chosen) < n:  # crowded tiny image: accept grid points regardless of spacing
            chosen.append(tuple(grid_marks(w, h, n)[len(chosen)]))
    return np.asarray(chosen, dtype=np.float64).reshape(n, 2)


def mark_ids(n: int) -> list[int]:
    """Mark ids ``[1, ..., n]`` as the ToM demo numbers them."""
    return [i + 1 for i in range(int(n))]


def marks_text(marks, width: int, height: int, ids=None) -> str:
    """Textual SoM form used in OpenX training: ``"Mark 1 at [x,y], Mark 2 at [x,y]"`` (grid cells)."""
    cells = to_grid(marks, width, height)
    ids = mark_ids(len(cells)) if ids is None else list(ids)
    return ", ".join(f"Mark {k} at [{x},{y}]" for k, (x, y) in zip(ids, cells))


def trace_speed(trace_cells) -> float:
    """Mean Euclidean step length (grid units) of one trace (T, 2); 0 for fewer than 2 points."""
    t = np.asarray(trace_cells, dtype=np.float64).reshape(-1, 2)
    if len(t) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(t, axis=0), axis=1).mean())


# ----------------------------------------------------------------------------- parsing

_NUM = r"(-?\d+(?:\.\d+)?)"
_START_RE = re.compile(r"Mark\s*(\d+)\s*at\s*\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]")
_ENTRY_RE = re.compile(r"[\"']?\s*Mark\s*(\d+)\s*[\"']?\s*:\s*")
_PAIR_RE = re.compile(r"\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]")


@dataclass
class TraceResult:
    """What :func:`parse_traces` read. All points are image pixels ``(x, y)``."""

    traces: dict[int, np.ndarray] = field(default_factory=dict)  # mark id -> (T, 2) future points
    starts: dict[int, np.ndarray] = field(default_factory=dict)  # mark id -> (2,) current point
    errors: list[str] = field(default_factory=list)  # why some (or all) of the text was not read
    width: int = 0  # image size the pixels refer to
    height: int = 0
    text: str = ""  # the model's raw answer (set by the caller, for logs)

    @property
    def ok(self) -> bool:
        """True when at least one trace was read and nothing was dropped."""
        return bool(self.traces) and not self.errors

    @property
    def reason(self) -> str:
        return "; ".join(self.errors)

    def padded(self) -> tuple[list[int], np.ndarray]:
        """(mark ids, (K, T, 2) array): traces padded with their last point, as Magma's demo does."""
        ids = sorted(self.traces)
        if not ids:
            return [], np.zeros((0, 0, 2))
        t = max(len(self.traces[k]) for k in ids)
        out = np.zeros((len(ids), t, 2))
        for i, k in enumerate(ids):
            tr = self.traces[k]
            out[i, : len(tr)] = tr
            out[i, len(tr):] = tr[-1]
        return ids, out

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"traces": {id: [[x, y], ...]}, "starts": {...}, "errors": [...]}``."""
        return {
            "traces": {str(k): np.round(v, 2).tolist() for k, v in sorted(self.traces.items())},
            "starts": {str(k): np.round(v, 2).tolist() for k, v in sorted(self.starts.items())},
            "errors": list(self.errors),
            "width": self.width,
            "height": self.height,
        }


def _cells(pairs: list[tuple[str, str]], grid: int) -> np.ndarray:
    c = np.array([[float(x), float(y)] for x, y in pairs], dtype=np.float64).reshape(-1, 2)
    # normalized-float variant ([0.47,0.33]): every value has a decimal point and lies in [0, 1]
    if len(pairs) and all("." in x and "." in y for x, y in pairs) and np.all((c >= 0) & (c <= 1)):
        c = c * grid
    return c


def _snippet(s: str, n: int = 60) -> str:
    s = s.strip().replace("\n", "\\n")
    return repr(s[:n] + ("..." if len(s) > n else ""))


def parse_traces(text, width: int, height: int, grid: int = GRID_SIZE) -> TraceResult:
    """Parse Magma's ToM answer into pixel traces. Never raises.

    Reads every ``"Mark k": "[[x,y],...]"`` entry (complete points of a truncated list are kept)
    and the ``Mark k at [x,y]`` start points. Points outside the grid are dropped. Each problem is
    one line in ``errors``: missing header, truncation, bad or duplicate entries, no traces at all.
    """
    res = TraceResult(width=int(width) if _finite_pos(width) else 0,
                      height=int(height) if _finite_pos(height) else 0)
    try:
        _parse_into(res, text, width, height, grid)
    except Exception as e:  # noqa: BLE001 - the parser must never raise on model output
        res.errors.append(f"parser error: {type(e).__name__}: {e}")
    return res


def _finite_pos(v) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


def _parse_into(res: TraceResult, text, width, height, grid) -> None:
    if not (_finite_pos(width) and _finite_pos(height)):
        res.errors.append(f"bad image size {width!r}x{height!r}")
        return
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        res.errors.append(f"expected text, got {type(text).__name__}")
        return
    if not text.strip():
        res.errors.append("empty output")
        return
    s = text.replace("<trace_start>", "").replace("<trace_end>", "")
    if FUTURE_HEADER in s:
        head, body = s.rsplit(FUTURE_HEADER, 1)
    else:
        head, body = s, s
        if not _ENTRY_RE.search(s):
            res.errors.append(f"no traces found (no '{FUTURE_HEADER}' and no '\"Mark k\": [...]' entries) "
                              f"in {_snippet(s)}")
            for m in _START_RE.finditer(s):
                _add_start(res, m, width, height, grid)
            return
        res.errors.append(f"missing '{FUTURE_HEADER}' header")
    for m in _START_RE.finditer(head):
        _add_start(res, m, width, height, grid)
    entries = list(_ENTRY_RE.finditer(body))
    if not entries:
        res.errors.append(f"no '\"Mark k\": \"[[x,y],...]\"' entries after the header: {_snippet(body)}")
        return
    for i, m in enumerate(entries):
        k = int(m.group(1))
        seg = body[m.end(): entries[i + 1].start() if i + 1 < len(entries) else len(body)]
        seg_s = seg.strip()
        if not seg_s.startswith(("[", '"[', "'[")):
            res.errors.append(f"Mark {k}: expected a list of [x,y] points, got {_snippet(seg)}")
            continue
        pairs = _PAIR_RE.findall(seg)
        closed = "]]" in re.sub(r"\s+", "", seg)
        if not pairs:
            res.errors.append(f"Mark {k}: no complete [x,y] point in {_snippet(seg)}")
            continue
        if not closed:
            res.errors.append(f"Mark {k}: trace truncated after {len(pairs)} points")
        if k in res.traces:
            res.errors.append(f"Mark {k}: duplicate entry ignored")
            continue
        cells = _cells(pairs, grid)
        inside = np.all((cells >= 0) & (cells <= grid), axis=1)
        if not inside.all():
            n_out = int((~inside).sum())
            res.errors.append(f"Mark {k}: {n_out} points outside the {grid}x{grid} grid dropped")
            cells = cells[inside]
        if len(cells):
            res.traces[k] = from_grid(cells, width, height, grid)


def _add_start(res: TraceResult, m: re.Match, width, height, grid) -> None:
    k = int(m.group(1))
    cell = _cells([(m.group(2), m.group(3))], grid)[0]
    if np.all((cell >= 0) & (cell <= grid)) and k not in res.starts:
        res.starts[k] = from_grid(cell, width, height, grid)


def format_traces(starts: dict, traces: dict, width: int, height: int, grid: int = GRID_SIZE) -> str:
    """Inverse of :func:`parse_traces` (pixel in, Magma's answer text out): for tests and datasets."""
    ids = sorted(traces)
    s_cells = {k: to_grid([starts[k]], width, height, grid)[0] for k in ids if k in starts}
    head = ", ".join(f"Mark {k} at [{s_cells[k][0]},{s_cells[k][1]}]" for k in ids if k in s_cells)
    out = f"{head} should be moved, {FUTURE_HEADER}\n\n"
    for k in ids:
        cells = to_grid(traces[k], width, height, grid)
        out += f'"Mark {k}": "[' + ",".join(f"[{x},{y}]" for x, y in cells) + ']"\n\n'
    return out
