"""Render the two pictures of docs/policy.md: ToM in 3-D (MuJoCo) and a UI-navigation overlay.

    MUJOCO_GL=egl .venv/bin/python docs/img/make_pictures.py

tom_3d.png: left, the sim camera's view with two pixel traces drawn as ToM traces (numbered SoM
marks): mark 1 on the gripper (the TCP projected into the image) moving to the red cube, mark 2 on
the red cube pushed toward the green one. They are hand-made stand-ins for a Magma answer (the
project's test checkpoint has random weights). Right, the same scene from a second camera with the
traces back-projected through the first camera's aligned depth into the robot base frame
(``core.tom3d``; mark 1 from the TCP through free space to the cube's top, as the policy node does
with ``tom_gripper_depth:=interpolate``; mark 2 on the table surface) and projected into that view:
the plan is a 3-D path, not a picture.

ui_overlay.png: a synthetic screenshot, candidate boxes from ``core.ui.detect_candidates`` drawn as
Magma's SoM marks, and the choice parsed from the illustrative answer ``"(0.87, 0.13) Mark: N"``
(``core.ui.parse_ui_answer``) in green.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = Path(__file__).resolve().parent

import magma_ros.sim  # noqa: E402,F401
from magma_ros.core import som, tom3d, ui  # noqa: E402
from magma_ros.core.realsense import CameraConfig  # noqa: E402


def tom_picture() -> None:
    from magma_ros.sim.arm import ArmSim

    cam = CameraConfig(name="doc", parent_frame="fr3_link0", position=(1.15, 0.5, 0.8), look_at=(0.4, 0.0, 0.2))
    side = CameraConfig(name="side", parent_frame="fr3_link0", position=(0.45, -1.05, 0.45), look_at=(0.42, 0.0, 0.1))
    w, h = 400, 300
    with ArmSim("fr3", camera=cam, width=w, height=h) as a:
        rgb, depth = a.render_rgbd()
        info = a.camera_info()
        T = info.T_base_optical
        tcp = a.tcp_pose()[:3, 3]
        red = a.body_pose("red_cube")[:3, 3] + [0, 0, 0.0225]
        green = a.body_pose("green_cube")[:3, 3]
    K = info.K
    px = lambda p: tom3d.pixel_of(p, K, T, w, h)  # noqa: E731
    g0, r0, gr = px(tcp), px(red), px(green + [0, -0.06, 0.0])
    # mark 1: gripper -> above the red cube (a curve in the image), mark 2: red cube -> beside the green one
    s = np.linspace(0, 1, 9)[:, None]
    t1 = (1 - s) * g0 + s * r0 + np.sin(np.pi * s) * np.array([0, -18.0])
    t2 = (1 - s) * r0 + s * gr
    left = som.draw_tom(rgb, [g0, r0], {1: t1[1:], 2: t2[1:]}, {1: g0, 2: r0}, labels=[1, 2])
    # mark 1 as the policy node does it (tom_gripper_depth:=interpolate): from the TCP through free space
    plan = tom3d.traces_to_3d({1: t1, 2: t2}, depth, K, T, starts={1: tcp}, interpolate=(1,))
    with ArmSim("fr3", camera=side, width=w, height=h) as b:
        rgb2, _ = b.render_rgbd()
        T2, K2 = b.camera_info().T_base_optical, b.camera_info().K
    img = Image.fromarray(rgb2)
    d = ImageDraw.Draw(img)
    colors = {1: som.PALETTE[0], 2: som.PALETTE[1]}
    for tr in plan.traces:
        uv = tom3d.project(tom3d.transform(np.linalg.inv(T2), tr.points), K2)
        d.line([tuple(p) for p in uv], fill=colors[tr.mark], width=3)
        for p in uv:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colors[tr.mark])
    right = som.draw_marks(np.asarray(img), [tom3d.project(tom3d.transform(np.linalg.inv(T2), t.points[:1]), K2)[0]
                                             for t in plan.traces], labels=[1, 2])
    both = np.concatenate([left, np.full((h, 6, 3), 255, np.uint8), right], axis=1)
    Image.fromarray(both).save(OUT / "tom_3d.png", optimize=True)
    for tr in plan.traces:
        print(f"mark {tr.mark}: {len(tr.points)} points, {tr.dropped} dropped; base frame start "
              f"{np.round(tr.points[0], 3)} end {np.round(tr.points[-1], 3)}")


def screenshot() -> np.ndarray:
    from PIL import ImageFont

    W, H = 640, 400
    img = Image.new("RGB", (W, H), (248, 249, 251))
    d = ImageDraw.Draw(img)
    f = ImageFont.load_default(size=16)
    d.rectangle([0, 0, W, 48], fill=(32, 33, 36))
    d.text((16, 14), "Robot Lab  ·  Episodes", fill=(255, 255, 255), font=f)
    d.rounded_rectangle([300, 10, 520, 38], radius=6, fill=(255, 255, 255))
    d.text((312, 14), "Search episodes", fill=(120, 120, 120), font=f)
    d.rounded_rectangle([532, 10, 624, 38], radius=6, fill=(26, 115, 232))
    d.text((552, 14), "Search", fill=(255, 255, 255), font=f)
    for i, name in enumerate(["Overview", "Episodes", "Datasets", "Settings"]):
        d.text((20, 80 + 40 * i), name, fill=(40, 40, 40), font=f)
    for i in range(3):
        y = 80 + 95 * i
        d.rounded_rectangle([170, y, 620, y + 80], radius=8, outline=(210, 210, 210), fill=(255, 255, 255))
        d.text((190, y + 14), f"Episode {41 + i}: pick up the red block", fill=(30, 30, 30), font=f)
        d.rounded_rectangle([520, y + 44, 604, y + 70], radius=5, fill=(52, 168, 83))
        d.text((540, y + 48), "Replay", fill=(255, 255, 255), font=f)
    return np.asarray(img)


def ui_picture() -> None:
    shot = screenshot()
    h, w = shot.shape[:2]
    boxes = ui.detect_candidates(shot, max_marks=30)
    marked = som.draw_boxes_with_marks(shot, boxes)
    centre = np.array([(b[0] + b[2]) / 2 for b in boxes]), np.array([(b[1] + b[3]) / 2 for b in boxes])
    k = int(np.argmin(np.hypot(centre[0] - 578, centre[1] - 24)))  # the "Search" button's mark
    answer = f"({578 / w:.2f}, {24 / h:.2f}) Mark: {k}"
    res = ui.parse_ui_answer(answer, boxes, w, h)
    Image.fromarray(ui.draw_choice(marked, res)).save(OUT / "ui_overlay.png", optimize=True)
    print(f"{len(boxes)} candidates; answer {answer!r} -> {res}")


if __name__ == "__main__":
    tom_picture()
    ui_picture()
