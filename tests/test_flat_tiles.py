"""The SFT batch's tiles packed flat (data/length_grouping.py): the ViT runs on bucket(real tiles) tiles per tile
group instead of rows x the longest row's tiles, with the same loss and gradients as the per-row padded layout, and
the groups follow the data-parallel and gradient-accumulation splits of the batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recogdrive_jax import configs
from recogdrive_jax.data import length_grouping as lg
from recogdrive_jax.models import internvit
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.train.state import init_train_state, make_train_step, split_microbatches
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import lm_loss

T = 32  # tokens a row (tiny InternVL: 4 image tokens a 56-px tile)


def _samples(cfg, tiles, seed=0):
    """Sample i: <img> + tiles[i] x 4 context tokens + </img> + text, labels on the text; its tiles random."""
    rng = np.random.default_rng(seed)
    s, out = cfg.vision_config.image_size, {}
    for i, k in enumerate(tiles):
        n = int(rng.integers(T - 8, T + 1)) if k else int(rng.integers(8, T + 1))
        ids = rng.integers(20, cfg.llm_config.vocab_size, n).astype(np.int32)
        if k:
            ids[0], ids[1 + k * cfg.num_image_token] = cfg.img_start_token_id, cfg.img_end_token_id
            ids[1:1 + k * cfg.num_image_token] = cfg.image_token_id
        labels = np.where(np.arange(n) >= n // 2, ids, -100).astype(np.int32)
        pv = rng.standard_normal((max(k, 1), s, s, 3)).astype(np.float32) * (1.0 if k else 0.0)
        out[i] = {"input_ids": ids, "labels": labels, "pixel_values": pv,
                  "image_flags": np.full(max(k, 1), 1 if k else 0, np.int32)}
    return out


def _plan(cfg, tiles, global_batch, **kw):
    samples = _samples(cfg, tiles)
    return lg.GroupedBatches(samples.__getitem__, np.full(len(tiles), T), np.asarray(tiles), global_batch=global_batch,
                             process_index=0, process_count=1, buckets=(T,), tile_buckets=(4,),
                             image_size=cfg.vision_config.image_size, pad_token_id=cfg.pad_token_id, **kw)


def _real_tiles(pv, flags):
    """The real tiles of a [G, N, ...] batch in order (the flattened order merge_image_embeds consumes)."""
    return pv.reshape(-1, *pv.shape[2:])[flags.reshape(-1) > 0]


def test_default_group_buckets_and_groups_follow_devices_and_microbatches():
    assert lg.default_group_tile_buckets(26) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 26)
    assert lg.default_group_tile_buckets(3) == (1, 2, 3)
    assert lg.default_group_tile_buckets(1) == (1,)
    rng = np.random.default_rng(1)
    for b, devices, accum in [(16, 4, 2), (8, 2, 4), (8, 8, 1), (8, 1, 1), (4, 4, 2), (6, 2, 2)]:
        group = lg.tile_group_of_rows(b, devices, accum)
        per_row = [rng.standard_normal((int(k), 1, 1, 3)).astype(np.float32) for k in rng.integers(0, 4, b)]
        pv, flags = lg.flat_tiles(per_row, group, lg.default_group_tile_buckets(64), 1)
        if (b // devices) % accum:
            np.testing.assert_array_equal(group, np.arange(b))  # no such split: one group a row
            devices = 1  # (GSPMD reshards that batch; the micro-batches still get their own rows' tiles)
        else:
            assert pv.shape[0] == devices * accum
        # split rows and groups as train/state.split_microbatches, then contiguously over the devices: each
        # (micro-batch, device) piece's tiles are exactly its rows' tiles, in row order
        rows_idx = np.asarray(split_microbatches(jnp.arange(b), accum))  # [accum, b / accum]
        gpv, gflags = (np.asarray(x) for x in split_microbatches((jnp.asarray(pv), jnp.asarray(flags)), accum))
        for j in range(accum):
            row_parts = np.split(rows_idx[j], devices)
            pv_parts, flag_parts = np.split(gpv[j], devices), np.split(gflags[j], devices)
            for rows, p, f in zip(row_parts, pv_parts, flag_parts):
                want = np.concatenate([per_row[r] for r in rows])
                np.testing.assert_array_equal(_real_tiles(p, f), want)


def test_flat_layout_equals_the_padded_layout_and_the_vit_sees_bucket_of_the_real_tiles(monkeypatch):
    cfg = iv.get_config("tiny")
    tiles = [2, 1, 3, 0]  # a text-only row too
    flat = _plan(cfg, tiles, 4)  # one device, no accumulation: one group
    padded = _plan(cfg, tiles, 4, group_tile_buckets=(4,))  # the per-row layout: [rows, max tiles bucket]
    padded.set_tile_groups(4, 1)
    rows = flat.local_rows(0)
    fb, pb = flat.collate(rows), padded.collate(rows)
    assert fb["pixel_values"].shape[:2] == (1, 6) and pb["pixel_values"].shape[:2] == (4, 4)
    np.testing.assert_array_equal(_real_tiles(fb["pixel_values"], fb["image_flags"]),
                                  _real_tiles(pb["pixel_values"], pb["image_flags"]))
    for k in ("input_ids", "labels", "attention_mask", "segment_ids", "positions"):
        np.testing.assert_array_equal(fb[k], pb[k])

    seen = []
    vit_call = internvit.InternViT.__call__

    def spy(self, pixel_values, **kw):
        seen.append(pixel_values.shape[0])
        return vit_call(self, pixel_values, **kw)

    monkeypatch.setattr(internvit.InternViT, "__call__", spy)
    mdef = vlm_ckpt.module_def(cfg, "float32")
    params = mdef.init(jax.random.key(0))
    f = jax.jit(jax.value_and_grad(lm_loss.make_loss_fn(mdef, chunk=0, drop_path=False, grad_accum=1), has_aux=True))
    (lf, _), gf = f(params, jax.tree.map(jnp.asarray, fb), jax.random.key(1))
    (lp, _), gp = f(params, jax.tree.map(jnp.asarray, pb), jax.random.key(1))
    assert seen == [lg.bucket_for(sum(tiles), flat.group_tile_buckets), 16]  # 6 real -> 6 tiles; padded 4 x 4
    np.testing.assert_allclose(float(lf), float(lp), rtol=1e-6)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=str(path[0]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gf["vision_model"]))  # the ViT is trained


def test_group_total_over_the_largest_bucket_names_the_key():
    cfg = iv.get_config("tiny")
    plan = _plan(cfg, [3, 3], 2, group_tile_buckets=(4,))
    with pytest.raises(lg.BucketError, match="config.data.group_tile_buckets"):
        plan.collate(plan.local_rows(0))
    with pytest.raises(lg.BucketError, match="group_tile_buckets"):
        _plan(cfg, [1, 1], 2, group_tile_buckets=(0, 4))


def test_train_step_on_8_devices_with_accumulation_equals_the_per_row_layout():
    """Data parallel over 8 devices x 2 micro-batches: the flat groups (one per device and micro-batch) give the
    per-row layout's loss and update."""
    cfg = iv.get_config("tiny")
    c = configs.base_config()
    rt = runtime_lib.from_config(c)
    assert rt.batch_shards == 8
    tiles = list(np.random.default_rng(2).integers(0, 4, 32))
    flat, padded = _plan(cfg, tiles, 32), _plan(cfg, tiles, 32, group_tile_buckets=(4,))
    flat.set_tile_groups(8, 2)
    padded.set_tile_groups(32, 1)  # one group a row
    rows = flat.local_rows(0)
    fb, pb = flat.collate(rows), padded.collate(rows)
    assert fb["pixel_values"].shape[0] == 16 and pb["pixel_values"].shape[:2] == (32, 4)
    assert fb["pixel_values"].shape[1] < 8  # a group's two rows' tiles, bucketed: fewer than 2 x 4
    mdef = vlm_ckpt.module_def(cfg, "float32")
    params = mdef.init(jax.random.key(0))
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(lm_loss.make_loss_fn(mdef, chunk=0, drop_path=False, grad_accum=2), tx,
                                   grad_accum=2))
    out = []
    for b in (fb, pb):
        state, m = step(init_train_state(params, tx), rt.global_batch(b), jax.random.key(1))
        out.append((float(m["loss"]), jax.device_get(state.params)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
