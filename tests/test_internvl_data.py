"""Tiling, normalisation, template/label masks, build_sample and the small tokenizer vs upstream-style references."""
import numpy as np
import pytest
from PIL import Image

from recogdrive_jax.data import template as tpl
from recogdrive_jax.data import tiling
from recogdrive_jax.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer
from recogdrive_jax.models import internvl as iv
from torch_ref import internvl_ref as ref


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(str(d))
    return load_tokenizer(str(d))


def test_candidate_grid_order():
    g = tiling.candidate_grids(1, 12)
    assert len(g) == 35 and g[:6] == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2)]
    for lo, hi in ((1, 6), (1, 12), (1, 16), (2, 9), (4, 4)):
        assert tiling.candidate_grids(lo, hi) == ref.target_ratios_for(lo, hi)


def test_grid_selection_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, size=(1500, 2))]
    # exact ties of |w/h - i/j|: aspect ratios equal to a grid's, at areas both sides of the 0.5 threshold
    sizes += [(448 * i * s // 4, 448 * j * s // 4) for i in range(1, 5) for j in range(1, 5) for s in (1, 2, 3, 5, 8)]
    sizes += [(1920, 1080), (1000, 1000), (1, 3000), (3000, 1), (448, 448), (449, 448), (317, 317)]
    for max_num in (6, 12, 16):
        grids = ref.target_ratios_for(1, max_num)
        for w, h in sizes:
            want = ref.find_closest_aspect_ratio(w / h, grids, w, h, 448)
            assert tiling.closest_grid(w, h, tiling.candidate_grids(1, max_num), 448) == want, (w, h, max_num)


def test_spec_examples():
    g12, g16 = tiling.candidate_grids(1, 12), tiling.candidate_grids(1, 16)
    assert tiling.closest_grid(1920, 1080, g12, 448) == (4, 2)
    assert tiling.closest_grid(1920, 1080, g16, 448) == (5, 3)
    assert tiling.closest_grid(1000, 1000, g12, 448) == (3, 3)


@pytest.mark.parametrize("size", [(40, 23), (23, 40), (28, 28), (100, 31), (9, 70), (57, 57)])
def test_tiles_pixels_match_reference(size):
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = tiling.load_image(img, image_size=14, max_num=6)
    want = ref.load_image(img, input_size=14, max_num=6).numpy().transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_normalize_and_grayscale():
    g = Image.fromarray(np.full((20, 20), 128, np.uint8), mode="L")
    x = tiling.load_image(g, image_size=14, max_num=1)
    np.testing.assert_allclose(x[0, 0, 0], (128 / 255 - np.array(tiling.IMAGENET_MEAN)) / tiling.IMAGENET_STD,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="min_num"):
        tiling.candidate_grids(3, 2)


def test_tokenizer_special_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    cfg = iv.get_config("tiny")
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<img>") == cfg.img_start_token_id
    assert tok.eos_token_id == cfg.eos_token_id and tok.pad_token_id == cfg.pad_token_id
    assert len(tok) <= cfg.llm_config.vocab_size
    ids = tok("<img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False).input_ids
    assert ids == [3, 5, 5, 4]
    text = "turn left at the junction, speed 3.5 m/s"
    assert tok.decode(tok(text).input_ids) == text


CONV = [{"from": "human", "value": "<image>\nwhat is ahead of the ego vehicle?"},
        {"from": "gpt", "value": "a red truck, keep lane."},
        {"from": "human", "value": "and the light?"},
        {"from": "gpt", "value": "green"}]


@pytest.mark.parametrize("system", [tpl.INTERNVL2_5_SYSTEM, "You are a driving agent."])
def test_template_ids_match_reference(tok, system):
    n_tok, tiles = 4, [3]
    turns = tpl.expand_images(CONV, tiles, n_tok)
    got = tpl.tokenize_conversation(turns, tok, system_message=system, max_seq_length=200, pad_to_max_length=True)
    want = ref.preprocess_internvl2_5([CONV], tok, [n_tok * t for t in tiles], system, 200)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"].numpy())
    np.testing.assert_array_equal(got["labels"], want["labels"].numpy())
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"].numpy().astype(np.int32))
    # labels cover exactly the answers + <|im_end|>
    kept = got["labels"][got["labels"] != -100]
    assert tok.decode(kept) == "a red truck, keep lane.<|im_end|>green<|im_end|>"
    text = tok.decode(got["input_ids"][got["attention_mask"] == 1])
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<img>")
    assert "<IMG_CONTEXT>" * 12 + "</img>\nwhat is ahead" in text


def test_build_sample(tok):
    cfg = iv.get_config("tiny")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 120, 3), dtype=np.uint8), rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)]
    conv = [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\ndescribe"}, {"from": "gpt", "value": "ok"}]
    s = tpl.build_sample(conv, images, tok, tpl.sample_config(cfg, max_seq_length=128, system_message=None))
    assert s["input_ids"].shape == s["labels"].shape == s["attention_mask"].shape == (128,)
    assert list(s["num_tiles"]) == [3, 1]  # (2,1) grid + thumbnail, then a single tile
    assert s["pixel_values"].shape == (4, 56, 56, 3) and list(s["image_flags"]) == [1, 1, 1, 1]
    assert int((s["input_ids"] == cfg.image_token_id).sum()) == cfg.num_image_token * 4
    assert s["input_ids"][0] == 1  # no system turn
    # text-only: one dummy tile with flag 0; dict/ConfigDict-style config
    t = tpl.build_sample([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], [], tok,
                         {"max_seq_length": 64, "image_size": 56, "num_image_token": 4})
    assert t["pixel_values"].shape == (1, 56, 56, 3) and list(t["image_flags"]) == [0]
    with pytest.raises(tpl.SampleError, match="truncates the image"):
        tpl.build_sample(conv, images, tok, tpl.sample_config(cfg, max_seq_length=20))
    with pytest.raises(tpl.SampleError, match="placeholder"):
        tpl.build_sample([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], images[:1], tok, cfg)
    with pytest.raises(tpl.SampleError, match="'from'"):
        tpl.build_sample([{"from": "bot", "value": "x"}], [], tok, cfg)


def test_chat_prompt(tok):
    p = tpl.chat_prompt("what now?", [2], num_image_token=4, system_message="S")
    assert p == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 8 +
                 "</img>\nwhat now?<|im_end|>\n<|im_start|>assistant\n")
