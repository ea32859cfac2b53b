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
    """One CPU for XLA and torch. Call before importing jax/torch: XLA reads its flags once.

    The thread flags alone are not enough: XLA's CPU runtime still kept a second core busy (cpu/wall 1.8 on
    2026-12-07), so the process — and every subprocess it starts, which inherits the mask — is pinned to one core,
    as `taskset -c 0` did for the recorded equal-resource rows."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = "1"
    if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the thread flags are all there is
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    host_malloc()


HOST_MALLOC = os.environ.get("BENCH_HOST_MALLOC", "system")  # 'reuse' = host_memory.py's policy (an A/B)


def host_malloc() -> None:
    """The host allocator policy `python -m recogdrive_jax.main` sets (config.host.malloc, default 'system';
    'reuse': recogdrive_jax/host_memory.py), here before jax/torch start their threads. It is process-wide, so the
    baseline in the same process gets it too (torch's step changes with it as well: the ratios stay fair)."""
    from recogdrive_jax import host_memory
    host_memory.apply_malloc_policy(HOST_MALLOC)


def _machine_busy_s() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (all cores), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _pid_busy_s(pid: int) -> float:
    """CPU-seconds (user + system) a live process has used, from /proc/<pid>/stat; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _own_busy_s(helper_pids: tuple[int, ...] = ()) -> float:
    """CPU-seconds of this process, its waited-for children and `helper_pids` (live subprocesses the benchmark
    itself drives, e.g. a baseline running in another venv: their CPU is the benchmark's, not other users')."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(_pid_busy_s(p) for p in helper_pids)


class LoadMonitor:
    """Context manager measuring the CPU share other processes took while it was open (0..1 of all cores)."""

    def __init__(self, helper_pids: tuple[int, ...] = ()):
        self.helper_pids = tuple(helper_pids)

    def __enter__(self):
        self._t0, self._m0, self._o0 = time.perf_counter(), _machine_busy_s(), _own_busy_s(self.helper_pids)
        self.other_share = None
        return self

    def __exit__(self, *exc):
        m1 = _machine_busy_s()
        if self._m0 is not None and m1 is not None:
            wall = max(time.perf_counter() - self._t0, 1e-9)
            other = (m1 - self._m0) - (_own_busy_s(self.helper_pids) - self._o0)
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
    baseline_cpu_s: list[float] | None = None  # this process's CPU seconds per call (cpu/wall ≈ threads used)
    jax_cpu_s: list[float] | None = None

    @property
    def speedup_min(self) -> float:
        return min(self.baseline_s) / min(self.jax_s)

    @property
    def speedup_median(self) -> float:
        return float(np.median(self.baseline_s) / np.median(self.jax_s))

    @property
    def quiet(self) -> bool:
        return self.other_share is not None and self.other_share <= QUIET_OTHER_SHARE

    def cpu_per_wall(self) -> tuple[float, float] | None:
        """(baseline, jax) process CPU time over wall time: ≈ 1.0 when a side really ran single-threaded."""
        if not self.baseline_cpu_s or not self.jax_cpu_s:
            return None
        return (sum(self.baseline_cpu_s) / max(sum(self.baseline_s), 1e-12),
                sum(self.jax_cpu_s) / max(sum(self.jax_s), 1e-12))

    def print(self, unit: str = "ms", scale: float = 1e3) -> None:
        """`# …` detail line, then the ratio line `name: 1.23x` (> 1: JAX faster; min over repeats)."""
        load = "n/a" if self.other_share is None else f"{100 * self.other_share:.0f}%"
        cpu = self.cpu_per_wall()
        threads = "" if cpu is None else f"; cpu/wall baseline {cpu[0]:.2f} jax {cpu[1]:.2f}"
        print(f"# {self.name}: baseline min {min(self.baseline_s) * scale:.2f} / median "
              f"{np.median(self.baseline_s) * scale:.2f} {unit}; jax min {min(self.jax_s) * scale:.2f} / median "
              f"{np.median(self.jax_s) * scale:.2f} {unit}; jax compile {self.compile_s:.1f} s; "
              f"median ratio {self.speedup_median:.2f}x; others' CPU share {load}{threads}"
              + ("" if self.quiet else "  [LOADED: not recordable]"))
        print(f"{self.name}: {self.speedup_min:.2f}x")


def interleaved(name: str, baseline: Callable[[], object], jax_fn: Callable[[], object], reps: int = 5,
                warmup: int = 1, helper_pids: tuple[int, ...] = ()) -> Timing:
    """Time `baseline` and `jax_fn` (each must block until done) alternately, `reps` times each, after warm-up.

    The first JAX call is timed on its own as compile time; warm-up calls of both sides are not counted.
    `helper_pids`: subprocesses a side runs in (their CPU counts as this benchmark's, not as other users' load).
    """
    if reps < 5:
        raise ValueError(f"interleaved: reps={reps}; the method needs ≥ 5 repeats per side")
    t0 = time.perf_counter()
    jax_fn()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        baseline()
        jax_fn()
    bs, js, bc, jc = [], [], [], []
    with LoadMonitor(helper_pids) as mon:
        for _ in range(reps):
            for fn, out, cpu in ((baseline, bs, bc), (jax_fn, js, jc)):
                c, t = _own_busy_s(helper_pids), time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
                cpu.append(_own_busy_s(helper_pids) - c)
    return Timing(name, bs, js, compile_s, mon.other_share, bc, jc)


def cpu_min(fn: Callable[[], object], reps: int) -> float:
    """Least process CPU seconds of `reps` calls after one warm-up: on a pinned single-threaded process this is the
    time the work itself took, whatever share of the core other processes got (wall time is not, under load)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f; host malloc %s" % (*os.getloadavg(), HOST_MALLOC)
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


def anchor_internvl_config(vit_layers: int = 2, llm_layers: int = 2):
    """The VLM benches' anchor shape (issue 17): InternVL3-1B widths — InternViT-300M (1024 wide, 448 px, 256
    tokens a tile after pixel shuffle), Qwen2.5-0.5B-style LLM 896 wide, 14/2 heads, vocab 151,674, dynamic RoPE —
    with few layers so one step fits a CPU benchmark. Every width, the vocabulary and the token ids are the real
    model's; only the depth is cut."""
    from recogdrive_jax.models import internvl as iv
    cfg = iv.get_config("internvl3_1b")
    return dataclasses.replace(
        cfg, vision_config=dataclasses.replace(cfg.vision_config, num_hidden_layers=vit_layers),
        llm_config=dataclasses.replace(cfg.llm_config, num_hidden_layers=llm_layers))


def hf_internvl(cfg, train: bool = False):
    """transformers' `InternVLForConditionalGeneration` of `cfg` (random init, seed 0) with its default attention
    implementation, `sdpa`, in both towers: the baseline of the VLM benches."""
    import torch
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    from recogdrive_jax.models import internvl as iv
    d = iv.config_to_hf(cfg, "native")
    hc = HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(hc)
    return model.train() if train else model.eval()


def print_results_row(timings: list[Timing], command: str) -> None:
    """The RESULTS.md row of a quiet run (date and device filled in), or the refusal line of a loaded one."""
    import jax
    row = results_line(timings, command, time.strftime("%Y-%m-%d"),
                       f"{jax.devices()[0].platform}, {os.cpu_count()} cores")
    if row:
        print("# RESULTS.md row:\n" + row)
