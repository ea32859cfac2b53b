"""Length-grouped (optionally packed) SFT batches with a few static shapes, as a checkpointable Grain iterator.

Upstream trains InternVL with `group_by_length=True` (HF `LengthGroupedSampler`: shuffle, cut into mega-batches of
50 global batches, sort each by length) and optional packing. Under jit every new shape is a new compilation, so
each batch is padded to the smallest of a few **length buckets** (`buckets`) and a few **tile buckets**
(`tile_buckets`, per row). Grouping by length keeps the padding small; the buckets bound the number of compiled
shapes to len(buckets) × len(tile_buckets).

Packing (`pack=True`) concatenates samples into rows of at most max(buckets) tokens and max(tile_buckets) tiles
(first-fit decreasing, done once
for the dataset, so the rows are the same every epoch and an epoch has a fixed number of batches). A packed row
carries `segment_ids` (1, 2, ... per sample, 0 = padding) and per-sample positions; the loss masks attention to
the same segment, so packed samples never see each other.

Batch layout (process-local, `b` rows): input_ids/labels/attention_mask/segment_ids/positions [b, T] int32,
pixel_values [G, N, S, S, 3] float32 and image_flags [G, N] int32: the batch's real tiles **packed flat** into G
tile groups, each padded only up to a bucket of its total (`group_tile_buckets`), so the ViT runs on
G x bucket(total) tiles instead of b x (the longest row's tiles) — upstream concatenates the batch's real tiles
(pixel_values [N_real, ...]) the same way. A group holds the tiles of the rows one device sees in one micro-batch
(`tile_group_of_rows`): the batch axis 0 of both layouts is split the same way over the data-parallel devices
(contiguous) and over gradient-accumulation micro-batches (strided, train/state.split_microbatches), so every
device's and micro-batch's tiles stay with its rows, in row order — which is all `models.internvl.
merge_image_embeds` needs (it consumes real tiles in order over the flattened batch). G = 1 on one device without
accumulation; one group a row (G = b, the old per-row layout) where the rows per device are not a multiple of the
accumulation.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import grain
import numpy as np
from recogdrive_jax.errors import UserError

IGNORE_INDEX = -100
MEGABATCH_MULT = 50  # HF LengthGroupedSampler


class BucketError(UserError):
    pass


class TooFewRowsError(UserError):
    """The dataset cannot fill one global batch (an epoch would have no batch)."""


def default_buckets(max_len: int, smallest: int = 256) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len` itself: ≤ log2(max/smallest)+1 shapes."""
    out, b = [], max(1, int(smallest))
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(int(max_len))
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int], what: str = "sequence length") -> int:
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise BucketError(f"{what} {n} exceeds the largest bucket {max(buckets)}")


