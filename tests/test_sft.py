"""Stage `sft`: label masks, repeat_time, length-grouped/packed batches, the chunked loss, freeze flags, exact
mid-epoch resume and the transformers-loadable export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from recogdrive_jax import stage_configs
from recogdrive_jax.data import length_grouping as lg
from recogdrive_jax.data import qa as qa_index
from recogdrive_jax.data import qa_records
from recogdrive_jax.data import template as tpl
from recogdrive_jax.data.tokenizer import build_tokenizer
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.stages import sft
from recogdrive_jax.train import optim
from recogdrive_jax.train.metrics import read_metrics
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import lm_loss, qa_batches

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_toy_qa(out: str, n: int, repeat_time=1, name="toy", multi_turn_every=5) -> str:
    """n single-image QA rows (every `multi_turn_every`-th has two turns, every 7th is text-only)."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        for i in range(n):
            color = list(COLORS)[i % 3]
            row = {"id": i}
            conv = [{"from": "human", "value": "what color is the road ahead?"},
                    {"from": "gpt", "value": f"the road is {color}"}]
            if i % 7:
                img = np.clip(np.array(COLORS[color], np.int64) + rng.integers(0, 30, (60, 120, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(out, "images", f"{i}.png"))
                row["image"] = f"images/{i}.png"
                conv[0]["value"] = "<image>\n" + conv[0]["value"]
            if i % multi_turn_every == 0:
                conv += [{"from": "human", "value": "and then?"}, {"from": "gpt", "value": "keep lane"}]
            row["conversations"] = conv
            f.write(json.dumps(row) + "\n")
    meta = os.path.join(out, "meta.json")
    with open(meta, "w") as f:
        json.dump({name: {"root": out, "annotation": os.path.join(out, f"{name}.jsonl"), "repeat_time": repeat_time,
                          "length": n}}, f)
    return meta


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def toy_meta(tmp_path_factory):
    return write_toy_qa(str(tmp_path_factory.mktemp("qa")), 48, repeat_time=2)


def _data_cfg(**kw):
    d = stage_configs.data_block(max_seq_length=256, max_dynamic_patch=6, length_buckets=(128, 256), tile_buckets=(4,))
    d.update(kw)
    return d


def _answers(conv):
    return [t["value"] + "<|im_end|>" for t in conv if t["from"] == "gpt"]


@pytest.mark.parametrize("pack", [False, True])
def test_labels_cover_exactly_the_assistant_tokens(tok, toy_meta, pack):
    cfg = iv.get_config("tiny", max_dynamic_patch=6)
    dcfg = _data_cfg(pack=True, length_buckets=(256, 512), tile_buckets=(4, 8, 12)) if pack else _data_cfg()
    plan = qa_batches.build_batches(toy_meta, tok, cfg, dcfg, global_batch=4, seed=0)
    records, _ = qa_index.build_index(toy_meta, seed=0)
    rows = plan.local_rows(0) + plan.local_rows(1)
    batch = plan.collate(rows)
    ctx = cfg.image_token_id
    for r, row in enumerate(rows):
        labels, ids, seg = batch["labels"][r], batch["input_ids"][r], batch["segment_ids"][r]
        kept = labels != -100
        np.testing.assert_array_equal(labels[kept], ids[kept])  # labels are the tokens themselves, unshifted
        want = "".join("".join(_answers(records[i]["conversations"])) for i in row)
        assert tok.decode(ids[kept]) == want
        # every label-free real token is system / user / role prefix / image; pads are -100 and segment 0
        assert (seg[batch["attention_mask"][r] == 0] == 0).all() and (labels[seg == 0] == -100).all()
        assert sorted(set(seg[seg > 0])) == list(range(1, len(row) + 1))
        n_img = sum(len(records[i]["image_paths"]) for i in row)
        assert int((ids == ctx).sum()) == cfg.num_image_token * 3 * n_img  # (2,1) grid + thumbnail per image
        for s in range(1, len(row) + 1):  # positions restart in each packed segment
            p = batch["positions"][r][seg == s]
            np.testing.assert_array_equal(p, np.arange(len(p)))
    # the batch's real tiles packed flat (one tile group: 8 rows on one device), padded to a bucket of the total
    n_tiles = 3 * sum(len(records[i]["image_paths"]) for row in rows for i in row)
    assert batch["image_flags"].shape == (1, lg.bucket_for(n_tiles, plan._group_buckets(len(rows))))
    assert int(batch["image_flags"].sum()) == n_tiles and batch["image_flags"][0, :n_tiles].all()
    if pack:
        assert max(len(r) for r in plan.rows) > 1


def test_repeat_time_arithmetic(tmp_path, tok):
    rng = np.random.default_rng(0)
    assert len(qa_records.repeat_rows(10, 1, rng)) == 10
    r2 = qa_records.repeat_rows(10, 2, rng)
    assert len(r2) == 20 and (np.bincount(r2) == 2).all()
    half = qa_records.repeat_rows(10, 0.5, rng)
    assert len(half) == 5 and len(set(half)) == 5
    assert len(qa_records.repeat_rows(10, 1.5, rng)) == 15
    assert len(qa_records.repeat_rows(665, 0.2, rng)) == 133  # llava at 0.2 (seed 000)
    a = write_toy_qa(str(tmp_path / "a"), 10, repeat_time=2, name="a")
    b = write_toy_qa(str(tmp_path / "b"), 10, repeat_time=0.3, name="b")
    meta = {**json.load(open(a)), **json.load(open(b))}
    path = str(tmp_path / "meta.json")
    json.dump(meta, open(path, "w"))
    recs, stats = qa_index.build_index(path)
    assert [r["dataset"] for r in recs].count("a") == 20 and [r["dataset"] for r in recs].count("b") == 3
    assert stats.per_dataset == {"a": 20, "b": 3}
    assert qa_index.build_index(path)[0] == recs  # deterministic
    meta["b"]["repeat_time"] = 0
    json.dump(meta, open(path, "w"))
    with pytest.raises(qa_index.QADataError, match="'b'.*repeat_time"):
        qa_index.build_index(path)
    # estimated lengths bound the real ones from above only loosely, but tiles are exact
    scfg = qa_batches.sample_cfg(iv.get_config("tiny", max_dynamic_patch=6), _data_cfg())
    lengths, tiles = qa_records.estimate_lengths(recs[:6], tok, scfg)
    for r, n, t in zip(recs[:6], lengths, tiles):
        s = tpl.build_sample(r["conversations"], r["image_paths"], tok, scfg)
        assert int(np.sum(s["image_flags"] > 0)) == t and abs(len(s["input_ids"]) - n) <= 4


def test_length_grouping_static_shapes_and_packing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 1000, 500)
    samples = {i: {"input_ids": np.ones(n, np.int32), "labels": np.ones(n, np.int32),
                   "pixel_values": np.zeros((1, 4, 4, 3), np.float32), "image_flags": np.zeros(1, np.int32)}
               for i, n in enumerate(lengths)}
    kw = dict(global_batch=16, process_index=0, process_count=2, buckets=lg.default_buckets(1024, 128),
              tile_buckets=(1,), image_size=4, pad_token_id=0, seed=3)
    plan = lg.GroupedBatches(samples.__getitem__, lengths, np.zeros(500), **kw)
    assert plan.buckets == (128, 256, 512, 1024) and plan.local_batch == 8
    shapes = lg.shapes_in_epoch(plan)
    assert len(shapes) <= 4
    # grouping: the padding waste is far below random batching
    waste = np.mean([1 - np.mean([lengths[r[0]] for r in plan.local_rows(k)]) / max(lengths[r[0]] for r in
                     plan.local_rows(k)) for k in range(plan.batches_per_epoch)])
    assert waste < 0.15
    # epochs are different permutations, each sample once per epoch (both processes together)
    e0 = np.concatenate([plan.epoch_plan(0).ravel()])
    assert len(set(e0)) == len(e0) == plan.batches_per_epoch * 16
    assert not np.array_equal(plan.epoch_plan(0), plan.epoch_plan(1))
    packed = lg.GroupedBatches(samples.__getitem__, lengths, np.zeros(500), pack=True, **kw)
    assert all(packed.row_lengths <= 1024) and sorted(i for r in packed.rows for i in r) == list(range(500))
    assert len(packed.rows) < 0.7 * 500
    b = packed.batch(0)
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in packed.buckets
    # iterator state round trip
    it = plan.iterator(num_threads=1, prefetch=2)
    next(it)
    state = it.get_state()
    x = next(it)
    it2 = plan.iterator(num_threads=1, prefetch=2)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["input_ids"], x["input_ids"])


