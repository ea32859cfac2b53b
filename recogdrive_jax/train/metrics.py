"""Metric accumulation (clu.metrics) and writers: WORKDIR/metrics.jsonl always, TensorBoard, a progress bar.

`clu.metric_writers` pulls in TensorFlow, so the writers here are our own; only process 0 writes.
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
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, float]):
        if not self.active:
            return
        row = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if np.ndim(v) == 0 and np.isfinite(float(v)):
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


class Progress:
    """tqdm bar on a TTY (process 0), plain log lines otherwise."""

    def __init__(self, total: int, initial: int, desc: str):
        self.tty = sys.stdout.isatty() and jax.process_index() == 0
        self.desc = desc
        self.total = total
        self._bar = None
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self._t0 = time.time()

    def update(self, step: int, metrics: Mapping[str, float] | None = None, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "reward_mean")})

    def log(self, step: int, split: str, metrics: Mapping[str, float]):
        if jax.process_index() != 0:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.ndim(v) == 0)
        if self._bar is not None:
            self._bar.write(f"[{self.desc}] step {step}/{self.total} {split}: {text}")
        else:
            print(f"[{self.desc}] step {step}/{self.total} {split}: {text}", flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
