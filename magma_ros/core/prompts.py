"""Magma's prompts, exactly as its evaluation and demo code builds them (MAGMA_FACTS §1.1, §2.1, §3.1, §4).

Every prompt is a system turn plus a user turn that goes through the tokenizer's chat template
(Llama-3-Instruct) with ``add_generation_prompt=True``; then, when the checkpoint's config sets
``mm_use_image_start_end`` (the released Magma-8B does), each ``<image>`` becomes
``<image_start><image><image_end>``. The text is then tokenized with the default
``add_special_tokens=True``, which adds a second BOS after the template's own (Magma's processor
does the same, and so did training). The tokenizer is duck-typed (transformers' API), so this module
needs neither torch nor transformers.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
IMAGE_START_END = "<image_start><image><image_end>"

# The system prompt of Magma's robot / ToM / UI demos (sic: "agent", no "an").
SYSTEM_PROMPT = "You are agent that can see, talk and act."

# SimplerEnv / LIBERO / OpenX training user turn; the task is passed as given (not lower-cased).
ROBOT_USER_TEMPLATE = "<image>\nWhat action should the robot take to {task}?"

# Trace-of-Mark demo (agents/robot_traj/app.py); .format(mark_ids, task, speed, steps).
TOM_USER_TEMPLATE = (
    "<image>\nThe image is split into 256x256 grids and is labeled with numeric marks {}.\n"
    "The robot is doing: {}. To finish the task, how to move the numerical marks in the image with "
    "speed {} for the next {} steps?\n"
)

# UI agent demo question (agents/ui_agent/app.py), one image.
QA_BRIEF_SUFFIX = " Answer the question briefly."

# UI agent demo Set-of-Mark click prompt.
SOM_CLICK_TEMPLATE = (
    '<image>\nIn this view I need to click a button to "{}"? Provide the coordinates and the mark '
    "index of the containing bounding box if applicable."
)

# Llama-3-Instruct special tokens (used only by the template fallback below).
_BOT, _SH, _EH, _EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


def robot_user_prompt(task: str) -> str:
    """User turn asking for the next 7-DoF action for ``task``."""
    return ROBOT_USER_TEMPLATE.format(task=task)


def tom_user_prompt(mark_ids, task: str, speed: int, steps: int) -> str:
    """User turn asking for Trace-of-Mark traces; ``mark_ids`` is formatted as a Python list."""
    return TOM_USER_TEMPLATE.format(list(int(m) for m in mark_ids), task, int(speed), int(steps))


def qa_user_prompt(question: str, n_images: int = 1, brief: bool = True) -> str:
    """User turn for a question about ``n_images`` images (one ``<image>\\n`` per image first).

    ``brief`` appends " Answer the question briefly." as Magma's UI demo does; without it the text
    is the lmms-eval form (``"<image>\\n" * n + question``).
    """
    if n_images < 0:
        raise ValueError("n_images must be >= 0")
    return "<image>\n" * n_images + question + (QA_BRIEF_SUFFIX if brief else "")


def som_click_user_prompt(target: str) -> str:
    """User turn of the UI Set-of-Mark demo: where to click to achieve ``target``."""
    return SOM_CLICK_TEMPLATE.format(target)


def conversation(user: str, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """``[{"role": "system", ...}, {"role": "user", ...}]`` as Magma's demos build it."""
    convs = [] if system is None else [{"role": "system", "content": system}]
    return convs + [{"role": "user", "content": user}]


def llama3_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The standard Llama-3-Instruct chat template (contents trimmed, BOS first), in Python.

    Used only when a tokenizer carries no ``chat_template``; the checkpoint's own template wins.
    """
    out = _BOT
    for m in messages:
        out += f"{_SH}{m['role']}{_EH}\n\n{str(m['content']).strip()}{_EOT}"
    if add_generation_prompt:
        out += f"{_SH}assistant{_EH}\n\n"
    return out


def apply_image_tokens(prompt: str, mm_use_image_start_end: bool) -> str:
    """Replace each ``<image>`` with ``<image_start><image><image_end>`` when the config asks."""
    return prompt.replace(IMAGE_TOKEN, IMAGE_START_END) if mm_use_image_start_end else prompt


def chat_prompt(tokenizer, user: str, mm_use_image_start_end: bool = True,
                system: str | None = SYSTEM_PROMPT) -> str:
    """Full prompt text: chat template with generation prompt, then the image-token replacement."""
    convs = conversation(user, system)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    else:
        text = llama3_chat(convs)
    return apply_image_tokens(text, mm_use_image_start_end)


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a chat prompt, tokenized with ``add_special_tokens=True`` (double BOS, as Magma)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def robot_prompt(tokenizer, task: str, mm_use_image_start_end: bool = True) -> str:
    """The exact robot-action prompt text for ``task``."""
    return chat_prompt(tokenizer, robot_user_prompt(task), mm_use_image_start_end)


def tom_prompt(tokenizer, mark_ids, task: str, speed: int, steps: int,
               mm_use_image_start_end: bool = True) -> str:
    """The exact Trace-of-Mark prompt text."""
    return chat_prompt(tokenizer, tom_user_prompt(mark_ids, task, speed, steps), mm_use_image_start_end)


def qa_prompt(tokenizer, question: str, n_images: int = 1, brief: bool = True,
              mm_use_image_start_end: bool = True) -> str:
    """The exact question-answering prompt text for ``n_images`` images."""
    return chat_prompt(tokenizer, qa_user_prompt(question, n_images, brief), mm_use_image_start_end)
