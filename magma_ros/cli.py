"""``magma-ros``: command-line entry point.

Subcommands::

    magma-ros predict --model PATH --image img.png --task "pick up the can" [--stats bridge_orig] [--tom]
    magma-ros ask --model PATH --image a.png [b.png ...] --question "what is on the table?"
    magma-ros ask --model PATH --video clip.mp4 [--frames 8] --question "what did the robot do?"
    magma-ros ui --model PATH --screenshot s.png --task "click the search button" [--boxes b.json] [--overlay o.png]
    magma-ros make-tiny-checkpoint DIR [--seed N] [--size tiny|mid]
    MAGMA_ROS_TOKEN=... magma-ros serve --model PATH [--port 8765] [--host 127.0.0.1] [--ray] [--certfile C --keyfile K]
    magma-ros launch FILE [arg:=value ...]
    magma-ros stats DATASET [--out stats.json]        (action statistics for the policy's stats:=)
    magma-ros collect --sim --scripted --episodes N --out DIR [--discard 1] [--robot fr3]

``predict``, ``ask`` and ``ui`` print one JSON object on stdout (logs go to stderr). User mistakes print one line
``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from magma_ros.core.errors import ConfigError

PASSTHROUGH = {
    "make-tiny-checkpoint": ("magma_ros.model.checkpoint", "write a small random-weight Magma checkpoint"),
    "serve": ("magma_ros.serve.server", "serve a Magma policy over WebSocket (openpi protocol, token auth)"),
    "launch": ("magma_ros.launch_runner", "run a ROS 2 launch file (.launch.yaml) without ros2 launch"),
}


def load_image(path: str) -> np.ndarray:
    """Image file -> HxWx3 uint8 RGB array; ConfigError when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {p}: {e}") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Magma checkpoint directory or hub id")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--engine", default="auto", help="auto | fast | plain")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="magma-ros", description="Magma on ROS 2: tools around the policy.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    pr = sub.add_parser("predict", help="one action (and optionally a ToM plan) for an image and a task")
    _model_args(pr)
    pr.add_argument("--image", required=True, help="RGB image file")
    pr.add_argument("--task", required=True, help="instruction, e.g. 'put the spoon on the towel'")
    pr.add_argument("--stats", default="bridge_orig", help="bridge_orig | google_robot | stats JSON path")
    pr.add_argument("--constrained", action="store_true", help="only action tokens at the 7 action positions")
    pr.add_argument("--tom", action="store_true", help="also predict Trace-of-Mark traces")
    pr.add_argument("--marks", type=int, default=10, help="number of ToM marks (with --tom)")
    pr.add_argument("--steps", type=int, default=8, help="ToM future steps (with --tom)")
    pr.add_argument("--speed", type=int, default=8, help="ToM speed in grid cells per step (with --tom)")
    pr.add_argument("--max-new-tokens", type=int, default=512, help="ToM answer length cap (with --tom)")
    pr.add_argument("--overlay", default=None, help="write the ToM overlay PNG here (with --tom)")
    ak = sub.add_parser("ask", help="answer a question about one or several images")
    _model_args(ak)
    src = ak.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s), oldest first")
    src.add_argument("--video", help="video file (PyAV, else OpenCV): --frames frames sampled uniformly")
    ak.add_argument("--frames", type=int, default=8, help="frames sampled from --video (1..8)")
    ak.add_argument("--question", required=True)
    ak.add_argument("--max-new-tokens", type=int, default=128)
    ak.add_argument("--long", action="store_true", help="do not ask for a brief answer")
    ui = sub.add_parser("ui", help="UI navigation: Set-of-Mark marks on a screenshot, Magma picks the element")
    _model_args(ui)
    ui.add_argument("--screenshot", required=True, help="screenshot image file")
    ui.add_argument("--task", required=True, help="what to do, e.g. 'click the search button'")
    ui.add_argument("--boxes", default=None, help="candidate boxes as JSON (file or text): [[x0,y0,x1,y1], ...]; "
                    "default: OpenCV contours and text-like regions")
    ui.add_argument("--max-marks", type=int, default=40, help="most candidate marks found by OpenCV")
    ui.add_argument("--overlay", default=None, help="write the marks and the choice as a PNG here")
    ui.add_argument("--max-new-tokens", type=int, default=128)
    ui.add_argument("--mark-base", type=int, default=0,
                    help="label of the first mark: 0 (Magma's UI demo draws 0-based labels) or 1; UNVERIFIED")
    ui.add_argument("--mark-pattern", default=r"Mark:\s*(\d+)", help="regex (one group) reading the mark")
    ui.add_argument("--box-scale", type=float, default=1000.0, help="<box> coordinate grid (demo: 0..1000)")
    ui.add_argument("--point-scale", type=float, default=1.0, help="bare coordinates' range (demo: 0..1)")
    stp = sub.add_parser("stats", help="Magma-convention action statistics of a recorded LeRobot dataset")
    stp.add_argument("dataset", help="LeRobot dataset directory (e.g. OUT/lerobot)")
    stp.add_argument("--out", default=None, help="also write the JSON here (load it with stats:=FILE)")
    stp.add_argument("--name", default=None, help="statistics name (default: the dataset directory's)")
    co = sub.add_parser("collect", help="headless collection in MuJoCo with a scripted gamepad")
    co.add_argument("--sim", action="store_true", required=True, help="MuJoCo (the only mode; required)")
    co.add_argument("--scripted", action="store_true", required=True,
                    help="a scripted Joy operator (the only mode; required)")
    co.add_argument("--episodes", type=int, default=3, help="episodes to save")
    co.add_argument("--discard", default="", help="comma-separated attempt numbers (0-based) to discard")
    co.add_argument("--out", required=True, help="session directory: OUT/lerobot and OUT/mcap")
    co.add_argument("--robot", default="fr3", help="fr3 | panda | wx250s")
    co.add_argument("--device", default="xbox", help="gamepad layout (config/teleop): xbox | ps5 | ps4")
    co.add_argument("--no-policy", action="store_true", help="teleop only (no scripted policy before takeover)")
    co.add_argument("--resume", action="store_true", help="append to the dataset in OUT/lerobot")
    co.add_argument("--width", type=int, default=320, help="[px] camera width")
    co.add_argument("--height", type=int, default=240, help="[px] camera height")
    co.add_argument("--policy-seconds", type=float, default=2.0, help="[s] policy phase of each episode")
    co.add_argument("--teleop-seconds", type=float, default=2.0, help="[s] teleop phase of each episode")
    for name, (_, help_) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def _policy(a, stats="bridge_orig", constrained=False):
    from magma_ros.model.policy import MagmaPolicy

    return MagmaPolicy(a.model, stats=stats, device=a.device, dtype=a.dtype, engine=a.engine,
                       constrained=constrained)


