"""The Grain pipeline the per-sample datasets share (`data/trajectory.py`, `data/qa.py`): shard by process, shuffle,
repeat, map, batch — one copy, so both read their rows the same way (the planner stages' in-memory batches take
`planner_data.index_batches` instead)."""
from __future__ import annotations

from typing import Callable

import grain.python as gp


def sharded_dataset(source: gp.RandomAccessDataSource, *, seed: int, shuffle: bool, num_epochs: int | None,
                    shard_options: gp.ShardOptions | None, transform: Callable[[dict], dict] | None,
                    batch_size: int | None, drop_remainder: bool) -> gp.IterDataset:
    """`source` as a checkpointable Grain `IterDataset` (`get_state()` / `set_state()` resume exactly).

    Each JAX process reads rows `shard_index::shard_count` (default `ShardByJaxProcess(drop_remainder=True)`),
    cut to `len // shard_count` rows when the options drop the remainder, so every process gets as many; shuffling
    is deterministic per `seed` and differs per epoch; `num_epochs=None` repeats forever; `transform` maps one
    sample; batches of `batch_size` stack every leaf (none when `batch_size` is None)."""
    opts = gp.ShardByJaxProcess(drop_remainder=True) if shard_options is None else shard_options
    ds = gp.MapDataset.source(source)
    if opts.shard_count > 1:
        per = len(ds) // opts.shard_count
        ds = ds[opts.shard_index::opts.shard_count]
        if opts.drop_remainder:
            ds = ds[:per]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.to_iter_dataset()
