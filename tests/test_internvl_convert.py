"""InternVL checkpoint conversion: HF native / remote-code layouts <-> Orbax, round trips and error reporting."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import InternVLForConditionalGeneration

from recogdrive_jax.convert import internvl as cv
from recogdrive_jax.data.tokenizer import build_tokenizer
from recogdrive_jax.models import internvl as iv
from test_internvl_parity import hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # the tiny config's vocabulary and special-token ids


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    cfg = iv.get_config("tiny")
    tm = hf_model(cfg, seed=7)
    d = str(tmp_path_factory.mktemp("hf"))
    tm.save_pretrained(d, max_shard_size="200KB")  # sharded + index JSON
    tokenizer.save_pretrained(d)
    return cfg, tm, d


def _logits(tm, ids, pv):
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids), pixel_values=pv).logits.numpy()


def test_native_round_trip_via_cli(hf_dir, tmp_path):
    cfg, tm, d = hf_dir
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    assert cv.main(["--from-hf", d, "--out", str(tmp_path / "orbax")]) == 0
    cfg2, params = cv.load_params(str(tmp_path / "orbax"))
    assert cfg2 == cfg
    out = str(tmp_path / "back")
    assert cv.main(["--to-hf", str(tmp_path / "orbax"), "--out", out, "--dtype", "float32",
                    "--max-shard-size", "150KB"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    tm2 = InternVLForConditionalGeneration.from_pretrained(out).eval()
    sd1, sd2 = tm.state_dict(), tm2.state_dict()
    assert set(sd1) == set(sd2)
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=0, atol=0, msg=k)
    # the Orbax params run in the Flax model and match transformers
    ids = np.array([[1, 3] + [5] * 4 + [4, 9, 10, 11]])
    pv = torch.randn(1, 3, 56, 56)
    jm = cv.model_from_params(cfg2, params)
    got = jm(jnp.asarray(ids), None, jnp.asarray(pv.numpy().transpose(0, 2, 3, 1)))["logits"]
    np.testing.assert_allclose(np.asarray(got), _logits(tm2, ids, pv), atol=1e-4, rtol=0)


def test_remote_layout_round_trip(hf_dir, tmp_path):
    cfg, tm, d = hf_dir
    params = cv.hf_to_params(cv.TensorSource(d), cfg)
    files = cv.save_hf(params, cfg, str(tmp_path / "remote"), layout="remote", dtype="float32")
    with open(tmp_path / "remote" / "config.json") as f:
        rc = json.load(f)
    assert rc["architectures"] == ["InternVLChatModel"] and "llm_config" in rc
    assert iv.load_hf_config(str(tmp_path / "remote")) == cfg
    src = cv.TensorSource(str(tmp_path / "remote"))
    assert src.layout == "remote" and src.keys() == set(cv.expected_keys(cfg, "remote"))
    assert "vision_model.encoder.layers.1.attn.qkv.weight" in src.keys() and "mlp1.3.bias" in src.keys()
    back = cv.hf_to_params(src, cfg)
    for (p, a), (_, b) in zip(cv.flat_params(params), cv.flat_params(back)):
        np.testing.assert_array_equal(a, b, err_msg=".".join(p))
    # the fused qkv rows are (q | k | v), the native split
    qkv = src.get("vision_model.encoder.layers.0.attn.qkv.weight")
    hd = cfg.vision_config.hidden_size
    np.testing.assert_array_equal(qkv[hd:2 * hd],
                                  tm.state_dict()["model.vision_tower.encoder.layer.0.attention.k_proj.weight"])
    assert files == ["model.safetensors"]


def test_legacy_native_prefixes_accepted():
    cfg = iv.get_config("tiny")
    sd = {k: v.detach().numpy() for k, v in hf_model(cfg, seed=1).state_dict().items()}
    legacy = {}
    for k, v in sd.items():
        for new, old in (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.",
                                                                     "multi_modal_projector."),
                         ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
            if k.startswith(new):
                k = old + k[len(new):]
                break
        legacy[k] = v
    a = cv.hf_to_params(cv.TensorSource(sd), cfg)
    b = cv.hf_to_params(cv.TensorSource(legacy, layout="native"), cfg)
    for (_, x), (_, y) in zip(cv.flat_params(a), cv.flat_params(b)):
        np.testing.assert_array_equal(x, y)


def test_errors_list_keys_and_shapes(tmp_path):
    cfg = iv.get_config("tiny")
    sd = {k: v.detach().numpy() for k, v in hf_model(cfg, seed=2).state_dict().items()}
    bad = dict(sd)
    del bad["model.language_model.layers.1.mlp.up_proj.weight"]
    del bad["model.vision_tower.encoder.layer.0.lambda_1"]
    bad["model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(cv.CheckpointKeyError) as e:
        cv.hf_to_params(cv.TensorSource(bad), cfg)
    msg = str(e.value)
    assert "missing (2)" in msg and "layers.1.mlp.up_proj.weight" in msg and "lambda_1" in msg
    assert "unexpected (1)" in msg and "model.extra.weight" in msg
    wrong = dict(sd)
    wrong["model.language_model.norm.weight"] = np.zeros(65, np.float32)
    wrong["model.multi_modal_projector.linear_1.weight"] = np.zeros((64, 10), np.float32)
    with pytest.raises(cv.CheckpointKeyError, match="shape mismatches") as e:
        cv.hf_to_params(cv.TensorSource(wrong), cfg)
    assert "norm.weight" in str(e.value) and "linear_1.weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cv.TensorSource(str(tmp_path))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(cv.CheckpointKeyError, match="layout"):
        cv.TensorSource(str(tmp_path))


def test_config_round_trips():
    for name in iv.VARIANTS:
        cfg = iv.get_config(name)
        for layout in ("native", "remote"):
            back = iv.config_from_hf(json.loads(json.dumps(iv.config_to_hf(cfg, layout))))
            assert back == cfg, (name, layout)
    c8 = iv.get_config("internvl3_8b")
    assert (c8.llm_config.hidden_size, c8.llm_config.num_key_value_heads, c8.num_image_token) == (3584, 4, 256)
    with pytest.raises(ValueError, match="InternLM2|Qwen2"):
        iv.config_from_hf({"vision_config": {}, "llm_config": {"architectures": ["InternLM2ForCausalLM"],
                                                               "model_type": "internlm2"}})
    with pytest.raises(KeyError, match="known"):
        iv.get_config("internvl3_4b")


def test_module_cli_dispatch(hf_dir, tmp_path):
    _, _, d = hf_dir
    r = subprocess.run([sys.executable, "-m", "recogdrive_jax.convert", "internvl", "--from-hf", d, "--out",
                        str(tmp_path / "o"), "--dtype", "bfloat16"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    _, params = cv.load_params(str(tmp_path / "o"))
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------ the tie flag

def tied_tiny():
    cfg = iv.get_config("tiny")
    return dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=True))


def test_transformers_major_ties_on_the_top_level_flag():
    """The installed transformers (5.x) ties InternVL on the top-level flag, which `native_tie_flag` reads for
    configs saved by 5.x; 4.x read text_config's (covered by the version rule below)."""
    import transformers
    from transformers import InternVLConfig
    assert int(transformers.__version__.split(".")[0]) == 5, transformers.__version__
    d = iv.config_to_hf(iv.get_config("tiny"), "native")
    for top in (True, False):
        kw = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
        kw.update(tie_word_embeddings=top, text_config={**d["text_config"], "tie_word_embeddings": not top})
        tm = InternVLForConditionalGeneration(InternVLConfig(**kw))
        assert (tm.lm_head.weight.data_ptr() == tm.model.language_model.embed_tokens.weight.data_ptr()) == top