def cmd_predict(a) -> dict:
    image = load_image(a.image)
    policy = _policy(a, a.stats, a.constrained)
    r = policy.infer({"image": image, "instruction": a.task})
    out = {"action": [float(x) for x in r["action"]], "tokens": [int(t) for t in r["tokens"]],
           "valid": bool(r["valid"]), "reason": r["reason"], "latency_s": round(float(r["latency_s"]), 4),
           "step_period": policy.step_period, "stats": policy.stats.name, "engine": policy.engine_name,
           "convention": "[dx, dy, dz m, droll, dpitch, dyaw rad (sxyz), gripper 0 closed..1 open] per step"}
    if a.tom:
        tr = policy.predict_tom(image, a.task, marks=a.marks, speed=a.speed, steps=a.steps,
                                max_new_tokens=a.max_new_tokens)
        out["tom"] = tr.to_dict()
        out["tom"]["text"] = tr.text
        if a.overlay:
            from PIL import Image

            from magma_ros.core.som import draw_tom

            ids = sorted(tr.starts)
            over = draw_tom(image, [tr.starts[k] for k in ids], tr.traces, tr.starts, labels=ids)
            Image.fromarray(over).save(a.overlay)
            out["tom"]["overlay"] = str(a.overlay)
    return out


def cmd_ask(a) -> dict:
    out = {}
    if a.video:
        from magma_ros.core.ask import read_video_frames
        from magma_ros.model.policy import MAX_QA_IMAGES

        if not 1 <= a.frames <= MAX_QA_IMAGES:
            raise ConfigError(f"--frames must be 1..{MAX_QA_IMAGES}, got {a.frames}")
        images, idx, times = read_video_frames(a.video, a.frames)
        out.update(video=str(a.video), frames=idx, times_s=[round(t, 3) for t in times])
    else:
        images = [load_image(p) for p in a.image]
    policy = _policy(a)
    out["answer"] = policy.ask(images, a.question, max_new_tokens=a.max_new_tokens, brief=not a.long)
    out["prompt"] = policy.last_prompt
    return out