def test_chunked_loss_and_packing_match_unpacked_reference(tok, toy_meta):
    cfg = iv.get_config("tiny", max_dynamic_patch=6)
    mdef = vlm_ckpt.module_def(cfg, "float32")
    params = mdef.init(jax.random.key(0))
    plan = qa_batches.build_batches(toy_meta, tok, cfg, _data_cfg(length_buckets=(512,), tile_buckets=(8,)), global_batch=4,
                             seed=0)
    rows = plan.local_rows(0)
    batch = jax.tree.map(jnp.asarray, plan.collate(rows))

    @jax.jit
    def sums(p, b):
        return lm_loss.forward_sums(mdef.bind(p), b, None, chunk=64, drop_path=False)

    @jax.jit
    def reference(p, b):  # the model's own full-logits forward + models.internvl.lm_loss
        n, m = b["image_flags"].shape
        out = mdef.bind(p)(b["input_ids"], b["attention_mask"], b["pixel_values"].reshape(n * m, 56, 56, 3),
                           b["image_flags"].reshape(-1))
        return iv.lm_loss(out["logits"], b["labels"])

    nll, correct, count = sums(params, batch)
    loss, n = reference(params, batch)
    np.testing.assert_allclose(float(nll / count), float(loss), rtol=1e-5)
    assert int(count) == int(n) and 0 <= int(correct) <= int(count)
    # the 4 samples packed into 2 rows (+ 2 empty) give the same summed loss (segments do not see each other)
    flat = [i for r in rows for i in r]
    packed = jax.tree.map(jnp.asarray, plan.collate([flat[:2], flat[2:], [], []]))  # same shape: no recompile
    pn, _, pc = sums(params, packed)
    assert int(pc) == int(count)
    np.testing.assert_allclose(float(pn), float(nll), rtol=2e-5)