@pytest.mark.parametrize("version,top,text,want", [
    ("5.25.0", True, False, True), ("5.0.0", False, True, False), ("4.52.4", True, False, False),
    ("4.52.4", None, True, True), (None, None, None, True), (None, None, False, False), (None, False, True, False)])
def test_native_tie_flag_follows_the_saving_transformers_major(version, top, text, want):
    d = iv.config_to_hf(iv.get_config("tiny"), "native")
    d.pop("tie_word_embeddings")
    d["text_config"].pop("tie_word_embeddings")
    if version is not None:
        d["transformers_version"] = version
    if top is not None:
        d["tie_word_embeddings"] = top
    if text is not None:
        d["text_config"]["tie_word_embeddings"] = text
    assert iv.config_from_hf(d).llm_config.tie_word_embeddings is want


def test_tie_flag_round_trips_through_both_config_layouts():
    cfg = tied_tiny()
    for layout in ("native", "remote"):
        assert iv.config_from_hf(json.loads(json.dumps(iv.config_to_hf(cfg, layout)))) == cfg, layout
    # a remote-code config.json (its constructor forces both flags False) stays untied whatever llm_config says
    d = iv.config_to_hf(cfg, "remote")
    d["tie_word_embeddings"] = False
    assert not iv.config_from_hf(d).llm_config.tie_word_embeddings