def default_group_tile_buckets(max_total: int) -> tuple[int, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... below `max_total`, then `max_total`: ≤ 2·log2(max_total) + 1 shapes and at
    most a third of a group's tiles padding (powers of two alone would pad 3 real tiles to 4)."""
    out, b = [], 1
    while b < max_total:
        out.append(b)
        if b >= 2 and b * 3 // 2 < max_total:
            out.append(b * 3 // 2)
        b *= 2
    return tuple(sorted(set(out))) + (int(max_total),)


def tile_group_of_rows(local_batch: int, devices: int = 1, grad_accum: int = 1) -> np.ndarray:
    """[local_batch] tile group of each row: row r of device d (contiguous blocks of local_batch / devices rows)
    in micro-batch r % grad_accum goes to group d·grad_accum + r % grad_accum, so splitting the groups like the rows
    (contiguously over devices, strided over micro-batches) hands every device and micro-batch its own rows'
    tiles. One group a row where that split does not exist (rows per device not a multiple of grad_accum)."""
    b, d, a = int(local_batch), max(1, int(devices)), max(1, int(grad_accum))
    r = np.arange(b)
    if b % d or (b // d) % a:
        return r
    return (r // (b // d)) * a + r % a


def flat_tiles(row_tiles: Sequence[np.ndarray], row_group: np.ndarray, buckets: Sequence[int], image_size: int,
               what: str = "real tiles of a tile group") -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tiles ([k_r, S, S, 3], k_r ≥ 0) packed flat into their row's group, rows in order:
    (pixel_values [G, N, S, S, 3] float32, image_flags [G, N] int32), N = the smallest bucket ≥ the largest
    group's total (≥ 1: a text-only batch still has one padding tile)."""
    groups = int(np.max(row_group)) + 1 if len(row_group) else 1
    totals = np.zeros(groups, np.int64)
    for r, t in enumerate(row_tiles):
        totals[row_group[r]] += len(t)
    n = bucket_for(max(int(totals.max()), 1), buckets, what)
    pv = np.zeros((groups, n, image_size, image_size, 3), np.float32)
    flags = np.zeros((groups, n), np.int32)
    used = np.zeros(groups, np.int64)
    for r, t in enumerate(row_tiles):
        g, k = int(row_group[r]), len(t)
        pv[g, used[g]:used[g] + k] = t
        flags[g, used[g]:used[g] + k] = 1
        used[g] += k
    return pv, flags


def pack_rows(lengths: np.ndarray, capacity: int, tiles: np.ndarray | None = None,
              tile_capacity: int | None = None) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of total length ≤ capacity (and total tiles ≤
    tile_capacity), deterministic."""
    lengths = np.asarray(lengths)
    tiles = np.zeros_like(lengths) if tiles is None else np.asarray(tiles)
    tcap = int(tile_capacity) if tile_capacity is not None else int(1 << 62)
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    room: list[list[int]] = []
    for i in order:
        n, k = int(lengths[i]), int(tiles[i])
        for r, (free, tfree) in enumerate(room):
            if n <= free and k <= tfree:
                rows[r].append(int(i))
                room[r] = [free - n, tfree - k]
                break
        else:
            rows.append([int(i)])
            room.append([capacity - n, tcap - k])
    return rows


def grouped_epoch(row_lengths: np.ndarray, global_batch: int, seed: int, epoch: int,
                  megabatch_mult: int = MEGABATCH_MULT) -> np.ndarray:
    """One epoch's batches [num_batches, global_batch] of row indices: shuffled, then sorted by length inside
    each mega-batch (HF `get_length_grouped_indices`), then the batch order shuffled (drop remainder)."""
    n = len(row_lengths)
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    mega = global_batch * megabatch_mult
    grouped = []
    for s in range(0, n, mega):
        chunk = perm[s:s + mega]
        grouped.append(chunk[np.argsort(-np.asarray(row_lengths)[chunk], kind="stable")])
    flat = np.concatenate(grouped) if grouped else np.zeros(0, np.int64)
    nb = n // global_batch
    batches = flat[:nb * global_batch].reshape(nb, global_batch)
    return batches[rng.permutation(nb)]


class GroupedBatches:
    """The batch plan plus the collate function; `iterator()` wraps them as a Grain iterator.

    `load(i)` returns sample i as `data/template.build_sample` does with `pad_to_max_length=False` (input_ids,
    labels, attention_mask [t]; pixel_values [n, S, S, 3]; image_flags [n]); `lengths[i]`/`tiles[i]` are its
    estimated token and tile counts (for grouping; the real counts decide the bucket). `source` (the meta JSON)
    names the dataset in errors. `tile_buckets` bound a row's tiles (and a packed row's); `group_tile_buckets`
    (() = `default_group_tile_buckets` up to a group's rows x max(tile_buckets)) pad a tile group's total;
    `set_tile_groups(devices, grad_accum)` says how the batch is split (module docstring; default one group).
    """

    def __init__(self, load: Callable[[int], dict], lengths: np.ndarray, tiles: np.ndarray, *, global_batch: int,
                 process_index: int, process_count: int, buckets: Sequence[int], tile_buckets: Sequence[int],
                 image_size: int, pad_token_id: int, seed: int = 0, pack: bool = False, source: str = "the dataset",
                 group_tile_buckets: Sequence[int] = ()):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.load, self.lengths, self.tiles = load, np.asarray(lengths), np.asarray(tiles)
        self.global_batch, self.pi, self.pc = int(global_batch), int(process_index), int(process_count)
        self.local_batch = self.global_batch // self.pc
        self.buckets, self.tile_buckets = tuple(sorted(buckets)), tuple(sorted(tile_buckets))
        self._group_tile_buckets = tuple(sorted(int(b) for b in group_tile_buckets))
        if any(b < 1 for b in self._group_tile_buckets):
            raise BucketError(f"config.data.group_tile_buckets={tuple(group_tile_buckets)}: expected ints >= 1")
        self.set_tile_groups(1, 1)
        self.image_size, self.pad_token_id, self.seed, self.pack = int(image_size), int(pad_token_id), int(seed), pack
        cap = self.buckets[-1]
        if pack:
            self.rows = pack_rows(np.minimum(self.lengths, cap), cap, self.tiles, self.tile_buckets[-1])
        else:
            self.rows = [[i] for i in range(len(self.lengths))]
        self.row_lengths = np.array([sum(int(self.lengths[i]) for i in r) for r in self.rows])
        self.batches_per_epoch = len(self.rows) // self.global_batch
        if self.batches_per_epoch == 0:
            packed = f" packed into {len(self.rows)} rows" if pack else ""
            raise TooFewRowsError(
                f"{source}: {len(self.lengths)} samples{packed} are fewer than one global batch of "
                f"{self.global_batch} (config.train.batch_size); add data or lower config.train.batch_size")
        self._epoch_cache: dict[int, np.ndarray] = {}
        self.skipped = 0

    def set_tile_groups(self, devices: int, grad_accum: int = 1) -> None:
        """Tile groups for a batch this process splits over `devices` data-parallel devices and `grad_accum`
        micro-batches (`tile_group_of_rows`); sets `group_tile_buckets` (the given ones, else the default up to a
        group's rows x the largest row tile bucket)."""
        self.row_group = tile_group_of_rows(self.local_batch, devices, grad_accum)
        self.group_tile_buckets = self._group_buckets(self.local_batch // (int(self.row_group.max()) + 1))

    def _group_buckets(self, rows_per_group: int) -> tuple[int, ...]:
        return self._group_tile_buckets or default_group_tile_buckets(max(1, rows_per_group) * self.tile_buckets[-1])

    def epoch_plan(self, epoch: int) -> np.ndarray:
        plan = self._epoch_cache.get(epoch)  # one cached epoch; Grain's reader threads may race harmlessly
        if plan is None:
            plan = grouped_epoch(self.row_lengths, self.global_batch, self.seed, epoch)
            self._epoch_cache = {epoch: plan}
        return plan

    def local_rows(self, k: int) -> list[list[int]]:
        """Sample indices of this process's rows of global batch k."""
        plan = self.epoch_plan(k // self.batches_per_epoch)[k % self.batches_per_epoch]
        mine = plan[self.pi * self.local_batch:(self.pi + 1) * self.local_batch]
        return [self.rows[int(r)] for r in mine]

    def _load(self, i: int) -> dict | None:
        from recogdrive_jax.data.template import SampleError
        try:
            return self.load(i)
        except SampleError as e:  # a bad row becomes padding; the loss ignores it
            self.skipped += 1
            logging.warning("SFT sample %d skipped: %s", i, e)
            return None

    def collate(self, rows: list[list[int]]) -> dict:
        loaded = []
        cap = self.buckets[-1]
        for row in rows:
            samples, used = [], 0
            for i in row:
                s = self._load(i)
                if s is None:
                    continue
                n = len(s["input_ids"])
                if used + n > cap:  # estimated lengths were short: keep the row within the largest bucket
                    if not samples:
                        raise BucketError(f"sample {i} has {n} tokens > largest bucket {cap}")
                    self.skipped += 1
                    continue
                samples.append(s)
                used += n
            loaded.append(samples)
        t = bucket_for(max([sum(len(s["input_ids"]) for s in r) for r in loaded] + [1]), self.buckets)
        bucket_for(max([sum(int(np.sum(s["image_flags"] > 0)) for s in r) for r in loaded] + [1]),
                   self.tile_buckets, "tiles per row (config.data.tile_buckets)")
        b = len(rows)  # a batch of another size than local_batch (tests, tools) is one tile group
        groups, gbuckets = ((self.row_group, self.group_tile_buckets) if b == len(self.row_group) else
                            (np.zeros(b, np.int64), self._group_buckets(b)))
        out = {"input_ids": np.full((b, t), self.pad_token_id, np.int32),
               "labels": np.full((b, t), IGNORE_INDEX, np.int32),
               "attention_mask": np.zeros((b, t), np.int32), "segment_ids": np.zeros((b, t), np.int32),
               "positions": np.zeros((b, t), np.int32)}
        row_tiles = []
        for r, samples in enumerate(loaded):
            pos, tiles = 0, []
            for seg, s in enumerate(samples, start=1):
                n = len(s["input_ids"])
                out["input_ids"][r, pos:pos + n] = s["input_ids"]
                out["labels"][r, pos:pos + n] = s["labels"]
                out["attention_mask"][r, pos:pos + n] = 1
                out["segment_ids"][r, pos:pos + n] = seg
                out["positions"][r, pos:pos + n] = np.arange(n)
                tiles.append(np.asarray(s["pixel_values"])[np.asarray(s["image_flags"]) > 0])
                pos += n
            row_tiles.append(np.concatenate(tiles) if tiles else
                             np.zeros((0, self.image_size, self.image_size, 3), np.float32))
        out["pixel_values"], out["image_flags"] = flat_tiles(
            row_tiles, groups, gbuckets, self.image_size,
            "real tiles of a tile group (config.data.group_tile_buckets)")
        return out

    def batch(self, k: int) -> dict:
        return self.collate(self.local_rows(k))

    def iterator(self, num_threads: int = 2, prefetch: int = 4, num_epochs: int = 1_000_000):
        """Endless (num_epochs) Grain iterator with get_state/set_state (the loop checkpoints it)."""
        ds = grain.MapDataset.range(self.batches_per_epoch * int(num_epochs)).map(self.batch)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

    def eval_batches(self):
        """Every row exactly once, sorted by length, in global batches (the last one padded with empty rows);
        yields this process's share of each."""
        order = [int(i) for i in np.argsort(-self.row_lengths, kind="stable")]
        for s in range(0, len(order), self.global_batch):
            chunk = order[s:s + self.global_batch]
            rows = [self.rows[i] for i in chunk] + [[]] * (self.global_batch - len(chunk))
            yield self.collate(rows[self.pi * self.local_batch:(self.pi + 1) * self.local_batch])


def shapes_in_epoch(plan: GroupedBatches, epoch: int = 0) -> set[tuple[int, int]]:
    """The (T, N) bucket pairs (tokens a row, tiles a group) an epoch would use, from the estimated lengths and
    tile counts (diagnostics and tests)."""
    out = set()
    for k in range(plan.batches_per_epoch):
        rows = plan.local_rows(epoch * plan.batches_per_epoch + k)
        t = bucket_for(max(sum(int(plan.lengths[i]) for i in r) for r in rows), plan.buckets)
        totals = np.zeros(int(plan.row_group.max()) + 1, np.int64)
        for r, row in enumerate(rows):
            totals[plan.row_group[r]] += sum(int(plan.tiles[i]) for i in row)
        out.add((t, bucket_for(max(int(totals.max()), 1), plan.group_tile_buckets, "real tiles of a tile group")))
    return out