def cmd_ui(a) -> dict:
    from magma_ros.core import ui
    from magma_ros.core.som import draw_boxes_with_marks

    shot = load_image(a.screenshot)
    h, w = shot.shape[:2]
    fmt = ui.UiAnswerFormat(mark_pattern=a.mark_pattern, mark_base=a.mark_base, box_scale=a.box_scale,
                            point_scale=a.point_scale)
    boxes = ui.load_boxes(a.boxes, w, h) if a.boxes else ui.detect_candidates(shot, max_marks=a.max_marks)
    labels = [str(i + a.mark_base) for i in range(len(boxes))]
    marked = draw_boxes_with_marks(shot, boxes, labels) if len(boxes) else shot
    policy = _policy(a)
    answer = policy.ui_answer(marked, a.task, max_new_tokens=a.max_new_tokens)
    out = ui.parse_ui_answer(answer, boxes, w, h, fmt)
    out.update(raw=answer, task=a.task, marks=len(boxes), prompt=policy.last_prompt,
               boxes_source="json" if a.boxes else "opencv")
    if a.overlay:
        from PIL import Image

        Image.fromarray(ui.draw_choice(marked, out)).save(a.overlay)
        out["overlay"] = str(a.overlay)
    return out


def cmd_stats(a) -> dict:
    from magma_ros.data.stats import action_stats

    d = action_stats(a.dataset, name=a.name)
    if a.out:
        Path(a.out).write_text(json.dumps(d, indent=2) + "\n")
    return d


def cmd_collect(a) -> dict:
    from magma_ros.data.collect import CollectPlan, collect

    try:
        discard = tuple(int(x) for x in a.discard.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--discard takes attempt numbers like '1' or '0,2', got '{a.discard}'") from None
    if a.episodes < 1:
        raise ConfigError("--episodes must be >= 1")
    plan = CollectPlan(episodes=a.episodes, discard=discard, policy_seconds=a.policy_seconds,
                       teleop_seconds=a.teleop_seconds)
    try:
        r = collect(a.out, plan, robot=a.robot, device=a.device, with_policy=not a.no_policy, width=a.width,
                    height=a.height, resume=a.resume, log=lambda s: print(s, file=sys.stderr))
    except RuntimeError as e:  # the graph did not do what the operator expected: say what, and where the logs are
        raise ConfigError(f"collect: {e}") from None
    for e in r.episodes:
        print(f"episode {e['episode_index']}: {e['length']} frames", file=sys.stderr)
    print(f"LeRobot dataset: {r.dataset}\nMCAP bags: {r.mcap}", file=sys.stderr)
    return {"dataset": str(r.dataset), "mcap": str(r.mcap), "episodes": r.episodes,
            "bags": sorted(str(p) for p in r.mcap.glob("*.mcap")), "events": r.events}


COMMANDS = {"predict": cmd_predict, "ask": cmd_ask, "ui": cmd_ui, "stats": cmd_stats, "collect": cmd_collect}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        try:
            mod = importlib.import_module(PASSTHROUGH[argv[0]][0])
        except ImportError as e:
            print(f"error: '{argv[0]}' is not available ({e})", file=sys.stderr)
            return 2
        try:
            return int(mod.main(argv[1:]) or 0)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        out = COMMANDS[a.cmd](a)
    except (ConfigError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
