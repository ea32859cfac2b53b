"""The hidden-state cache between the VLM and the planner, in TensorStore (zarr3).

Layout of a cache directory:
  meta.json     {"num_samples", "max_len", "hidden_size", "layout", "dtype", "format_version"}
  hidden/       [N, L_max, H], one sample per chunk, zstd-compressed
  lengths/      [N] int32, one element per chunk; -1 = not written yet (the done-mask)

Layouts:
  compact              bf16, only the real tokens, stored from position 0 (right-padded with zeros);
                       ~L_real × H × 2 bytes a sample after compression of the padding.
  upstream_compatible  fp32, left-padded to `max_len` exactly as the PyTorch pipeline stores it (upstream pads
                       to 2800 and stores fp32: 2800 × H × 4 bytes a sample), so a planner reproducing an
                       upstream checkpoint sees the same padded memory.

A sample's `lengths` entry is written only after its hidden states are, so `lengths >= 0` marks finished
rows; a killed cache run reopens the directory and writes only the rest. Rows are disjoint chunks, so
several hosts write their own rows concurrently without coordination.

Damage is an error naming the rows, never silent zeros or NaN in training: `hidden/` is read with
`fill_missing_data_reads=False` (a finished row whose chunk file is gone raises instead of reading the zero fill
value; every chunk is stored, even an all-zero one), and rows with non-finite values are refused when written
and reported when read.
"""
from __future__ import annotations

import json
from typing import Sequence

import ml_dtypes
import numpy as np
import tensorstore as ts

from recogdrive_jax import storage
from recogdrive_jax.errors import UserError

LAYOUTS = ("compact", "upstream_compatible")
FORMAT_VERSION = 1


class CacheError(UserError):
    pass


def _dtype(layout: str):
    return ("bfloat16", ml_dtypes.bfloat16) if layout == "compact" else ("float32", np.float32)


def _spec(path: str, shape, dtype: str, chunk, create: bool, strict: bool = False):
    """zarr3 spec on `path`'s kvstore (`file`, or `gcs`/`s3` for a URL); `strict` (hidden/): a missing chunk is a
    read error and every written chunk is stored."""
    spec = {"driver": "zarr3", "kvstore": storage.tensorstore_kvstore(path)}
    if strict:
        spec.update(fill_missing_data_reads=False, store_data_equal_to_fill_value=True)
    if create:
        spec.update(create=True, open=True, metadata={
            "shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}],
            "fill_value": -1 if dtype == "int32" else 0})
    else:
        spec["open"] = True
    return spec