def test_freeze_flags_map_to_param_paths():
    m = stage_configs.model_block(freeze_vision=True, freeze_mlp=True)
    pats = vlm_ckpt.freeze_patterns(m)
    mdef = vlm_ckpt.module_def(iv.get_config("tiny"), "float32")
    labels = optim.freeze_labels(mdef.abstract_params(), pats)
    flat = {optim.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert all(v == "frozen" for k, v in flat.items() if k.startswith(("vision_model/", "mlp1/")))
    assert all(v == "train" for k, v in flat.items() if k.startswith("language_model/"))
    assert vlm_ckpt.freeze_patterns(stage_configs.model_block()) == ()


def _config_file(rel):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), rel)
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_upstream_recipe_configs():
    for size, hidden in (("2b", 1536), ("8b", 3584)):
        c = _config_file(f"configs/recogdrive_{size}/sft.py")
        assert c.stage == "sft" and c.optim.lr == 4e-5 and c.optim.warmup_ratio == 0.1
        assert c.optim.weight_decay == 0.05 and c.optim.schedule == "cosine" and c.model.dtype == "bfloat16"
        assert c.model.remat and c.data.max_seq_length == 12288 and c.data.max_dynamic_patch == 16
        assert c.train.batch_size == 128 and c.train.batch_size // c.optim.grad_accum >= 1
        assert iv.get_config(c.model.variant).llm_config.hidden_size == hidden
        assert max(qa_batches.default_tile_buckets(iv.get_config(c.model.variant, max_dynamic_patch=16))) == 17
        cfg = c.copy_and_resolve_references()
        derived = sft.derive_steps_and_accum(cfg, batches_per_epoch=1000, num_devices=64)  # 8 nodes x 8 GPUs
        assert derived["optim.grad_accum"] == 2 and derived["train.num_steps"] == 3000
        cc = _config_file(f"configs/recogdrive_{size}/cache.py")
        assert cc.stage == "cache" and cc.cache.max_dynamic_patch == 12


