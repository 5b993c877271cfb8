"""Prompt strings exactly as MAGMA_FACTS, and the robot prompt's token ids through the real Llama-3 BPE."""

from __future__ import annotations

import pytest

from magma_ros.core import prompts as P


def test_robot_user_and_system_strings_are_verbatim():
    assert P.SYSTEM_PROMPT == "You are agent that can see, talk and act."
    want = "<image>\nWhat action should the robot take to Pick Coke Can?"
    assert P.robot_user_prompt("Pick Coke Can") == want


def test_tom_user_prompt_is_the_demo_string():
    got = P.tom_user_prompt([1, 2, 3, 4, 5, 6, 7, 8, 9], "Pick up the chip bag.", 8, 8)
    assert got == (
        "<image>\nThe image is split into 256x256 grids and is labeled with numeric marks "
        "[1, 2, 3, 4, 5, 6, 7, 8, 9].\nThe robot is doing: Pick up the chip bag.. To finish the task, how to "
        "move the numerical marks in the image with speed 8 for the next 8 steps?\n"
    )


def test_qa_prompts():
    assert P.qa_user_prompt("Q: what is red?") == "<image>\nQ: what is red? Answer the question briefly."
    got = P.qa_user_prompt("What changed?", n_images=3, brief=False)
    assert got == "<image>\n<image>\n<image>\nWhat changed?"
    assert P.som_click_user_prompt("open the menu") == (
        '<image>\nIn this view I need to click a button to "open the menu"? Provide the coordinates and the '
        "mark index of the containing bounding box if applicable.")


def test_template_fallback_and_image_markers():
    text = P.chat_prompt(None, P.robot_user_prompt("pick coke can"), mm_use_image_start_end=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are agent that can see, talk and "
        "act.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image_start><image><image_end>\nWhat "
        "action should the robot take to pick coke can?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    plain = P.chat_prompt(None, P.qa_user_prompt("hi", 2), mm_use_image_start_end=False)
    assert plain.count("<image>") == 2 and "<image_start>" not in plain


@pytest.fixture(scope="module")
def tokenizer():
    from magma_ros.model.tokenizer import build_llama3_tokenizer

    return build_llama3_tokenizer()


def test_robot_prompt_ids_match_the_issue_36_dump(tokenizer):
    ids = P.encode(tokenizer, P.robot_prompt(tokenizer, "pick coke can"))
    sys_ids = tokenizer("You are agent that can see, talk and act.", add_special_tokens=False)["input_ids"]
    q = "What action should the robot take to pick coke can?"
    q_ids = tokenizer(q, add_special_tokens=False)["input_ids"]
    # MAGMA_FACTS §1.2: double BOS, Llama-3 headers, <image_start><image><image_end> then "\n" (198)
    want = ([128000, 128000, 128006, 9125, 128007, 271] + sys_ids + [128009]
            + [128006, 882, 128007, 271, 128259, 128257, 128260, 198] + q_ids + [128009]
            + [128006, 78191, 128007, 271])
    assert ids == want
    assert tokenizer.vocab_size == 128000  # the base vocabulary action decoding uses
    # the checkpoint's chat template and the Python fallback agree
    assert P.robot_prompt(tokenizer, "x") == P.chat_prompt(None, P.robot_user_prompt("x"))
