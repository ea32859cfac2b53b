"""QA mixture arithmetic shared by the QA pipeline (data/qa.py) and the SFT batcher: `repeat_time` and cheap
per-record token/tile estimates.

`repeat_time` follows upstream (`LazySupervisedDataset`): < 1 keeps that fraction of the rows (a seeded random
subset), an integer > 1 repeats the rows; a fractional part above 1 adds that fraction once more.

Length-grouped batching (data/length_grouping.py) needs every sample's length before the epoch starts:
`estimate_lengths` gives text tokenized without the image strings + the image tokens of the tile grid read from the
image header, used only to group similar lengths (the real length of the built sample picks its bucket).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from recogdrive_jax.data import template as tpl
from recogdrive_jax.data.tiling import candidate_grids, closest_grid
from recogdrive_jax.errors import UserError


class MixtureError(UserError):
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


def num_tiles(width: int, height: int, scfg: tpl.SampleConfig) -> int:
    """Tiles `tiling.dynamic_tiles` makes of a width×height image (incl. the thumbnail)."""
    if not scfg.dynamic_image_size:
        return 1
    i, j = closest_grid(width, height, candidate_grids(scfg.min_dynamic_patch, scfg.max_dynamic_patch),
                        scfg.image_size)
    return i * j + (1 if scfg.use_thumbnail and i * j > 1 else 0)


def estimate_lengths(records: list[dict], tok, scfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N], tiles [N]) per record of `data/qa.build_index` (`conversations`, `image_paths`); image sizes
    come from the records' `image_sizes` (read by build_index) or the file headers (no decoding)."""
    from PIL import Image
    scfg = tpl.sample_config(scfg)
    sizes: dict[str, int] = {}
    tiles = np.zeros(len(records), np.int64)
    texts = []
    for n, r in enumerate(records):
        t = 0
        for k, p in enumerate(r["image_paths"]):
            if p not in sizes:
                if "image_sizes" in r:  # read by build_index
                    sizes[p] = num_tiles(*r["image_sizes"][k], scfg)
                else:
                    try:
                        with Image.open(p) as im:
                            sizes[p] = num_tiles(*im.size, scfg)
                    except OSError as e:
                        raise MixtureError(f"{r.get('annotation', r.get('dataset'))}:{r.get('line')}: cannot open "
                                           f"image {p!r}: {e}") from e
            t += sizes[p]
        tiles[n] = t
        sys_msg = "" if scfg.system_message is None else f"<|im_start|>system\n{scfg.system_message}<|im_end|>\n"
        body = "".join(f"<|im_start|>{'user' if c.get('from') == 'human' else 'assistant'}\n"
                       f"{str(c.get('value', '')).replace(tpl.IMAGE_PLACEHOLDER, '')}<|im_end|>\n"
                       for c in r["conversations"] if c.get("from") != "system")
        texts.append(sys_msg + body)
    n_text = np.array([len(x) for x in tok(texts, add_special_tokens=False).input_ids], np.int64) if texts else \
        np.zeros(0, np.int64)
    n_img = np.array([len(r["image_paths"]) for r in records], np.int64)
    lengths = n_text + tiles * scfg.num_image_token + 2 * n_img
    return np.minimum(lengths, scfg.max_seq_length), tiles
