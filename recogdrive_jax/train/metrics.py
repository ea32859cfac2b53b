"""Metric accumulation (clu.metrics) and writers: WORKDIR/metrics.jsonl always, TensorBoard, a progress bar.

`clu.metric_writers` pulls in TensorFlow, so the writers here are our own; only process 0 writes. A remote workdir
(gs://...) gets the same files through `storage`: metrics.jsonl is rewritten whole at each event (object stores
cannot append) and TensorBoard event files are uploaded through etils.epath at each flush.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np
from clu import metrics as clu_metrics

from recogdrive_jax import storage


class MetricAccumulator:
    """Averages per-step scalar metrics between log events with `clu.metrics.Average`."""

    def __init__(self):
        self._avg: dict[str, clu_metrics.Average] = {}

    def add(self, metrics: Mapping[str, float]):
        for k, v in metrics.items():
            m = clu_metrics.Average.from_model_output(np.asarray(v, np.float64))
            self._avg[k] = m if k not in self._avg else self._avg[k].merge(m)

    def compute_and_reset(self) -> dict[str, float]:
        out = {k: float(m.compute()) for k, m in self._avg.items()}
        self._avg = {}
        return out


def _jsonable(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    return v


class MetricWriter:
    """One JSON object per event in `metrics.jsonl` (`step`, `split`, metrics...) + TensorBoard scalars."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = storage.join(storage.abspath(workdir), "metrics.jsonl")
        self.remote = storage.is_remote(self.path)
        self._rows: list[str] | None = None  # remote: the file's lines, rewritten whole at each event
        self._tb = None
        if self.active:
            storage.makedirs(workdir)
            if self.remote:
                self._rows = storage.read_text(self.path).splitlines(keepends=True) if storage.exists(
                    self.path) else []
            if tensorboard:
                from tensorboardX import SummaryWriter
                tb_dir = storage.join(storage.abspath(workdir), "tensorboard")
                if self.remote:
                    _register_remote_event_files(storage.scheme(tb_dir))
                self._tb = SummaryWriter(tb_dir)

    def write(self, step: int, split: str, metrics: Mapping[str, float]):
        if not self.active:
            return
        row = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        if self._rows is not None:
            self._rows.append(line)
            storage.write_text(self.path, "".join(self._rows))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in metrics.items():
                if np.ndim(v) == 0 and np.isfinite(float(v)):
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


class _EventFile:
    """A TensorBoard event file on an object store: bytes kept in memory, the whole object rewritten at each flush
    (what tensorboardX's own GCS writer does, but through etils.epath, so it shares gcsfs's credentials and
    emulator settings with every other file of the run)."""

    def __init__(self, path: str):
        self.path, self._buf, self._flushed = path, bytearray(), 0

    def write(self, data: bytes):
        self._buf += data

    def flush(self):
        if len(self._buf) != self._flushed:
            storage.write_bytes(self.path, bytes(self._buf))
            self._flushed = len(self._buf)

    def close(self):
        self.flush()


class _EventFileFactory:
    def open(self, path: str):
        return _EventFile(path)

    def directory_check(self, path: str):  # object stores need no directories
        pass


