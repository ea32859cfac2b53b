"""Stage `cache`: round trip into the planner's `load_split`, both layouts, resume without recomputation, errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recogdrive_jax import stage_configs
from recogdrive_jax.convert import internvl as conv
from recogdrive_jax.data import planner_data
from recogdrive_jax.data.hidden_cache import CacheError, HiddenCache
from recogdrive_jax.data.tokenizer import build_tokenizer
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.sim import world
from recogdrive_jax.stages import cache as cache_stage
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import tokenizer as vlm_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-layout checkpoint of the tiny VLM with its tokenizer (what `init_from` may point at)."""
    d = str(tmp_path_factory.mktemp("tiny_hf"))
    cfg = iv.get_config("tiny")
    params = conv.model_params(iv.init_model(cfg, seed=3))
    conv.save_hf(jax.tree.map(np.asarray, params), cfg, d, dtype="float32")
    build_tokenizer(d)
    return d


def _config(hf_dir, **cache_kw):
    c = stage_configs.cache_stage_config()
    c.model.init_from = hf_dir
    c.model.dtype = "float32"
    c.data.num_train_scenes = 6
    c.data.num_eval_scenes = 3
    c.cache.update(dict(batch_size=4, max_dynamic_patch=6, **cache_kw))
    return c


ORIG_MAKE_FORWARD = cache_stage.make_forward


class Killed(RuntimeError):
    pass


class Counter:
    """Wraps `make_forward` to count forward calls (and optionally die after `die_after`)."""

    def __init__(self, monkeypatch, die_after=None):
        self.calls, self.rows, self.die_after = 0, 0, die_after
        orig = ORIG_MAKE_FORWARD

        def make(mdef, mesh):
            fwd = orig(mdef, mesh)

            def counted(params, batch):
                if self.die_after is not None and self.calls >= self.die_after:
                    raise Killed("simulated kill")
                self.calls += 1
                self.rows += int((batch["attention_mask"].sum(1) > 0).sum())
                return fwd(params, batch)
            return counted
        monkeypatch.setattr(cache_stage, "make_forward", make)


@pytest.fixture(scope="module")
def compact_run(hf_dir, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("cache_compact"))
    out = cache_stage.run(_config(hf_dir), wd)
    return wd, out


def _reference_states(hf_dir, scene, workdir):
    """The tiny VLM's last hidden states of one scene's driving prompt, computed directly (fp32)."""
    resolved = vlm_ckpt.resolve_model(stage_configs.model_block(init_from=hf_dir), None, workdir)  # converts into workdir/init
    tok = vlm_tokenizer.load_or_build_tokenizer(resolved, workdir)
    model = conv.load_hf_model(hf_dir, resolved.cfg)
    builder = cache_stage.PromptBuilder(resolved.cfg, tok, _config(hf_dir).cache)
    ids, pv = builder.sample(scene)
    out = model(jnp.asarray(ids)[None], None, jnp.asarray(pv))
    return np.asarray(out["hidden_states"][0]), ids


def test_cache_round_trip_through_load_split(hf_dir, compact_run, tmp_path):
    wd, out = compact_run
    assert out["hidden_size"] == 64 and out["train_finished"] == 6 and out["eval_finished"] == 3
    c = _config(hf_dir)
    from recogdrive_jax import configs
    data = configs.planner_data_block(cache_dir=wd, num_train_scenes=6, num_eval_scenes=3)
    split = planner_data.load_split(data, "train", 64)
    want_scenes = planner_data.synthetic_scenes(c.data, "train")
    np.testing.assert_array_equal(split.scenes.seed, want_scenes.seed)
    np.testing.assert_array_equal(split.scenes.expert, want_scenes.expert)
    batch = split.batch(np.array([0, 4]))
    states, mask = batch["cond"]["vl_states"], batch["cond"]["vl_mask"]
    assert states.shape[-1] == 64 and states.shape[:2] == mask.shape
    for row, i in enumerate((0, 4)):
        ref, ids = _reference_states(hf_dir, world.index_scene(want_scenes, i), str(tmp_path))
        n = len(ids)
        assert int(mask[row].sum()) == n and mask[row, :n].all()  # compact: real tokens first
        np.testing.assert_allclose(states[row, :n], ref, atol=0.05 * np.abs(ref).max(), rtol=0.02)  # bf16 storage
        assert np.abs(states[row, n:]).max(initial=0) == 0
    ev = planner_data.load_split(data, "eval", 64)
    assert len(ev) == 3 and ev.cache.layout == "compact" and ev.cache.meta["dtype"] == "bfloat16"


