"""The VLM stages on `gs://` (through `recogdrive_jax.storage`), against the GCS emulator of tests/gcs_emulator.py:
the model config, tokenizer and HF export written into the bucket, `init_from` read back from it (an HF export is
converted once into the next run's gs:// workdir), a tiny `sft` run that writes everything there and resumes, and
the one-line refusal of a pipeline step whose stage still writes local files only."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from gcs_emulator import BUCKET, emulator, gcs, no_local_gs_dirs, objects  # noqa: F401  (fixtures)

from recogdrive_jax import configs, stage_configs, storage
from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.train.checkpoint import flat_by_path
from recogdrive_jax.train.metrics import read_metrics
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import hf_export
from recogdrive_jax.vlm.tokenizer import load_or_build_tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))


def _one_device():
    return mesh_lib.make_mesh(None, devices=jax.devices()[:1])


def test_model_files_export_and_init_from_round_trip_through_gcs(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = f"gs://{BUCKET}/vlm/sft"
    model = stage_configs.model_block(variant="tiny")
    resolved = vlm_ckpt.resolve_model(model, None, run)  # random init, tokenizer generated
    tok = load_or_build_tokenizer(resolved, run)
    cfg = resolved.cfg
    vlm_ckpt.save_model_files(cfg, tok, run)
    mdef = vlm_ckpt.module_def(cfg, "float32")
    rng = np.random.default_rng(0)  # any values will do (and cost no init compilation)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), mdef.abstract_params())
    export = ml_collections.ConfigDict(dict(at_end=True, each_eval=False, layout="native", dtype="float32",
                                            max_shard_size="5GB"))
    hf_export.export_hf(params, cfg, tok, f"{run}/hf_export", export)
    got = objects(run)
    for want in ("recogdrive_internvl.json", "tokenizer/tokenizer.json", "hf_export/config.json",
                 "hf_export/model.safetensors", "hf_export/tokenizer.json", "hf_export/preprocessor_config.json"):
        assert f"vlm/sft/{want}" in got, (want, got)

    again = vlm_ckpt.resolve_model(model, None, run)  # a resumed run finds its own tokenizer in the bucket
    assert again.tokenizer_dir == f"{run}/tokenizer"
    assert load_or_build_tokenizer(again, run).get_vocab() == tok.get_vocab()

    # A later stage starts from the gs:// export: converted once into its own gs:// workdir, tokenizer from the bucket.
    nxt = f"gs://{BUCKET}/vlm/cache"
    later = vlm_ckpt.resolve_model(stage_configs.model_block(variant="tiny", init_from=f"{run}/hf_export"), None, nxt)
    assert later.params_path == f"{nxt}/init/params" and later.tokenizer_dir == f"{run}/hf_export"
    assert f"vlm/cache/init/{vlm_ckpt.CONVERTED_MARKER}" in objects(nxt)
    assert later.cfg == cfg
    loaded = vlm_ckpt.load_params(later, vlm_ckpt.module_def(later.cfg, "float32"), _one_device())
    want, have = flat_by_path(params), flat_by_path(loaded)
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(have[k]), np.asarray(want[k]), err_msg=k)
    exported = load_or_build_tokenizer(later, nxt).get_vocab()  # the export adds a processor-only <video>
    assert {t: exported.get(t) for t in tok.get_vocab()} == tok.get_vocab()
    no_local_gs_dirs(tmp_path)


def _tiny_sft(steps: int) -> ml_collections.ConfigDict:
    c = configs.load_config_file(os.path.join(TESTS, "configs", "tiny_sft.py")).get_config()
    c.data.synthetic_scenes = 2  # synthetic QA: regenerated into local scratch for a gs:// workdir
    c.data.tile_buckets = (4,)  # its trajectory rows carry history frames
    c.train.num_steps = steps
    c.train.checkpoint_every = 2
    c.export.at_end = True
    c.export.dtype = "float32"
    return c


@pytest.mark.slow  # two tiny sft runs, ~60 s on 2 cores; the non-slow cover is the round trip above
def test_sft_on_gcs_writes_everything_there_and_resumes(gcs, tmp_path, monkeypatch):
    """`sft --workdir=gs://...`: checkpoints, metrics, config.json, model config, tokenizer and HF export land in
    the bucket; a rerun with more steps resumes from the bucket's checkpoint; `init_from` reads the run back."""
    from recogdrive_jax import main
    from recogdrive_jax.stages import sft
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the local scratch QA goes here (storage.local_scratch)
    os.makedirs(tmp_path / "tmp")
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    run = f"gs://{BUCKET}/sft"
    assert main.check_workdir(run, "sft") == run  # no refusal any more
    sft.run(_tiny_sft(2), run)
    got = objects(run)
    for want in ("config.json", "metrics.jsonl", "checkpoints/2/commit_success.txt", "recogdrive_internvl.json",
                 "tokenizer/tokenizer.json", "hf_export/config.json", "hf_export/model.safetensors"):
        assert f"sft/{want}" in got, (want, got)
    assert not any(o.startswith("sft/qa/") for o in got)  # regenerable QA stays local

    sft.run(_tiny_sft(3), run)
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3]  # resumed at 2, not retrained
    assert "sft/checkpoints/3/commit_success.txt" in objects(run)

    later = vlm_ckpt.resolve_model(stage_configs.model_block(variant="tiny", init_from=run), None,
                                   f"gs://{BUCKET}/cache")  # what a cache step's model.init_from=gs://.../sft reads
    assert later.params_path == run and later.tokenizer_dir == f"{run}/tokenizer"
    load_or_build_tokenizer(later, f"gs://{BUCKET}/cache")
    params = vlm_ckpt.load_params(later, vlm_ckpt.module_def(later.cfg, "float32"), _one_device())
    assert jax.tree.leaves(params)
    no_local_gs_dirs(tmp_path)
    assert not os.path.exists(tmp_path / "sft")