def test_tied_checkpoint_converts_both_ways(tmp_path, tokenizer):
    cfg = tied_tiny()
    tm = hf_model(cfg, seed=11)
    assert tm.lm_head.weight.data_ptr() == tm.model.language_model.embed_tokens.weight.data_ptr()
    src = str(tmp_path / "tied_hf")
    tm.save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert "lm_head.weight" not in cv.TensorSource(src).keys()
    assert cv.main(["--from-hf", src, "--out", str(tmp_path / "orbax")]) == 0
    cfg2, params = cv.load_params(str(tmp_path / "orbax"))
    assert cfg2 == cfg and "lm_head" not in params["language_model"]
    # native: no lm_head on disk, transformers ties it again, same logits
    assert cv.main(["--to-hf", str(tmp_path / "orbax"), "--out", str(tmp_path / "native"), "--dtype", "float32"]) == 0
    assert "lm_head.weight" not in cv.TensorSource(str(tmp_path / "native")).keys()
    tm2 = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "native")).eval()
    assert tm2.lm_head.weight.data_ptr() == tm2.model.language_model.embed_tokens.weight.data_ptr()
    sd1, sd2 = tm.state_dict(), tm2.state_dict()
    assert set(sd1) == set(sd2)
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=0, atol=0, msg=k)
    ids, pv = np.array([[1, 3] + [5] * 4 + [4, 9, 10, 11]]), torch.randn(1, 3, 56, 56)
    jm = cv.model_from_params(cfg2, params)
    got = jm(jnp.asarray(ids), None, jnp.asarray(pv.numpy().transpose(0, 2, 3, 1)))["logits"]
    np.testing.assert_allclose(np.asarray(got), _logits(tm, ids, pv), atol=1e-4, rtol=0)
    # remote code cannot tie: the export carries lm_head = embedding and says untied
    assert cv.main(["--to-hf", str(tmp_path / "orbax"), "--out", str(tmp_path / "remote"), "--layout", "remote",
                    "--dtype", "float32"]) == 0
    rsrc = cv.TensorSource(str(tmp_path / "remote"))
    np.testing.assert_array_equal(rsrc.get("language_model.lm_head.weight"),
                                  rsrc.get("language_model.model.embed_tokens.weight"))
    rcfg = iv.load_hf_config(str(tmp_path / "remote"))
    assert not rcfg.llm_config.tie_word_embeddings
    back = cv.hf_to_params(rsrc, rcfg)
    np.testing.assert_array_equal(back["language_model"]["lm_head"]["kernel"],
                                  params["language_model"]["model"]["embed_tokens"]["embedding"].T)


def test_tied_config_with_a_different_head_is_an_error():
    cfg = tied_tiny()
    sd = {k: v.detach().numpy() for k, v in hf_model(iv.get_config("tiny"), seed=4).state_dict().items()}
    assert not np.array_equal(sd["lm_head.weight"], sd["model.language_model.embed_tokens.weight"])
    with pytest.raises(cv.CheckpointKeyError, match="lm_head.weight differs from the embedding"):
        cv.hf_to_params(cv.TensorSource(sd), cfg)
    same = dict(sd, **{"lm_head.weight": sd["model.language_model.embed_tokens.weight"]})
    assert "lm_head" not in cv.hf_to_params(cv.TensorSource(same), cfg)["language_model"]


def test_model_from_params_names_every_unfilled_or_unexpected_parameter(tmp_path):
    cfg = iv.get_config("tiny")
    params = {}
    for path, shape in cv.param_shapes(cfg).items():  # zeros: the checks run before any array is used
        cv._set(params, path, np.zeros(shape, np.float32))
    lm = dict(params["language_model"])
    del lm["lm_head"]
    bad = {**params, "language_model": lm, "extra": {"w": np.zeros(3)}}
    with pytest.raises(cv.CheckpointKeyError) as e:
        cv.model_from_params(cfg, bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert "unfilled (1): language_model.lm_head.kernel" in msg and "unexpected (1): extra.w" in msg
    assert "tie_word_embeddings=False" in msg
    with pytest.raises(cv.CheckpointKeyError, match="unexpected .*lm_head.kernel"):
        cv.model_from_params(tied_tiny(), params)
    with pytest.raises(cv.CheckpointKeyError, match="unfilled .*lm_head"):
        cv.save_hf(bad, cfg, str(tmp_path / "export"))
    assert not os.path.exists(tmp_path / "export")