def test_upstream_compatible_layout_left_pads_fp32(hf_dir, compact_run, tmp_path):
    wd_c, _ = compact_run
    wd = str(tmp_path / "up")
    max_len = HiddenCache.open(os.path.join(wd_c, "train")).max_len + 16
    cache_stage.run(_config(hf_dir, layout="upstream_compatible", max_len=max_len, splits="train"), wd)
    up, cp = HiddenCache.open(os.path.join(wd, "train")), HiddenCache.open(os.path.join(wd_c, "train"))
    assert up.meta["dtype"] == "float32" and up.max_len == max_len
    s_up, m_up = up.read([1, 2])
    s_cp, m_cp = cp.read([1, 2])
    for r in range(2):
        n = int(m_cp[r].sum())
        assert int(m_up[r].sum()) == n and m_up[r, max_len - n:].all()  # right-aligned real tokens
        np.testing.assert_allclose(s_up[r, max_len - n:], s_cp[r, :n], atol=0.02 * np.abs(s_up[r]).max())
        assert not s_up[r, :max_len - n].any()
    with pytest.raises(Exception, match="max_len"):
        cache_stage.run(_config(hf_dir, layout="upstream_compatible", max_len=32, splits="eval"),
                        str(tmp_path / "short"))


def test_interrupted_cache_resumes_without_recomputing(hf_dir, compact_run, tmp_path, monkeypatch):
    wd = str(tmp_path / "resume")
    killer = Counter(monkeypatch, die_after=1)  # train has 6 rows = 2 batches of 4: the 2nd forward dies
    with pytest.raises(Killed):
        cache_stage.run(_config(hf_dir), wd)
    assert killer.calls == 1
    assert HiddenCache.open(os.path.join(wd, "train")).done_mask().sum() == 4
    counter = Counter(monkeypatch)
    out = cache_stage.run(_config(hf_dir), wd)
    assert counter.rows == 2 + 3 and counter.calls == 2  # the 2 unfinished train rows + the 3 eval rows
    assert out["train_finished"] == 6 and out["eval_finished"] == 3
    again = Counter(monkeypatch)
    cache_stage.run(_config(hf_dir), wd)
    assert again.calls == 0  # everything cached: no forward at all
    a, _ = HiddenCache.open(os.path.join(wd, "train")).read(range(6))
    b, _ = HiddenCache.open(os.path.join(compact_run[0], "train")).read(range(6))
    np.testing.assert_array_equal(a, b)  # resumed rows are the rows an uninterrupted run writes


def test_hidden_size_mismatch_names_both_sizes(compact_run):
    from recogdrive_jax import configs
    data = configs.planner_data_block(cache_dir=compact_run[0], num_train_scenes=6, num_eval_scenes=3)
    with pytest.raises(CacheError, match=r"64.*vl_dim=1536|1536.*64"):
        planner_data.load_split(data, "train", 1536)


def test_other_scenes_in_the_same_workdir_are_refused(hf_dir, compact_run):
    c = _config(hf_dir, splits="eval")
    c.data.scene_seed = 5
    with pytest.raises(ValueError, match="scenes.npz.*differ"):
        cache_stage.run(c, compact_run[0])


def test_image_tokens_cache_stores_the_image_positions_only(hf_dir, compact_run, tmp_path):
    """cache.tokens='image': each row holds exactly the <IMG_CONTEXT> positions of the full ('all') cache's row,
    bitwise (the same forward); a bad value is a start-up error naming the key."""
    wd = str(tmp_path / "image")
    out = cache_stage.run(_config(hf_dir, tokens="image", splits="train"), wd)
    img, full = HiddenCache.open(os.path.join(wd, "train")), HiddenCache.open(os.path.join(compact_run[0], "train"))
    s_img, m_img = img.read(range(6))
    s_all, m_all = full.read(range(6))
    scenes = planner_data.synthetic_scenes(_config(hf_dir).data, "train")
    resolved = vlm_ckpt.resolve_model(stage_configs.model_block(init_from=hf_dir), None, str(tmp_path / "ref"))
    builder = cache_stage.PromptBuilder(resolved.cfg, vlm_tokenizer.load_or_build_tokenizer(resolved, str(tmp_path)),
                                        _config(hf_dir).cache)
    for i in range(6):
        ids, _ = builder.sample(world.index_scene(scenes, i))
        at = np.flatnonzero(ids == resolved.cfg.image_token_id)
        assert 0 < len(at) < int(m_all[i].sum()) and int(m_img[i].sum()) == len(at) == img.max_len == out["max_len"]
        np.testing.assert_array_equal(s_img[i, :len(at)], s_all[i, at])
    with pytest.raises(Exception, match=r"config\.cache\.tokens.*'text'"):
        cache_stage.run(_config(hf_dir, tokens="text"), str(tmp_path / "bad"))
