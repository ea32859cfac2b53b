"""bench/pdm.py runs end to end at tiny sizes: the interleaved JAX-vs-reference rows (always) and the JAX-vs-real-NAVSIM
rows on a real metric cache converted by `convert navsim-metric-cache` (slow; where navsim-real is set up), one
`name: 1.23x` line per ratio, per-trajectory times on both sides."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import common  # noqa: E402


def _ratio_lines(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z0-9_]+): (\d+\.\d+)x$", out, re.M)}


def test_per_trajectory_divides_each_side_and_keeps_cpu_per_wall():
    from bench import pdm as bench_pdm
    t = common.Timing("x", [2.0] * 5, [1.0] * 5, 0.1, 0.0, baseline_cpu_s=[1.0] * 5, jax_cpu_s=[1.0] * 5)
    t = bench_pdm.per_trajectory(t, [0.04] * 5, jax_n=100)
    assert t.baseline_s == [0.04] * 5 and t.jax_s == pytest.approx([0.01] * 5)
    assert t.speedup_min == pytest.approx(4.0) and t.cpu_per_wall() == pytest.approx((0.5, 1.0))


def test_reference_rows_print_ratios(capsys):
    from bench import pdm as bench_pdm
    args = bench_pdm._parse(["--scenes", "2", "--per_scene", "2", "--ref_scenes", "1", "--reps", "5",
                             "--no_navsim", "--no_b1", "--threads", "0"])
    assert bench_pdm.main(args) == 0
    out = capsys.readouterr().out
    ratios = _ratio_lines(out)
    assert set(ratios) == {"pdm_jax_vs_reference"} and ratios["pdm_jax_vs_reference"] > 0, out
    assert re.search(r"# pdm_jax_vs_reference: baseline min [\d.]+ / median [\d.]+ us; jax min [\d.]+ .*"
                     r"jax compile [\d.]+ s", out), out


@pytest.mark.slow
def test_navsim_rows_on_a_converted_real_metric_cache(capsys):
    from bench import pdm as bench_pdm
    if not bench_pdm.tool.tool_available():
        pytest.skip("navsim-real is not set up (see ../shared/tools/navsim-real/README.md)")
    args = bench_pdm._parse(["--scenes", "2", "--per_scene", "2", "--ref_scenes", "1", "--real_scenes", "1",
                             "--reps", "5", "--threads", "0"])
    assert bench_pdm.main(args) == 0
    out = capsys.readouterr().out
    assert set(_ratio_lines(out)) == {"pdm_jax_vs_reference", "pdm_jax_vs_reference_b1", "pdm_jax_vs_navsim",
                                      "pdm_jax_vs_navsim_b1"}, out
    m = re.search(r"on its (\d+) timed pairs: max \|d\| ([\d.e+-]+), (\d+) pairs differ", out)
    assert m and int(m[1]) == 2 and int(m[3]) == 0, out  # the same scenes and plans on both sides
