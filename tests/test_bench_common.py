"""The benchmark method (bench/common.py): interleaved repeats, compile time apart, the quiet-machine gate."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402


def test_interleaved_alternates_and_times_compile_apart():
    calls = []
    t = common.interleaved("x", lambda: calls.append("b"), lambda: calls.append("j"), reps=5)
    # first JAX call alone (compile), one warm-up pair, then strictly alternating B, J
    assert calls[:3] == ["j", "b", "j"] and calls[3:] == ["b", "j"] * 5
    assert len(t.baseline_s) == len(t.jax_s) == 5 and t.compile_s >= 0


def test_fewer_than_five_repeats_is_refused():
    with pytest.raises(ValueError, match="≥ 5"):
        common.interleaved("x", lambda: None, lambda: None, reps=3)


def test_loaded_timings_are_not_recorded(capsys):
    quiet = common.Timing("a", [2.0] * 5, [1.0] * 5, 0.1, other_share=0.02)
    loaded = common.Timing("b", [2.0] * 5, [1.0] * 5, 0.1, other_share=0.5)
    assert common.results_line([quiet], "cmd", "2026-12-07", "cpu").startswith("| a | `cmd` | 2.00x")
    assert common.results_line([quiet, loaded], "cmd", "2026-12-07", "cpu") is None
    assert "not recording" in capsys.readouterr().out
    quiet.print()
    assert capsys.readouterr().out.splitlines()[-1] == "a: 2.00x"


def test_load_monitor_share_is_a_fraction():
    with common.LoadMonitor() as m:
        sum(i * i for i in range(200_000))
    assert m.other_share is None or 0.0 <= m.other_share <= 1.0


def test_a_driven_subprocess_counts_as_the_benchmarks_own_cpu():
    """A baseline that runs in another process (bench/pdm_closed.py's navsim-real planner) is not other users' load."""
    import subprocess
    import sys
    spin = "import time\nwhile time.process_time() < 0.3: pass\nprint('spun', flush=True)\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "spun"
        used = common._pid_busy_s(proc.pid)
        assert 0.25 <= used < 5.0  # /proc counts whole clock ticks (10 ms)
        assert common._own_busy_s((proc.pid,)) - common._own_busy_s() >= 0.25
    finally:
        proc.kill()
        proc.wait()
    assert common._pid_busy_s(proc.pid) == 0.0  # gone: unreadable counts nothing


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_single_thread_pins_the_process_to_one_core():
    """The XLA thread flags left a second core busy (cpu/wall 1.8); recorded rows need one core on both sides."""
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[1])
    code = ("import os, sys; sys.path.insert(0, %r); from bench import common; common.single_thread(); "
            "print(len(os.sched_getaffinity(0)))" % root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