class HiddenCache:
    """Reader and (resumable) writer of one cache directory."""

    def __init__(self, path: str, meta: dict, hidden, lengths):
        self.path, self.meta = path, meta
        self._hidden, self._lengths = hidden, lengths

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, num_samples: int, max_len: int, hidden_size: int,
               layout: str = "compact") -> "HiddenCache":
        """Creates the cache, or reopens it when it exists with the same geometry (resume)."""
        if layout not in LAYOUTS:
            raise CacheError(f"cache layout {layout!r} unknown; allowed: {list(LAYOUTS)}")
        path = storage.abspath(path)
        meta = {"num_samples": int(num_samples), "max_len": int(max_len), "hidden_size": int(hidden_size),
                "layout": layout, "dtype": _dtype(layout)[0], "format_version": FORMAT_VERSION}
        meta_path = storage.join(path, "meta.json")
        if storage.exists(meta_path):
            old = json.loads(storage.read_text(meta_path))
            if old != meta:
                diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
                raise CacheError(f"{path}: an existing cache has a different geometry (existing, requested): {diff}; "
                                 "use another directory or delete it")
        storage.makedirs(path)
        hidden = ts.open(_spec(storage.join(path, "hidden"), (num_samples, max_len, hidden_size), meta["dtype"],
                               (1, max_len, hidden_size), True, strict=True)).result()
        lengths = ts.open(_spec(storage.join(path, "lengths"), (num_samples,), "int32", (1,), True)).result()
        if not storage.exists(meta_path):
            storage.write_text(meta_path, json.dumps(meta))  # atomic
        return cls(path, meta, hidden, lengths)

    @classmethod
    def open(cls, path: str) -> "HiddenCache":
        path = storage.abspath(path)
        meta_path = storage.join(path, "meta.json")
        if not storage.exists(meta_path):
            raise CacheError(f"{path} is not a hidden-state cache (no meta.json); run the `cache` stage first")
        try:
            meta = json.loads(storage.read_text(meta_path))
            for key in ("num_samples", "max_len", "hidden_size", "layout", "dtype"):
                if key not in meta:
                    raise CacheError(f"{meta_path}: field {key!r} missing")
            hidden = ts.open(_spec(storage.join(path, "hidden"), None, None, None, False, strict=True)).result()
            lengths = ts.open(_spec(storage.join(path, "lengths"), None, None, None, False)).result()
        except (json.JSONDecodeError, ValueError) as e:
            raise CacheError(f"{path}: unreadable cache: {e}") from e
        want = (meta["num_samples"], meta["max_len"], meta["hidden_size"])
        if tuple(hidden.shape) != want:
            raise CacheError(f"{path}/hidden: shape {tuple(hidden.shape)} != meta.json {want}")
        return cls(path, meta, hidden, lengths)

    # ---- properties -----------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.meta["num_samples"]

    @property
    def max_len(self) -> int:
        return self.meta["max_len"]

    @property
    def hidden_size(self) -> int:
        return self.meta["hidden_size"]

    @property
    def layout(self) -> str:
        return self.meta["layout"]

    @property
    def stored_dtype(self):
        """The numpy dtype of the stored states (bf16 compact, fp32 upstream_compatible): `read(dtype=...)` with it
        returns them exactly as stored."""
        return np.dtype(_dtype(self.layout)[1])

    def lengths(self) -> np.ndarray:
        return self._lengths.read().result()

    def done_mask(self) -> np.ndarray:
        return self.lengths() >= 0

    def pending(self, indices: Sequence[int]) -> np.ndarray:
        """The subset of `indices` not yet written."""
        indices = np.asarray(indices, np.int64)
        if len(indices) == 0:
            return indices
        done = self.done_mask()
        return indices[~done[indices]]

    def check_hidden_size(self, expected: int, key: str = "config.planner.vl_dim"):
        if self.hidden_size != expected:
            raise CacheError(f"{self.path}: cache hidden size {self.hidden_size} does not match {key}={expected}")

    # ---- write ------------------------------------------------------------------------------------------
    def write(self, indices: Sequence[int], hidden: np.ndarray, mask: np.ndarray):
        """Writes rows `indices` from VLM outputs `hidden` [b, L, H] whose real tokens are `mask` [b, L] (any
        padding side). Lengths are committed only after the hidden rows."""
        hidden, mask = np.asarray(hidden), np.asarray(mask).astype(bool)
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise CacheError(f"{self.path}: hidden states of shape {hidden.shape} do not match the cache's hidden "
                             f"size {self.hidden_size}")
        np_dtype = _dtype(self.layout)[1]
        lengths = mask.sum(-1).astype(np.int32)
        if lengths.max(initial=0) > self.max_len:
            raise CacheError(f"{self.path}: a sample has {lengths.max()} tokens > cache max_len {self.max_len}")
        reals = [hidden[row][mask[row]].astype(np_dtype) for row in range(len(indices))]  # [n, H] each
        bad = [int(idx) for idx, real in zip(indices, reals) if not np.isfinite(real.astype(np.float32)).all()]
        if bad:
            raise CacheError(f"{self.path}: the VLM's hidden states of rows {_rows(bad)} are not finite (NaN/inf); "
                             "nothing of this batch was written (check the VLM checkpoint and config.model.dtype)")
        writes = []
        for row, idx in enumerate(indices):
            real = reals[row]
            n = len(real)
            out = np.zeros((self.max_len, self.hidden_size), np_dtype)
            if self.layout == "compact":
                out[:n] = real
            else:
                out[self.max_len - n:] = real  # left padding, as upstream
            writes.append(self._hidden[int(idx)].write(out))
        for w in writes:
            w.result()
        for idx, n in zip(indices, lengths):
            self._lengths[int(idx)].write(np.int32(n)).result()

    # ---- read -------------------------------------------------------------------------------------------
    def read(self, indices: Sequence[int], pad_to: int | None = None, dtype=np.float32):
        """Returns (states [b, P, H], mask [b, P]); P = `pad_to` (static shapes for jit) or the longest row.

        compact: real tokens first, mask marks them. upstream_compatible: the padded rows as stored (P = max_len)
        with the mask of the real (right-aligned) tokens.
        """
        indices = [int(i) for i in indices]
        lengths = np.array([int(self._lengths[i].read().result()) for i in indices], np.int32)
        missing = [i for i, n in zip(indices, lengths) if n < 0]
        if missing:
            raise CacheError(f"{self.path}: rows {missing[:10]} were never written; finish the `cache` stage")
        if self.layout == "upstream_compatible":
            p = p_read = self.max_len
            mask = np.arange(p)[None] >= (p - lengths)[:, None]
        else:
            p = int(pad_to or max(int(lengths.max(initial=1)), 1))
            if p < lengths.max(initial=0):
                raise CacheError(f"{self.path}: pad_to={p} is shorter than a row of {lengths.max()} tokens")
            p_read = min(p, self.max_len)
            mask = np.arange(p)[None] < lengths[:, None]
        # a zero-length row may have no chunk in caches written before every chunk was stored: it is all padding
        futures = [self._hidden[i, :p_read].read() if n > 0 else None for i, n in zip(indices, lengths)]
        states = np.zeros((len(indices), p, self.hidden_size), dtype)
        lost = []
        for b, f in enumerate(futures):
            if f is None:
                continue
            try:
                states[b, :p_read] = f.result().astype(dtype)
            except ValueError as e:
                if "NOT_FOUND" not in str(e):
                    raise CacheError(f"{self.path}/hidden: row {indices[b]} unreadable: {e}") from None
                lost.append(indices[b])
        if lost:
            raise CacheError(f"{self.path}/hidden: the chunks of rows {_rows(lost)} are missing although lengths/ "
                             "marks them written; the cache is damaged: rerun the `cache` stage into a new directory")
        bad = [i for b, i in enumerate(indices) if not np.isfinite(states[b]).all()]
        if bad:
            raise CacheError(f"{self.path}/hidden: rows {_rows(bad)} hold non-finite values (NaN/inf); the cache is "
                             "damaged: rerun the `cache` stage into a new directory")
        return states, mask


def _rows(rows: Sequence[int], limit: int = 20) -> str:
    """`[3, 7, 9]`, or the first `limit` and a count."""
    rows = sorted(int(r) for r in rows)
    return str(rows) if len(rows) <= limit else f"{rows[:limit]}... ({len(rows)} rows)"
