"""Hidden-state cache: bitwise round trip, both layouts, resumable writes, clear errors."""
import json

import ml_dtypes
import numpy as np
import pytest

from recogdrive_jax.data.hidden_cache import CacheError, HiddenCache


def _vlm_outputs(rng, b, L, H, left_pad=True):
    hidden = rng.normal(size=(b, L, H)).astype(ml_dtypes.bfloat16).astype(np.float32)
    lengths = rng.integers(3, L + 1, size=b)
    pos = np.arange(L)[None]
    mask = pos >= (L - lengths)[:, None] if left_pad else pos < lengths[:, None]
    return hidden, mask, lengths


@pytest.mark.parametrize("left_pad", [True, False])
def test_compact_round_trip_is_bitwise(tmp_path, left_pad):
    rng = np.random.default_rng(0)
    hidden, mask, lengths = _vlm_outputs(rng, 5, 12, 8, left_pad)
    cache = HiddenCache.create(str(tmp_path / "c"), num_samples=5, max_len=16, hidden_size=8)
    cache.write(range(5), hidden, mask)
    states, m = HiddenCache.open(str(tmp_path / "c")).read([3, 0, 4])
    for out_row, i in enumerate([3, 0, 4]):
        real = hidden[i][mask[i]]
        assert m[out_row].sum() == lengths[i]
        np.testing.assert_array_equal(states[out_row][m[out_row]], real)
        assert np.all(states[out_row][~m[out_row]] == 0)
    assert states.shape[1] == max(lengths[[3, 0, 4]])
    s2, m2 = cache.read([1], pad_to=16)
    assert s2.shape == (1, 16, 8) and m2.shape == (1, 16)


def test_upstream_layout_is_left_padded_fp32(tmp_path):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 6, 4)).astype(np.float32)  # fp32 values survive exactly
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    cache = HiddenCache.create(str(tmp_path / "u"), 2, 10, 4, layout="upstream_compatible")
    cache.write([0, 1], hidden, mask)
    states, m = cache.read([0, 1])
    assert states.shape == (2, 10, 4)
    np.testing.assert_array_equal(states[0, 6:], hidden[0, 2:])
    np.testing.assert_array_equal(states[1, 7:], hidden[1, :3])
    assert np.all(states[0, :6] == 0) and m[0].sum() == 4 and m[0, 6:].all()
    assert cache.meta["dtype"] == "float32"


def test_interrupted_write_resumes_only_missing_rows(tmp_path):
    rng = np.random.default_rng(2)
    hidden, mask, _ = _vlm_outputs(rng, 6, 8, 4)
    path = str(tmp_path / "r")
    cache = HiddenCache.create(path, 6, 8, 4)
    cache.write([0, 1, 2], hidden[:3], mask[:3])  # "killed" after three rows
    reopened = HiddenCache.create(path, 6, 8, 4)
    np.testing.assert_array_equal(reopened.pending(range(6)), [3, 4, 5])
    reopened.write([3, 4, 5], hidden[3:], mask[3:])
    assert reopened.pending(range(6)).size == 0
    states, m = reopened.read(range(6))
    for i in range(6):
        np.testing.assert_array_equal(states[i][m[i]], hidden[i][mask[i]])


def test_errors_name_sizes_and_paths(tmp_path):
    path = str(tmp_path / "e")
    cache = HiddenCache.create(path, 3, 8, 16)
    with pytest.raises(CacheError, match="hidden size 16 does not match config.planner.vl_dim=1536"):
        cache.check_hidden_size(1536)
    with pytest.raises(CacheError, match="different geometry"):
        HiddenCache.create(path, 3, 8, 32)
    with pytest.raises(CacheError, match="never written"):
        cache.read([1])
    with pytest.raises(CacheError, match="no meta.json"):
        HiddenCache.open(str(tmp_path / "nothing"))
    with pytest.raises(CacheError, match="layout"):
        HiddenCache.create(str(tmp_path / "x"), 1, 1, 1, layout="padded")
    meta = json.load(open(f"{path}/meta.json"))
    assert meta["layout"] == "compact" and meta["dtype"] == "bfloat16"


def test_missing_chunk_is_an_error_naming_the_rows(tmp_path):
    """A finished row whose chunk file is gone must not read back as zeros (the fill value) and train silently."""
    rng = np.random.default_rng(3)
    hidden, mask, _ = _vlm_outputs(rng, 4, 6, 4)
    hidden[3] = 0.0  # an all-zero row is still stored, so it is not mistaken for a missing one
    path = str(tmp_path / "m")
    HiddenCache.create(path, 4, 6, 4).write(range(4), hidden, mask)
    cache = HiddenCache.open(path)
    np.testing.assert_array_equal(cache.read([3])[0], 0.0)
    for row in (1, 2):
        chunk = tmp_path / "m" / "hidden" / "c" / str(row) / "0" / "0"
        assert chunk.is_file()
        chunk.unlink()
    with pytest.raises(CacheError, match=r"/hidden: the chunks of rows \[1, 2\] are missing"):
        cache.read([0, 2, 1, 3])
    states, m = cache.read([0, 3])  # the intact rows still read
    np.testing.assert_array_equal(states[0][m[0]], hidden[0][mask[0]])


@pytest.mark.parametrize("layout", ["compact", "upstream_compatible"])
def test_non_finite_rows_are_refused_on_write_and_reported_on_read(tmp_path, layout):
    rng = np.random.default_rng(4)
    hidden, mask, _ = _vlm_outputs(rng, 3, 6, 4)
    bad = hidden.copy()
    bad[1, mask[1].argmax()] = np.nan
    bad[2][mask[2]] = np.inf
    cache = HiddenCache.create(str(tmp_path / "n"), 3, 6, 4, layout=layout)
    with pytest.raises(CacheError, match=r"rows \[1, 2\] are not finite"):
        cache.write(range(3), bad, mask)
    np.testing.assert_array_equal(cache.pending(range(3)), [0, 1, 2])  # nothing of the batch was written
    cache.write(range(3), hidden, mask)
    # a row damaged on disk (written behind the cache's back) is caught when read, named, not trained on
    cache._hidden[1].write(np.full((6, 4), np.nan, cache._hidden.dtype.numpy_dtype)).result()
    with pytest.raises(CacheError, match=r"rows \[1\] hold non-finite values"):
        HiddenCache.open(str(tmp_path / "n")).read([0, 1, 2])
    cache.read([0, 2])
