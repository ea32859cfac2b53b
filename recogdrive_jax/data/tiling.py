"""InternVL dynamic tiling and ImageNet normalisation (spec §3, `dynamic_preprocess` in IV/train/dataset.py).

An image becomes up to `max_num` 448² tiles on the grid (i cols, j rows) whose aspect ratio is closest to the
image's (ties go to the larger grid only if the image has more than half its pixels), plus a 448² thumbnail of
the whole image when there is more than one tile. Output tiles are NHWC float32.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from recogdrive_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What PIL raises for a file that is not a readable image (truncated, corrupt, not an image, too large).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageError(UserError):
    """An image file that cannot be decoded; the message names the file (data/qa.py adds the JSONL row)."""


def open_rgb(path) -> Image.Image:
    """The decoded RGB image at `path`, or ImageError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image {path}: {e}") from None


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (i, j) with min_num ≤ i·j ≤ max_num in upstream's order: `sorted(set(...), key=i·j)`.

    Equal-product grids keep the iteration order of the Python set, exactly as upstream (HF's processor orders
    them differently); it only matters for exact ties.
    """
    if not 1 <= min_num <= max_num:
        raise ValueError(f"tiling: need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], image_size: int) -> tuple[int, int]:
    """The grid whose i/j is nearest to width/height; on an exact tie a later grid wins if the image area
    exceeds half of the grid's pixel area."""
    aspect = width / height
    diffs = [abs(aspect - i / j) for i, j in grids]
    best, best_diff = (1, 1), float("inf")
    for g, d in zip(grids, diffs):
        if d < best_diff:
            best, best_diff = g, d
        elif d == best_diff and width * height > 0.5 * image_size * image_size * g[0] * g[1]:
            best = g
    return best


def dynamic_tiles(image: Image.Image, *, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """PIL image → list of image_size² PIL tiles (row-major) [+ thumbnail]."""
    image = to_rgb(image)
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"tiling: empty image of size {w}x{h}")
    cols, rows = closest_grid(w, h, candidate_grids(min_num, max_num), image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = []
    for r in range(rows):
        for c in range(cols):
            tiles.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def to_rgb(image) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image array: expected uint8 [H, W, 3|4], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image or uint8 array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def normalize(tile: Image.Image, image_size: int) -> np.ndarray:
    """`build_transform`: RGB, Resize((s, s), BICUBIC) (a no-op on tiles), /255, ImageNet mean/std → [s, s, 3]."""
    tile = to_rgb(tile)
    if tile.size != (image_size, image_size):
        tile = tile.resize((image_size, image_size), Image.BICUBIC)
    x = np.asarray(tile, np.float32) / 255.0
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def load_image(image, *, image_size: int = 448, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True,
               dynamic: bool = True) -> np.ndarray:
    """PIL image / uint8 array / path → pixel_values [N, image_size, image_size, 3] float32."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = open_rgb(image)
    tiles = (dynamic_tiles(image, min_num=min_num, max_num=max_num, image_size=image_size,
                           use_thumbnail=use_thumbnail) if dynamic else [to_rgb(image)])
    return np.stack([normalize(t, image_size) for t in tiles])
