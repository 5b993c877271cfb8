"""Image processor against the official MagmaImageProcessor outputs; the offline Llama-3 tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image
from safetensors.torch import load_file

from magma_ros.model import build_llama3_tokenizer, collate, preprocess, preprocess_robot
from magma_ros.model.processor import crop_grid, num_image_tokens

INPUTS = FIXTURES / "magma_tiny" / "inputs"
IMAGES = ["img0_256x256.png", "img1_640x480.png", "img2_360x800.png"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # F.interpolate's float result depends on the thread split; reference used 1
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("i", range(3))
def test_pixel_values_equal_official(one_thread, i):
    ref = load_file(str(INPUTS / "pixel_values.safetensors"))
    pil = Image.open(INPUTS / IMAGES[i]).convert("RGB")
    for image in (np.asarray(pil), pil):  # numpy HxWx3 uint8 and PIL both accepted
        out = preprocess(image)
        assert out["image_sizes"].dtype == torch.long
        assert torch.equal(out["image_sizes"], ref[f"img{i}.image_sizes"])
        assert out["pixel_values"].dtype == torch.float32
        assert torch.equal(out["pixel_values"], ref[f"img{i}.pixel_values"])


@pytest.mark.parametrize(
    "wh, grid, tokens",
    [  # MAGMA_FACTS §1.3 (derived): robot frame 272 tokens, 640x512 -> 1024x512 -> 528, large -> 2x2 -> 1056
        ((256, 256), (1, 1), 272),
        ((640, 512), (1, 2), 528),
        ((640, 480), (1, 2), 528),
        ((360, 800), (2, 1), 544),
        ((2000, 2000), (2, 2), 1056),
        ((3000, 400), (1, 4), 16 * 65),
    ],
)
def test_crop_grid_and_token_count(wh, grid, tokens):
    assert crop_grid(*wh) == grid
    assert num_image_tokens(grid) == tokens
    out = preprocess(np.zeros((wh[1], wh[0], 3), np.uint8))
    assert out["pixel_values"].shape == (grid[0] * grid[1], 3, 512, 512)
    assert out["image_sizes"].tolist() == [list(grid)]


def test_normalization_uses_clip_mean_std():
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 128
    px = preprocess(img)["pixel_values"][0, :, 100, 100]
    want = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258]
    want.append((128 / 255 - 0.40821073) / 0.27577711)
    assert px.tolist() == pytest.approx(want, abs=1e-5)


def test_robot_path_is_simplerenv_pil_resize(one_thread):
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    out = preprocess_robot(frame)
    # SimplerEnv: Image.fromarray(image).resize((256, 256)) with PIL's default filter
    ref = preprocess(np.asarray(Image.fromarray(frame).resize((256, 256))))
    assert torch.equal(out["pixel_values"], ref["pixel_values"])
    assert out["pixel_values"].shape == (1, 3, 512, 512) and out["image_sizes"].tolist() == [[1, 1]]
    nearest = preprocess(np.asarray(Image.fromarray(frame).resize((256, 256), Image.Resampling.NEAREST)))
    assert not torch.equal(out["pixel_values"], nearest["pixel_values"])  # the filter matters


def test_bgr_gray_rgba_and_bad_input():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    base = preprocess(rgb)["pixel_values"]
    assert torch.equal(preprocess(rgb[..., ::-1].copy(), bgr=True)["pixel_values"], base)
    assert not torch.equal(preprocess(rgb[..., ::-1].copy())["pixel_values"], base)
    rgba = np.concatenate([rgb, np.full((64, 48, 1), 7, np.uint8)], -1)
    assert torch.equal(preprocess(rgba)["pixel_values"], base)
    gray = rgb[..., 0]
    g = preprocess(gray)["pixel_values"]
    assert torch.equal(g, preprocess(np.repeat(gray[..., None], 3, -1))["pixel_values"])
    with pytest.raises(ValueError, match="uint8"):
        preprocess(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        preprocess(np.zeros((4, 4, 5), np.uint8))


def test_several_images_and_collate():
    a = np.zeros((480, 640, 3), np.uint8)  # 1x2
    b = np.zeros((256, 256, 3), np.uint8)  # 1x1
    two = preprocess([a, b])
    assert two["pixel_values"].shape[0] == 3 and two["image_sizes"].tolist() == [[1, 2], [1, 1]]
    batch = collate([preprocess(b), two])
    assert batch["pixel_values"].shape == (2, 3, 3, 512, 512)
    assert batch["image_sizes"].tolist() == [[[1, 1], [0, 0]], [[1, 2], [1, 1]]]
    assert batch["pixel_values"][0, 1:].abs().sum() == 0  # padding crops are zeros


# ---- tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_llama3_tokenizer()


def test_llama3_ids_and_magma_tokens(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # Llama-3 ids documented in the fixture README / issue #36 token dump
    assert enc("\n\n") == [271] and enc("\n") == [198]
    assert enc("system") == [9125] and enc("user") == [882] and enc("assistant") == [78191]
    ids = tok.convert_tokens_to_ids(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "<image>"]
        + ["<image_start>", "<image_end>"]
    )
    assert ids == [128000, 128006, 128007, 128009, 128256, 128257, 128259, 128260]
    assert tok.vocab_size == 128000  # base vocabulary: what action decoding uses
    assert len(tok) == 128261
    assert tok.pad_token_id == 128256 and tok.eos_token_id == 128009 and tok.bos_token_id == 128000
    assert tok.decode([128257]) == "<image>"
    # action tokens are ordinary base-vocabulary tokens, one id each
    assert all(enc(tok.decode([i])) == [i] for i in (127744, 127857, 127872, 127999))


def test_chat_template_gives_magmas_double_bos_prompt(tok):
    sys_t, task = "You are agent that can see, talk and act.", "pick coke can"
    convs = [
        {"role": "system", "content": sys_t},
        {"role": "user", "content": f"<image>\nWhat action should the robot take to {task}?"},
    ]
    prompt = tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace("<image>", "<image_start><image><image_end>")
    ids = tok(prompt)["input_ids"]  # add_special_tokens=True, as MagmaProcessor does
    text = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # MAGMA_FACTS §1.2 (issue #36 dump)
    want = (
        [128000, 128000, 128006, 9125, 128007, 271] + text(sys_t) + [128009, 128006, 882, 128007, 271]
        + [128259, 128257, 128260, 198] + text(f"What action should the robot take to {task}?")
        + [128009, 128006, 78191, 128007, 271]
    )  # fmt: skip
    assert ids == want
    assert tok(prompt, add_special_tokens=False)["input_ids"] == want[1:]


def test_processor_config_from_checkpoint(tmp_path):
    from magma_ros.model.processor import ProcessorConfig

    cfg = ProcessorConfig.from_pretrained(FIXTURES / "magma_tiny" / "tiny_a")  # the released values
    assert cfg == ProcessorConfig() and cfg.num_crops == 4 and cfg.base_img_size == 512
    (tmp_path / "preprocessor_config.json").write_text('{"num_crops": 1, "base_img_size": 512}')
    one = ProcessorConfig.from_pretrained(tmp_path)
    out = preprocess(np.zeros((480, 640, 3), np.uint8), one)
    assert out["image_sizes"].tolist() == [[1, 1]] and out["pixel_values"].shape[0] == 1
