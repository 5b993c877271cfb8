"""UI navigation with Set-of-Mark: candidate boxes on a screenshot, Magma's UI-agent prompt, answer parsing.

ROS-free, torch-free (numpy, OpenCV for candidate detection, PIL for drawing).

- Candidates (:func:`detect_candidates`): Magma's UI demo gets boxes from OmniParser (a YOLO icon
  detector + OCR, MAGMA_FACTS §3.2), which is not available here. This module finds them with
  OpenCV: edges closed horizontally so letters merge into words/buttons ("text-like regions"),
  external contours, their bounding boxes, size filters and non-maximum suppression. Or boxes come
  from the user (:func:`load_boxes`, ``--boxes`` JSON).
- Marks are drawn as Magma's ``plot_boxes_with_marks`` does (``core.som.draw_boxes_with_marks``: red
  outline, 0-based label on a red filled rectangle at the corner that overlaps other boxes least).
- Prompt: the UI demo's Set-of-Mark click prompt (MAGMA_FACTS §3.1, ``core.prompts``), greedy,
  128 new tokens.
- Parsing (:func:`parse_ui_answer`, never raises), the demo's order (§3.3): ``Mark: N`` -> that
  mark's box; else ``<box>(x0,y0),(x1,y1)</box>`` on a 0-1000 grid -> its centre; else two floats =
  a normalised point, four = a normalised box's centre. The exact output format of Magma-8B is
  UNVERIFIED (§3.3), as is whether marks are 0- or 1-based (the demo draws 0-based labels, a
  third-party script trains 1-based): everything is in :class:`UiAnswerFormat`.
- The action: ``type`` when the answer says type/enter/input with a quoted text, ``scroll`` with a
  direction when it says scroll, else ``click`` at the located point. No location -> ``"action":
  None`` and the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError


@dataclass(frozen=True)
class UiAnswerFormat:
    """How an answer is read (all of it UNVERIFIED for Magma-8B beyond the demo's parser, §3.3)."""

    mark_pattern: str = r"Mark:\s*(\d+)"  # regex with one group: the chosen mark's label
    mark_base: int = 0  # label of the first mark (the demo draws 0-based labels)
    box_pattern: str = r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>"
    box_scale: float = 1000.0  # <box> coordinates are on a 0..box_scale grid
    point_scale: float = 1.0  # bare numbers are normalised to 0..point_scale (the demo: [0, 1])

    def __post_init__(self):
        for p in (self.mark_pattern, self.box_pattern):
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"bad answer pattern {p!r}: {e}") from None
        if self.box_scale <= 0 or self.point_scale <= 0:
            raise ConfigError("box_scale and point_scale must be > 0")


