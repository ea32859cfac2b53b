"""The QA mixture of a meta JSON as one flat, indexable record list, plus cheap token/tile estimates per record.

Length-grouped batching (data/length_grouping.py) needs random access to every sample and its length before the
epoch starts, so the SFT stage reads the mixture into memory here: meta JSON `{name: {"root", "annotation",
"repeat_time", "length"}}` (upstream format, DESIGN §5), each annotation an InternVL chat JSONL. `repeat_time`
follows upstream (`LazySupervisedDataset`): < 1 keeps that fraction of the rows (a seeded random subset), an
integer > 1 repeats the rows; a fractional part above 1 adds that fraction once more.

Lengths are estimates (text tokenized without the image strings + the image tokens of the tile grid read from the
image header), used only to group similar lengths; the real length of the built sample picks its bucket.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from recogdrive_jax.data import template as tpl
from recogdrive_jax.data.tiling import candidate_grids, closest_grid


class MixtureError(ValueError):
    pass


def repeat_rows(n: int, repeat_time: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices after `repeat_time` (upstream semantics, see module docstring)."""
    if not repeat_time > 0:
        raise MixtureError(f"repeat_time must be > 0, got {repeat_time!r}")
    whole, frac = int(math.floor(repeat_time)), repeat_time - math.floor(repeat_time)
    parts = [np.tile(np.arange(n), whole)] if whole else []
    if frac > 1e-9:
        k = int(n * frac)
        parts.append(np.sort(rng.permutation(n)[:k]))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _images(row: dict, root: str, where: str) -> list[str]:
    im = row.get("image")
    if im is None:
        return []
    ims = [im] if isinstance(im, str) else im
    if not isinstance(ims, list) or not all(isinstance(p, str) for p in ims):
        raise MixtureError(f"{where}: 'image' must be a path or a list of paths, got {im!r:.80}")
    return [p if os.path.isabs(p) else os.path.join(root, p) for p in ims]


def load_mixture(meta_path: str, seed: int = 0) -> list[dict]:
    """All records of the mixture: {'conversations', 'images' (absolute paths), 'source', 'row'}."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MixtureError(f"{meta_path}: cannot read the meta JSON: {e}") from e
    if not isinstance(meta, dict) or not meta:
        raise MixtureError(f"{meta_path}: expected a non-empty object {{name: {{root, annotation, repeat_time}}}}")
    base = os.path.dirname(os.path.abspath(meta_path))
    out: list[dict] = []
    for k, (name, entry) in enumerate(sorted(meta.items())):
        where = f"{meta_path}: {name!r}"
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise MixtureError(f"{where}: expected an object with 'annotation' (and 'root', 'repeat_time')")
        root = entry.get("root", "") or base
        root = root if os.path.isabs(root) else os.path.join(base, root)
        ann = entry["annotation"] if os.path.isabs(entry["annotation"]) else os.path.join(base, entry["annotation"])
        if not os.path.isfile(ann):
            raise MixtureError(f"{where}: annotation {ann!r} does not exist")
        rows = []
        with open(ann) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MixtureError(f"{ann}:{line_no}: invalid JSON: {e}") from e
                conv = row.get("conversations") if isinstance(row, dict) else None
                if not isinstance(conv, list) or not conv:
                    raise MixtureError(f"{ann}:{line_no}: expected a 'conversations' list")
                rows.append({"conversations": conv, "images": _images(row, root, f"{ann}:{line_no}"),
                             "source": name, "row": line_no})
        try:
            rt = float(entry.get("repeat_time", 1))
            keep = repeat_rows(len(rows), rt, np.random.default_rng([int(seed), k]))
        except (TypeError, ValueError) as e:
            raise MixtureError(f"{where}: repeat_time: {e}") from e
        out.extend(rows[int(i)] for i in keep)
    if not out:
        raise MixtureError(f"{meta_path}: the mixture has no rows")
    return out


def num_tiles(width: int, height: int, scfg: tpl.SampleConfig) -> int:
    """Tiles `tiling.dynamic_tiles` makes of a width×height image (incl. the thumbnail)."""
    if not scfg.dynamic_image_size:
        return 1
    i, j = closest_grid(width, height, candidate_grids(scfg.min_dynamic_patch, scfg.max_dynamic_patch),
                        scfg.image_size)
    return i * j + (1 if scfg.use_thumbnail and i * j > 1 else 0)


def estimate_lengths(records: list[dict], tok, scfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N], tiles [N]) per record; image sizes come from the file headers (no decoding)."""
    from PIL import Image
    scfg = tpl.sample_config(scfg)
    sizes: dict[str, int] = {}
    tiles = np.zeros(len(records), np.int64)
    texts = []
    for n, r in enumerate(records):
        t = 0
        for p in r["images"]:
            if p not in sizes:
                try:
                    with Image.open(p) as im:
                        sizes[p] = num_tiles(*im.size, scfg)
                except OSError as e:
                    raise MixtureError(f"{r['source']} row {r['row']}: cannot open image {p!r}: {e}") from e
            t += sizes[p]
        tiles[n] = t
        sys_msg = "" if scfg.system_message is None else f"<|im_start|>system\n{scfg.system_message}<|im_end|>\n"
        body = "".join(f"<|im_start|>{'user' if c.get('from') == 'human' else 'assistant'}\n"
                       f"{str(c.get('value', '')).replace(tpl.IMAGE_PLACEHOLDER, '')}<|im_end|>\n"
                       for c in r["conversations"] if c.get("from") != "system")
        texts.append(sys_msg + body)
    n_text = np.array([len(x) for x in tok(texts, add_special_tokens=False).input_ids], np.int64) if texts else \
        np.zeros(0, np.int64)
    n_img = np.array([sum(1 for _ in r["images"]) for r in records], np.int64)
    lengths = n_text + tiles * scfg.num_image_token + 2 * n_img
    return np.minimum(lengths, scfg.max_seq_length), tiles
