"""HF export without torch: the numpy writer equals the torch writer it replaced, tensor for tensor and byte for byte,
and transformers loads it."""
import os

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as torch_save_file
from transformers import InternVLForConditionalGeneration

from recogdrive_jax.convert import internvl as cv
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.vlm import hf_export

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def torch_reference_export(params, cfg, path: str, layout: str, dtype: str) -> None:
    """The pre-numpy writer (torch `.to(dtype)` then `safetensors.torch.save_file`), one file."""
    tensors = {k: torch.from_numpy(np.array(a, np.float32)).to(TORCH_DTYPES[dtype])
               for k, a in cv.params_to_hf(params, cfg, layout)}
    torch_save_file(tensors, path, metadata={"format": "pt"})


def read_all(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_params():
    cfg = iv.get_config("tiny")
    params = cv.model_params(iv.init_model(cfg, seed=3))
    # perturb everything (zeros/ones inits would hide rounding differences)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.3, a.shape).astype(np.float32), params)
    return cfg, params


@pytest.mark.parametrize("layout,dtype", [("native", "bfloat16"), ("remote", "bfloat16"), ("native", "float16"),
                                          ("native", "float32")])
def test_numpy_export_equals_torch_export(tiny_params, tmp_path, layout, dtype):
    cfg, params = tiny_params
    files = cv.save_hf(params, cfg, str(tmp_path / "np"), layout=layout, dtype=dtype)
    assert files == ["model.safetensors"]
    ref = str(tmp_path / "ref.safetensors")
    torch_reference_export(params, cfg, ref, layout, dtype)
    got, want = read_all(str(tmp_path / "np" / "model.safetensors")), read_all(ref)
    assert list(got) == list(want) and set(got) == set(cv.expected_keys(cfg, layout))
    for k in want:
        assert got[k].dtype == want[k].dtype == TORCH_DTYPES[dtype], k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k  # same bits (bf16 rounding)
    with open(tmp_path / "np" / "model.safetensors", "rb") as f, open(ref, "rb") as g:
        assert f.read() == g.read()  # same header, order and bytes


def test_sharded_numpy_export_loads_in_transformers(tiny_params, tmp_path):
    cfg, params = tiny_params
    out = str(tmp_path / "hf")
    files = cv.save_hf(params, cfg, out, dtype="bfloat16", max_shard_size="60KB")
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    tm = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).eval()
    sd = tm.state_dict()
    ref = str(tmp_path / "ref.safetensors")
    torch_reference_export(params, cfg, ref, "native", "bfloat16")
    want = read_all(ref)
    assert set(sd) == set(want)
    for k, t in want.items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k].view(torch.int16), t.view(torch.int16)), k
    # and back: the torch-free reader gives the bf16 values exactly
    back = cv.hf_to_params(cv.TensorSource(out), cfg)
    emb = back["language_model"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(emb, want["model.language_model.embed_tokens.weight"].float().numpy())


# ------------------------------------------------------------------- a complete directory: AutoProcessor + generate

QUESTION = "what should the ego vehicle do next?"


class _NoVideo(dict):
    """Stands in for the video processor InternVLProcessor insists on (images never use it)."""


def auto_processor(path: str, monkeypatch):
    """`AutoProcessor.from_pretrained(path)`. transformers 5 builds every InternVL processor with a video processor,
    which needs torchvision; no CPU torchvision wheel exists here, so without one that single slot gets a stand-in
    and everything read from the export (tokenizer, chat template, image processor, image_seq_length) is real."""
    from transformers import AutoProcessor, InternVLProcessor
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    check = InternVLProcessor.check_argument_for_proper_class

    def check_but_video(self, name, arg):
        return _NoVideo if name == "video_processor" and isinstance(arg, _NoVideo) else check(self, name, arg)
    monkeypatch.setattr(InternVLProcessor, "check_argument_for_proper_class", check_but_video)
    return AutoProcessor.from_pretrained(path, video_processor=_NoVideo())


@pytest.fixture(scope="module")
def chat_case(tiny_params):
    """A 170x60 image (3 tiles + thumbnail), this project's prompt, tiles and greedy tokens."""
    import jax.numpy as jnp
    from PIL import Image

    from recogdrive_jax.data import template as tpl
    from recogdrive_jax.data import tiling
    from recogdrive_jax.data.tokenizer import build_tokenizer
    cfg, params = tiny_params
    tok = build_tokenizer()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 170, 3), dtype=np.uint8))
    pv = tiling.load_image(image, image_size=cfg.force_image_size, max_num=cfg.max_dynamic_patch)  # [4, 56, 56, 3]
    ids = np.asarray(tok(tpl.chat_prompt(QUESTION, [len(pv)], num_image_token=cfg.num_image_token)).input_ids)
    model = cv.model_from_params(cfg, params)
    tokens = np.asarray(iv.generate(model, jnp.asarray(ids[None]), pixel_values=jnp.asarray(pv),
                                    max_new_tokens=12))[0]
    return tok, image, pv, ids, tokens


def _export_via_cli(params, cfg, tok, out):
    conv_dir = os.path.join(os.path.dirname(out), "converted")
    cv.save_params(params, cfg, conv_dir)
    tok.save_pretrained(conv_dir)  # as `convert --from-hf` keeps the source's tokenizer
    assert cv.main(["--to-hf", conv_dir, "--out", out, "--dtype", "float32"]) == 0


def _export_via_sft(params, cfg, tok, out):
    import ml_collections

    hf_export.export_hf(params, cfg, tok, out, ml_collections.ConfigDict(dict(layout="native", dtype="float32")))


@pytest.mark.parametrize("export", [_export_via_cli, _export_via_sft], ids=["to_hf", "sft_export"])
def test_export_runs_with_autoprocessor_and_generate(tiny_params, chat_case, tmp_path, monkeypatch, export):
    cfg, params = tiny_params
    tok, image, pv, ids, tokens = chat_case
    assert len(pv) == 4 and len(set(tokens.tolist())) >= 6, tokens  # 3 tiles + thumbnail; tokens vary
    out = str(tmp_path / "export")
    export(params, cfg, tok, out)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    proc = auto_processor(out, monkeypatch)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(images=image, text=text, return_tensors="pt")
    np.testing.assert_array_equal(inputs["input_ids"].numpy()[0], ids)  # internvl2_5 prompt, 4 x 4 image tokens
    np.testing.assert_allclose(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), pv, atol=1e-6, rtol=0)
    tm = InternVLForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        got = tm.generate(**inputs, max_new_tokens=len(tokens), do_sample=False)[0, len(ids):].numpy()
    np.testing.assert_array_equal(got, tokens[:len(got)])
    assert len(got) == len(tokens) or got[-1] == cfg.eos_token_id  # stops only at <|im_end|>


def test_to_hf_without_a_tokenizer_names_the_flag(tiny_params, tmp_path):
    from recogdrive_jax.convert.hf_processor import ExportError
    cfg, params = tiny_params
    cv.save_params(params, cfg, str(tmp_path / "converted"))
    with pytest.raises(ExportError, match="--tokenizer DIR"):
        cv.to_hf(str(tmp_path / "converted"), str(tmp_path / "out"))