# ----------------------------------------------------------------------------- candidates
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) with boxes b (N, 4)."""
    x0 = np.maximum(a[0], b[:, 0])
    y0 = np.maximum(a[1], b[:, 1])
    x1 = np.minimum(a[2], b[:, 2])
    y1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    order = np.argsort(-scores)
    keep: list[int] = []
    for i in order:
        if not keep or _iou(boxes[i], boxes[keep]).max() <= iou:
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def detect_candidates(image, max_marks: int = 40, min_size: int = 8, max_frac: float = 0.5,
                      iou: float = 0.3) -> np.ndarray:
    """Candidate UI elements (N, 4) ``[x0, y0, x1, y1]`` px: buttons, icons, words and lines of text.

    Canny edges, closed with a wide short kernel (letters of a word merge; a button's outline closes),
    external contours -> bounding boxes; boxes smaller than ``min_size`` px on a side or larger than
    ``max_frac`` of the screen are dropped, overlaps above ``iou`` suppressed (larger box first),
    at most ``max_marks`` kept, in reading order (top to bottom, left to right).
    """
    import cv2

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB screenshot, got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape[:2]
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 40, 120)
    kx = max(3, int(round(w / 160)))  # ~ a letter gap at typical UI scales
    closed = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (kx, 3)))
    closed = cv2.dilate(closed, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(closed, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)  # nested: buttons in cards
    boxes = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        if bw < min_size or bh < min_size or bw * bh > max_frac * w * h:
            continue
        boxes.append([x, y, x + bw, y + bh])
    if not boxes:
        return np.zeros((0, 4))
    b = np.asarray(boxes, dtype=np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    b = b[_nms(b, area, iou)][:max_marks]
    row = np.round(b[:, 1] / max(8.0, h / 40))  # rows of ~1/40 screen height
    return b[np.lexsort((b[:, 0], row))]


def load_boxes(source, width: int, height: int) -> np.ndarray:
    """Boxes (N, 4) px from JSON: a file path or a JSON text.

    Accepted: ``[[x0, y0, x1, y1], ...]``, ``[{"box"|"bbox": [...]}, ...]`` or ``{"boxes": [...]}``;
    values all within [0, 1] are normalised and scaled to the image. ConfigError with the reason otherwise.
    """
    text = str(source)
    p = Path(text)
    if not text.lstrip().startswith(("[", "{")):
        if not p.is_file():
            raise ConfigError(f"boxes file not found: {p}")
        text = p.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"boxes: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(d, dict):
        d = d.get("boxes", None)
    if not isinstance(d, list) or not d:
        raise ConfigError("boxes: expected a non-empty list of [x0, y0, x1, y1] (or {\"boxes\": [...]})")
    rows = []
    for i, item in enumerate(d):
        if isinstance(item, dict):
            item = item.get("box", item.get("bbox"))
        try:
            r = [float(v) for v in item]
        except (TypeError, ValueError):
            raise ConfigError(f"boxes[{i}]: expected 4 numbers, got {item!r}") from None
        if len(r) != 4 or not np.isfinite(r).all():
            raise ConfigError(f"boxes[{i}]: expected 4 finite numbers, got {item!r}")
        rows.append([min(r[0], r[2]), min(r[1], r[3]), max(r[0], r[2]), max(r[1], r[3])])
    b = np.asarray(rows)
    if b.max() <= 1.0 and b.min() >= 0.0:
        b = b * [width, height, width, height]
    return b


# ----------------------------------------------------------------------------- parsing
_FLOAT = r"-?\d+(?:\.\d+)?"
_QUOTED = re.compile(r"[\"“']([^\"”']+)[\"”']")


def _action_kind(text: str) -> tuple[str, dict]:
    low = text.lower()
    if re.search(r"\bscroll", low):
        m = re.search(r"\b(up|down|left|right)\b", low)
        return "scroll", {"direction": m.group(1) if m else "down"}
    if re.search(r"\b(type|enter|input|write)\b", low):
        q = _QUOTED.search(text)
        if q:
            return "type", {"text": q.group(1)}
    return "click", {}


def parse_ui_answer(text, boxes, width: int, height: int, fmt: UiAnswerFormat = UiAnswerFormat()) -> dict:
    """Magma's UI answer -> one JSON-ready dict; never raises.

    Keys: ``action`` (click | type | scroll | None), ``mark`` (label or None), ``box`` ([x0, y0, x1, y1]
    px or None), ``point`` ([x, y] px or None), ``source`` (mark | box | point | None), ``reason``
    ('' when an action was found), plus ``text`` (type) or ``direction`` (scroll).
    """
    out = {"action": None, "mark": None, "box": None, "point": None, "source": None, "reason": ""}
    try:
        _parse_ui(out, text, boxes, width, height, fmt)
    except Exception as e:  # noqa: BLE001 - model output must never raise
        out.update(action=None, reason=f"parser error: {type(e).__name__}: {e}")
    return out


def _parse_ui(out: dict, text, boxes, width, height, fmt: UiAnswerFormat) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str) or not text.strip():
        out["reason"] = "empty answer" if isinstance(text, str) else f"expected text, got {type(text).__name__}"
        return
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if boxes is not None and len(boxes) else np.zeros((0, 4))
    notes = []
    m = re.search(fmt.mark_pattern, text)
    if m:
        k = int(m.group(1))
        i = k - fmt.mark_base
        if 0 <= i < len(b):
            box = b[i]
            out.update(mark=k, box=[round(float(v), 1) for v in box], source="mark",
                       point=[round(float((box[0] + box[2]) / 2), 1), round(float((box[1] + box[3]) / 2), 1)])
        else:
            notes.append(f"mark {k} is not one of the {len(b)} marks (labels {fmt.mark_base}.."
                         f"{fmt.mark_base + len(b) - 1})")
    if out["point"] is None and "box" in text:
        bm = re.search(fmt.box_pattern, text)
        if bm:
            x0, y0, x1, y1 = (float(v) / fmt.box_scale for v in bm.groups())
            if all(0 <= v <= 1 for v in (x0, y0, x1, y1)):
                out.update(source="box", box=[round(x0 * width, 1), round(y0 * height, 1), round(x1 * width, 1),
                                              round(y1 * height, 1)],
                           point=[round((x0 + x1) / 2 * width, 1), round((y0 + y1) / 2 * height, 1)])
            else:
                notes.append(f"<box> outside 0..{fmt.box_scale:g}")
        else:
            notes.append("'box' without a complete <box>(x0,y0),(x1,y1)</box>")
    if out["point"] is None:
        body = re.sub(fmt.mark_pattern, " ", text)
        nums = [float(v) / fmt.point_scale for v in re.findall(_FLOAT, body)]
        pt = None
        if len(nums) == 4 and all(0 <= v <= 1 for v in nums):  # a normalised box: its centre
            pt = ((nums[0] + nums[2]) / 2, (nums[1] + nums[3]) / 2)
        elif len(nums) >= 2 and all(0 <= v <= 1 for v in nums[:2]):
            pt = (nums[0], nums[1])
        if pt is not None:
            out.update(source="point", point=[round(pt[0] * width, 1), round(pt[1] * height, 1)])
        elif nums:
            notes.append(f"numbers {nums[:4]} are not a normalised point (0..{fmt.point_scale:g})")
    if out["point"] is None:
        out["reason"] = "; ".join(notes) or f"no mark, box or point in the answer {text.strip()[:80]!r}"
        return
    kind, extra = _action_kind(text)
    out["action"] = kind
    out.update(extra)
    out["reason"] = "; ".join(notes)


# ----------------------------------------------------------------------------- drawing
def draw_choice(image, result: dict, color=(0, 200, 0)) -> np.ndarray:
    """The chosen box (green, width 3) and a crosshair at the chosen point, on a copy of ``image``."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), "RGB")
    d = ImageDraw.Draw(img)
    if result.get("box") is not None:
        d.rectangle(result["box"], outline=color, width=3)
    if result.get("point") is not None:
        x, y = result["point"]
        r = max(6, img.width // 80)
        d.ellipse([x - r, y - r, x + r, y + r], outline=color, width=3)
        d.line([x - 2 * r, y, x + 2 * r, y], fill=color, width=2)
        d.line([x, y - 2 * r, x, y + 2 * r], fill=color, width=2)
    return np.asarray(img)

