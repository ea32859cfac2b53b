"""What every benchmark shares: the interleaved timing method, the quiet-machine check, and the small InternVL shape.

The method (issue 17): baseline and JAX repeats alternate (ABAB…) in one process, so a change in machine load hits
both sides alike; ≥ 5 repeats each; min and median reported; JAX compile time printed apart from steady-state time;
recorded rows run single-threaded on both sides (`single_thread()` before jax/torch initialise). While timing, the
CPU share that *other* processes took is read from /proc; above 10 % the run is flagged as loaded and
`results_line()` refuses to produce a RESULTS.md row.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np

QUIET_OTHER_SHARE = 0.10  # other processes' share of the machine's CPU above which a figure is not recorded


def single_thread() -> None:
    """One CPU thread for XLA and torch (OpenMP/MKL). Call before importing jax/torch: XLA reads its flags once."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = "1"


def _machine_busy_s() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (all cores), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
    """Context manager measuring the CPU share other processes took while it was open (0..1 of all cores)."""

    def __enter__(self):
        self._t0, self._m0, self._o0 = time.perf_counter(), _machine_busy_s(), _own_busy_s()
        self.other_share = None
        return self

    def __exit__(self, *exc):
        m1 = _machine_busy_s()
        if self._m0 is not None and m1 is not None:
            wall = max(time.perf_counter() - self._t0, 1e-9)
            other = (m1 - self._m0) - (_own_busy_s() - self._o0)
            self.other_share = max(0.0, other) / (wall * (os.cpu_count() or 1))
        return False

    @property
    def quiet(self) -> bool:
        return self.other_share is not None and self.other_share <= QUIET_OTHER_SHARE


@dataclasses.dataclass
class Timing:
    """Seconds per call of each side over interleaved repeats, and the JAX compile (first-call) time."""
    name: str
    baseline_s: list[float]
    jax_s: list[float]
    compile_s: float
    other_share: float | None

    @property
    def speedup_min(self) -> float:
        return min(self.baseline_s) / min(self.jax_s)

    @property
    def speedup_median(self) -> float:
        return float(np.median(self.baseline_s) / np.median(self.jax_s))

    @property
    def quiet(self) -> bool:
        return self.other_share is not None and self.other_share <= QUIET_OTHER_SHARE

    def print(self, unit: str = "ms", scale: float = 1e3) -> None:
        """`# …` detail line, then the ratio line `name: 1.23x` (> 1: JAX faster; min over repeats)."""
        load = "n/a" if self.other_share is None else f"{100 * self.other_share:.0f}%"
        print(f"# {self.name}: baseline min {min(self.baseline_s) * scale:.2f} / median "
              f"{np.median(self.baseline_s) * scale:.2f} {unit}; jax min {min(self.jax_s) * scale:.2f} / median "
              f"{np.median(self.jax_s) * scale:.2f} {unit}; jax compile {self.compile_s:.1f} s; "
              f"median ratio {self.speedup_median:.2f}x; others' CPU share {load}"
              + ("" if self.quiet else "  [LOADED: not recordable]"))
        print(f"{self.name}: {self.speedup_min:.2f}x")


def interleaved(name: str, baseline: Callable[[], object], jax_fn: Callable[[], object], reps: int = 5,
                warmup: int = 1) -> Timing:
    """Time `baseline` and `jax_fn` (each must block until done) alternately, `reps` times each, after warm-up.

    The first JAX call is timed on its own as compile time; warm-up calls of both sides are not counted.
    """
    if reps < 5:
        raise ValueError(f"interleaved: reps={reps}; the method needs ≥ 5 repeats per side")
    t0 = time.perf_counter()
    jax_fn()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        baseline()
        jax_fn()
    bs, js = [], []
    with LoadMonitor() as mon:
        for _ in range(reps):
            for fn, out in ((baseline, bs), (jax_fn, js)):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return Timing(name, bs, js, compile_s, mon.other_share)


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def results_line(timings: list[Timing], command: str, date: str, device: str) -> str | None:
    """A RESULTS.md table row for these timings, or None (with a message) when any was taken on a loaded machine."""
    loaded = [t.name for t in timings if not t.quiet]
    if loaded:
        print(f"# not recording: others used > {QUIET_OTHER_SHARE:.0%} of the CPU during {', '.join(loaded)}")
        return None
    ratios = " / ".join(f"{t.speedup_min:.2f}x" for t in timings)
    return f"| {', '.join(t.name for t in timings)} | `{command}` | {ratios} | {date}, {device} |"


def time_call(fn: Callable[[], object], reps: int, reduce: str = "median") -> float:
    """Seconds per call of `fn` (which must block until its work is done), after one warm-up/compile call.
    Single-sided; new benchmarks use `interleaved`."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts) if reduce == "min" else np.median(ts))
def small_internvl_config():
    """ViT 128x4 at 112 px (16 tokens a tile), LLM 256x6, vocab 4096: big enough that compute, not Python, dominates."""
    from recogdrive_jax.models import internvl as iv
    from recogdrive_jax.models.internvit import InternViTConfig
    from recogdrive_jax.models.qwen2 import Qwen2Config
    return dataclasses.replace(
        iv.get_config("tiny"),
        vision_config=InternViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=512, image_size=112, patch_size=14),
        llm_config=Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096))