# ------------------------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Persistent XLA cache for this module's runs: the three runs below compile the same step once."""
    old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                           "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    try:
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


def _train_cfg(meta, steps=6, **kw):
    c = stage_configs.sft_stage_config("tiny")
    c.data = _data_cfg(meta_path=meta, length_buckets=(256,), num_workers=2)
    c.model.remat = False
    c.model.dtype = "float32"  # compiles in half the time of bf16 on CPU
    c.train.update(num_steps=steps, batch_size=8, log_every=1, checkpoint_every=3, async_checkpoint=False,
                   tensorboard=False)
    c.optim.lr = 3e-3
    c.export.at_end = False
    for k, v in kw.items():
        node = c
        for part in k.split(".")[:-1]:
            node = node[part]
        node[k.split(".")[-1]] = v
    return c


class Killed(RuntimeError):
    pass


def test_mid_epoch_resume_gives_identical_losses(toy_meta, tmp_path, monkeypatch, compile_cache):
    full = str(tmp_path / "full")
    out = sft.run(_train_cfg(toy_meta, **{"export.at_end": True}), full)
    want = [r["loss"] for r in read_metrics(full, "train")]
    assert len(want) == 6 and out["steps"] == 6 and out["tokens_per_sec"] > 0
    assert 0 <= out["last_token_acc"] <= 1

    # the killed run: batch 3 (the 4th step, after the step-3 checkpoint) raises in the data pipeline
    orig = lg.GroupedBatches.batch

    def dying(self, k):
        if k == 3:
            raise Killed("simulated kill")
        return orig(self, k)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(lg.GroupedBatches, "batch", dying)
    with pytest.raises(Exception) as e:
        sft.run(_train_cfg(toy_meta), resumed)
    assert "simulated kill" in repr(e.value) or isinstance(e.value, Killed)
    monkeypatch.setattr(lg.GroupedBatches, "batch", orig)
    assert len(read_metrics(resumed, "train")) == 3
    sft.run(_train_cfg(toy_meta), resumed)  # resumes at step 3, mid-epoch (12 batches per epoch)
    rows = {r["step"]: r["loss"] for r in read_metrics(resumed, "train")}
    assert sorted(rows) == list(range(1, 7))
    np.testing.assert_allclose([rows[s] for s in range(1, 7)], want, rtol=1e-6)

    # the finished run asked again with the text-waypoint eval (vlm/trajectory_eval.py): trains nothing, evaluates
    n_train = len(read_metrics(resumed, "train"))
    out = sft.run(_train_cfg(toy_meta, **{"eval.trajectory_scenes": 2, "eval.trajectory_batch_size": 8}), resumed)
    traj = json.load(open(os.path.join(resumed, "eval_trajectory", "metrics.json")))
    assert len(read_metrics(resumed, "train")) == n_train and out["eval_trajectory/num_scenes"] == 2
    assert traj["step"] == 6 and 0 <= traj["parse_rate"] <= 1 and np.isfinite(traj["cv_ade_all"])

    # the export loads in transformers and gives our logits
    import torch
    from transformers import InternVLForConditionalGeneration

    from recogdrive_jax.convert import internvl as conv
    hf = InternVLForConditionalGeneration.from_pretrained(os.path.join(full, "hf_export"), dtype=torch.float32)
    ids = np.array([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        lt = hf.eval()(input_ids=torch.tensor(ids)).logits.numpy()
    lj = np.asarray(conv.load_hf_model(os.path.join(full, "hf_export"))(jnp.asarray(ids))["logits"])
    np.testing.assert_allclose(lt, lj, atol=1e-4)
    assert os.path.isfile(os.path.join(full, "hf_export", "tokenizer.json"))
