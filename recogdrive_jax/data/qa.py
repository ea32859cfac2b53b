"""Grain pipeline over a QA mixture (meta JSON of InternVL chat JSONL files).

Every row is parsed and validated when the index is built (before the first step): malformed JSON, a row that is
not `{"image"?, "conversations": [{"from", "value"}, ...]}`, a missing image file or one whose header PIL cannot
read, or a `<image>` count that differs from the number of images raises `QADataError` naming the file and line —
or, with `skip_bad_rows=True`, the row is dropped and counted in `QAStats`. Image data is decoded only when a
sample is built (decoding a 10⁶-image mixture up front would take hours): a file that fails then (truncated,
corrupt) goes through `row_errors`, which names the file and line as well and raises or, with
`skip_bad_rows=True`, skips the sample. `repeat_time` follows upstream
(`data/qa_records.repeat_rows`: < 1 a seeded subset, integer part repeats, fractional part adds a seeded subset),
deterministic per seed. Images are loaded as uint8 HxWx3 arrays in the map step; `transform` (the InternVL
tiling + template + tokenisation hook, `data/tiling.py` / `data/template.py`) turns a sample into model inputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Callable

import grain.python as gp
import numpy as np
from PIL import Image

from recogdrive_jax.data.grain_pipeline import sharded_dataset
from recogdrive_jax.data.qa_records import repeat_rows
from recogdrive_jax.data.tiling import DECODE_ERRORS, ImageError, open_rgb
from recogdrive_jax.errors import UserError

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt", "system")


class QADataError(UserError):
    pass


@dataclasses.dataclass
class QAStats:
    rows_read: int = 0
    bad_rows: int = 0
    bad_reasons: list = dataclasses.field(default_factory=list)  # first 100 "file:line: reason"
    per_dataset: dict = dataclasses.field(default_factory=dict)  # name -> rows after repeat_time
    total: int = 0


def where(record: dict) -> str:
    """`annotation.jsonl:line` of an index record, for messages."""
    return f"{record.get('annotation', record.get('dataset'))}:{record.get('line')}"


@contextlib.contextmanager
def row_errors(record: dict, skip_bad_rows: bool):
    """Turns a sample-building failure of `record` into an error naming its JSONL file and line: an undecodable
    image raises QADataError, or with `skip_bad_rows` a `template.SampleError`, which the batcher skips and
    counts (`GroupedBatches.skipped`); a SampleError (e.g. truncated image tokens) gains the location."""
    from recogdrive_jax.data.template import SampleError
    try:
        yield
    except ImageError as e:
        raise (SampleError if skip_bad_rows else QADataError)(
            f"{where(record)}: {e}" + ("" if skip_bad_rows else "; fix or remove the row, or set "
                                       "config.data.skip_bad_rows=True to skip such rows")) from None
    except SampleError as e:
        raise SampleError(f"{where(record)}: {e}") from None


def _image_size(path: str, sizes: dict) -> tuple[int, int]:
    """(width, height) from the file header (no decoding), cached per path."""
    if path not in sizes:
        try:
            with Image.open(path) as im:
                sizes[path] = tuple(im.size)
        except DECODE_ERRORS as e:
            raise ImageError(f"cannot read image {path}: {e}") from None
    return sizes[path]


def _validate_row(line: str, root: str, where: str, sizes: dict | None = None) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise QADataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise QADataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise QADataError(f"{where}: 'conversations' must be a non-empty list")
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise QADataError(f"{where}: conversations[{k}] must be {{'from': one of {ROLES}, 'value': str}}")
    im = row.get("image")
    if im is None:
        images = []
    elif isinstance(im, str):
        images = [im]
    elif isinstance(im, list) and all(isinstance(p, str) for p in im):
        images = im
    else:
        raise QADataError(f"{where}: 'image' must be a path or a list of paths")
    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in images]
    for p in paths:
        if not os.path.isfile(p):
            raise QADataError(f"{where}: image file not found: {p}")
    n_tok = sum(t["value"].count(IMAGE_TOKEN) for t in conv if t["from"] == "human")
    if n_tok != len(paths):
        raise QADataError(f"{where}: {n_tok} '{IMAGE_TOKEN}' placeholders but {len(paths)} images")
    out = {"id": str(row.get("id", "")), "image_paths": paths, "conversations": conv}
    if sizes is not None:
        try:
            out["image_sizes"] = [_image_size(p, sizes) for p in paths]
        except ImageError as e:
            raise QADataError(f"{where}: {e}") from None
    return out


def load_meta(meta_path: str) -> dict:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise QADataError(f"{meta_path}: cannot read meta JSON ({e})") from e
    if not isinstance(meta, dict) or not meta:
        raise QADataError(f"{meta_path}: expected a non-empty object {{name: {{root, annotation, repeat_time}}}}")
    for name, d in meta.items():
        for key in ("root", "annotation"):
            if not isinstance(d, dict) or not isinstance(d.get(key), str):
                raise QADataError(f"{meta_path}: dataset '{name}' needs a string '{key}'")
        rt = d.get("repeat_time", 1)
        if not isinstance(rt, (int, float)) or rt <= 0:
            raise QADataError(f"{meta_path}: dataset '{name}' has repeat_time {rt!r}, expected a number > 0")
    return meta


def build_index(meta_path: str, seed: int = 0, skip_bad_rows: bool = False) -> tuple[list[dict], QAStats]:
    """Validated rows of the mixture after repeat_time, in meta order (shuffling happens in the pipeline)."""
    meta = load_meta(meta_path)
    stats = QAStats()
    records = []
    sizes: dict = {}  # image path -> (w, h), read once
    for d_i, (name, d) in enumerate(meta.items()):
        ann = d["annotation"]
        if not os.path.isabs(ann) and not os.path.exists(ann):
            ann = os.path.join(os.path.dirname(meta_path), ann)
        try:
            f = open(ann)
        except OSError as e:
            raise QADataError(f"{meta_path}: dataset '{name}': cannot open annotation {ann} ({e})") from e
        rows = []
        with f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                stats.rows_read += 1
                try:
                    rows.append(dict(_validate_row(line, d["root"], f"{ann}:{ln}", sizes), dataset=name,
                                     annotation=ann, line=ln))
                except QADataError as e:
                    if not skip_bad_rows:
                        raise
                    stats.bad_rows += 1
                    if len(stats.bad_reasons) < 100:
                        stats.bad_reasons.append(str(e))
        rng = np.random.default_rng(np.random.SeedSequence([seed, d_i]))
        idx = repeat_rows(len(rows), float(d.get("repeat_time", 1)), rng)
        records.extend(rows[int(i)] for i in idx)
        stats.per_dataset[name] = len(idx)
    stats.total = len(records)
    return records, stats


class QASource(gp.RandomAccessDataSource):
    """Random access over validated mixture rows; loads images on access."""

    def __init__(self, records: list[dict], load_images: bool = True):
        self._records = records
        self._load = load_images  # undecodable images raise QADataError naming the file and line

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict:
        r = self._records[int(i)]
        images = []
        if self._load:
            with row_errors(r, skip_bad_rows=False):
                images = [np.asarray(open_rgb(p), np.uint8) for p in r["image_paths"]]
        return dict(index=np.int64(i), id=r["id"], dataset=r["dataset"], image_paths=list(r["image_paths"]),
                    images=images, conversations=r["conversations"])

    def __repr__(self) -> str:
        return f"QASource(n={len(self._records)})"


def qa_dataset(meta_path: str, *, transform: Callable[[dict], dict] | None = None, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = 1, batch_size: int | None = None,
               shard_options: gp.ShardOptions | None = None, skip_bad_rows: bool = False,
               load_images: bool = True, drop_remainder: bool = True) -> tuple[gp.IterDataset, QAStats]:
    """The QA mixture as a checkpointable Grain `IterDataset` (+ index statistics).

    Samples: {index, id, dataset, image_paths, images: [HxWx3 uint8], conversations}, then `transform(sample)`.
    Sharded by JAX process (`ShardByJaxProcess` by default), shuffled per seed (a new permutation each epoch),
    batched only when `batch_size` is given (transformed samples must then have fixed shapes)."""
    records, stats = build_index(meta_path, seed=seed, skip_bad_rows=skip_bad_rows)
    if not records:
        raise QADataError(f"{meta_path}: the mixture is empty")
    ds = sharded_dataset(QASource(records, load_images), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         shard_options=shard_options, transform=transform, batch_size=batch_size,
                         drop_remainder=drop_remainder)
    return ds, stats