def test_pipeline_step_that_writes_local_files_refuses_gcs_before_any_step(gcs, tmp_path, monkeypatch):
    from recogdrive_jax import stages
    from recogdrive_jax.stages import pipeline
    monkeypatch.chdir(tmp_path)
    fake = configs.load_config_file(os.path.join(os.path.dirname(TESTS), "configs", "navsim_fake.py"))
    c = fake.get_config("il,navsim")  # navsim_convert still writes its scene store with local-only writers
    ran = []
    monkeypatch.setattr(stages, "get_stage", lambda name: ran.append(name))
    url = f"gs://{BUCKET}/pipe"
    with pytest.raises(stages.RemoteWorkdirError, match=rf"pipeline step 'navsim': --workdir={url}/navsim: stage "
                                                        r"'navsim_convert' writes local files only"):
        pipeline.run(c, url)
    assert ran == []
    no_local_gs_dirs(tmp_path)


@pytest.mark.slow  # a tiny ppo update and a one-route eval_nav, ~2-4 min on 2 cores
def test_ppo_and_eval_nav_on_gcs(gcs, tmp_path, monkeypatch):
    """`ppo` on a gs:// workdir (model files, checkpoint, metrics there) and `eval_nav` scoring that gs:// run into
    another gs:// workdir (metrics.json, episodes, PNG strip, results table)."""
    from test_ppo import _load_config, _tiny_stage_config

    from recogdrive_jax.stages import eval_nav as eval_stage
    from recogdrive_jax.stages import ppo as ppo_stage
    monkeypatch.chdir(tmp_path)
    run = f"gs://{BUCKET}/ppo"
    ppo_stage.run(_tiny_stage_config(tmp_path), run)
    got = objects(run)
    for want in ("config.json", "metrics.jsonl", "checkpoints/1/commit_success.txt", "recogdrive_internvl.json",
                 "tokenizer/tokenizer.json"):
        assert f"ppo/{want}" in got, (want, got)

    ev = _load_config("eval_nav")
    ev.eval_nav.checkpoint = run
    ev.eval_nav.splits = "in_distribution"
    ev.eval_nav.max_routes, ev.eval_nav.max_new_tokens, ev.eval_nav.num_render = 1, 12, 1
    ev.model.value_hidden = (16, 8)
    ev.prompt.max_prompt_len = 1024
    ev.env.n_train_routes, ev.env.n_eval_routes = 4, 2
    out = f"gs://{BUCKET}/eval_nav"
    res = eval_stage.run(ev, out)
    assert res["in_distribution/num_routes"] == 1
    got = objects(out)
    for want in ("config.json", "eval_nav/in_distribution/metrics.json", "eval_nav/in_distribution/episodes.jsonl",
                 "eval_nav/in_distribution/episodes/ep_000.png", "eval_nav/results.md"):
        assert f"eval_nav/{want}" in got, (want, got)
    no_local_gs_dirs(tmp_path)


@pytest.mark.slow  # a 2-step sft and a 9-scene cache, ~1-2 min on 2 cores
def test_pipeline_sft_then_cache_on_gcs(gcs, tmp_path, monkeypatch):
    """A pipeline on gs:// runs each step in WORKDIR/<step>; the cache step starts from `model.init_from =
    {workdir}/sft`, i.e. gs://.../sft (its checkpoint, model config and tokenizer in the bucket)."""
    from recogdrive_jax.data.hidden_cache import HiddenCache
    from recogdrive_jax.stages import pipeline
    monkeypatch.chdir(tmp_path)
    cache = stage_configs.cache_stage_config()
    cache.model.update(init_from="{workdir}/sft", dtype="float32", remat=False)
    cache.data.update(num_train_scenes=6, num_eval_scenes=3)
    cache.cache.update(batch_size=4, max_dynamic_patch=1, use_thumbnail=False, system_message="")
    c = configs.pipeline_config(["sft", "cache"], {"sft": _tiny_sft(2), "cache": cache})
    url = f"gs://{BUCKET}/pipe"
    out = pipeline.run(c, url)
    assert set(out) == {"sft", "cache"}
    got = objects(url)
    for want in ("pipeline_summary.json", "sft/checkpoints/2/commit_success.txt", "sft/tokenizer/tokenizer.json",
                 "cache/config.json", "cache/train/meta.json", "cache/eval/meta.json"):
        assert f"pipe/{want}" in got, (want, got)
    assert json.loads(storage.read_text(f"{url}/cache/config.json"))["model"]["init_from"] == f"{url}/sft"
    train = HiddenCache.open(f"{url}/cache/train")
    assert list(train.pending(range(6))) == []
    no_local_gs_dirs(tmp_path)