def _register_remote_event_files(scheme: str) -> None:
    """Routes tensorboardX's event files for `scheme://` through `storage` (its public writer-factory registry)."""
    from tensorboardX import record_writer
    record_writer.register_writer_factory(scheme, _EventFileFactory())


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    rows = [json.loads(l) for l in storage.read_text(path).splitlines() if l.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_every_s() -> float:
    """Seconds between plain progress lines off a terminal (RECOGDRIVE_PROGRESS_EVERY_S, default 20: under the
    30 s a CI log may stay silent)."""
    return float(os.environ.get("RECOGDRIVE_PROGRESS_EVERY_S", "20"))


class Progress:
    """Rate and ETA of any long loop (training, cache, eval, scene generation, rollouts, conversion).

    On a terminal (process 0) a tqdm bar. Off a terminal (CI, a log file) a plain line with count, rate and ETA at
    least every `every_s` seconds, printed by a heartbeat thread, so a long compilation or a slow step still shows
    the run is alive. The rate is measured from the first finished item on, so compilation does not skew the ETA.
    Only process 0 prints. `update(done=k)` sets the absolute count, `update(n=1)` adds to it.
    """

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "steps",
                 every_s: float | None = None, tty: bool | None = None, delay_s: float = 0.0):
        self.main = jax.process_index() == 0
        self.tty = (sys.stdout.isatty() if tty is None else bool(tty)) and self.main
        self.desc, self.unit = desc, unit
        self.total = None if total is None else int(total)
        self.done = self._initial = int(initial)
        self.every_s = float(every_s if every_s is not None else progress_every_s())
        self._t0 = self._last_print = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, count) at the first update
        self._printed = False
        self._bar = None
        self._stop = None
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit.rstrip("s") or unit,
                             dynamic_ncols=True, delay=delay_s, leave=delay_s == 0)
        elif self.main:
            import threading
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._heartbeat, name=f"progress-{desc}", daemon=True)
            self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rate(self) -> float | None:
        """Items per second since the first finished item (since the start while only one update came)."""
        now = time.monotonic()
        if self._first is None:
            return None
        t_first, n_first = self._first
        if self.done > n_first and now > t_first:
            return (self.done - n_first) / (now - t_first)
        return (self.done - self._initial) / (now - self._t0) if self.done > self._initial else None

    def status(self) -> str:
        """'12/100 steps (12%), 3.4 steps/s, elapsed 0:41, ETA 0:26'."""
        elapsed = time.monotonic() - self._t0
        count = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        if self.total:
            count += f" ({100.0 * self.done / self.total:.0f}%)"
        rate = self.rate()
        if rate is None:
            return f"{count}, elapsed {_fmt_duration(elapsed)}, waiting for the first of them"
        text = f"{count}, {rate:.3g} {self.unit}/s, elapsed {_fmt_duration(elapsed)}"
        if self.total and rate > 0:
            text += f", ETA {_fmt_duration(max(self.total - self.done, 0) / rate)}"
        return text

    def _print(self, text: str):
        self._last_print = time.monotonic()
        self._printed = True
        print(f"[{self.desc}] {text}", flush=True)

    def _heartbeat(self):
        while not self._stop.wait(min(1.0, self.every_s / 4)):
            if time.monotonic() - self._last_print >= self.every_s:
                self._print(self.status())

    def update(self, step: int | None = None, metrics: Mapping[str, float] | None = None, n: int = 1, *,
               done: int | None = None):
        """`step`/`done`: the absolute count of finished items; else `n` more are finished."""
        absolute = done if done is not None else step
        self.done = int(absolute) if absolute is not None else self.done + int(n)
        if self._first is None:
            self._first = (time.monotonic(), self.done)
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "reward_mean")})

    def log(self, step: int, split: str, metrics: Mapping[str, float]):
        if not self.main:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.ndim(v) == 0)
        line = f"step {step}/{self.total} {split}: {text}"
        if self._bar is not None:
            self._bar.write(f"[{self.desc}] {line}")
        else:
            rate = self.rate()
            eta = (f", ETA {_fmt_duration(max(self.total - self.done, 0) / rate)}"
                   if rate and self.total else "")
            self._print(f"{line} ({rate or 0:.3g} {self.unit}/s{eta})")

    def close(self):
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._stop = None
            if time.monotonic() - self._t0 >= self.every_s:  # long work ends with a line; short work stays quiet
                self._print("done: " + self.status())
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def track(iterable, total: int | None = None, desc: str = "", unit: str = "items", **kw):
    """`for x in track(xs, desc='scenes'):` — `Progress` around a loop (one item per iteration)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc=desc, unit=unit, delay_s=kw.pop("delay_s", 2.0), **kw) as p:
        for item in iterable:
            yield item
            p.update(n=1)
