"""The evidence table (eval/evidence.py) on fake run folders: mean ± sd, seed pairing, the 2-sd rule, wall-clock."""
import json
import os

import pytest

from recogdrive_jax.eval import evidence


def _run(root, name, seed, pdms, epdms=0.8, ade=1.0, scenes=256, wall=None, baseline=""):
    d = root / name
    os.makedirs(d / "eval" / "eval")
    json.dump({"pdms": pdms, "epdms": epdms, "ade": ade, "num_scenes": scenes}, open(d / "eval" / "eval" / "metrics.json", "w"))
    if seed is not None:
        json.dump({"seed": seed, "eval": {"baseline": baseline}}, open(d / "config.json", "w"))
    if wall is not None:
        json.dump({"wall_s": wall}, open(d / "wall.json", "w"))
    return str(d)


def _summary(pipeline_dir, suffix, steps):
    json.dump({"steps": [{"name": n, "stage": "il", "wall_s": w, "ok": ok} for n, w, ok in steps]},
              open(pipeline_dir / f"pipeline_summary{suffix}.json", "w"))


def test_paired_difference_and_two_sd_rule(tmp_path):
    # seeds listed in another order in each row: pairing goes by config.json's seed, not position
    a = [evidence.load_run(_run(tmp_path, f"a{s}", s, p)) for s, p in ((0, 0.90), (1, 0.92), (2, 0.91))]
    b = [evidence.load_run(_run(tmp_path, f"b{s}", s, p)) for s, p in ((2, 0.85), (0, 0.80), (1, 0.90))]
    d = evidence.paired_difference(a, b)  # differences 0.10, 0.02, 0.06
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.06) and d["sd"] == pytest.approx(0.04)
    assert d["beats"] is False  # 0.06 < 2 x 0.04
    c = [evidence.load_run(_run(tmp_path, f"c{s}", s, p)) for s, p in ((0, 0.86), (1, 0.88), (2, 0.87))]
    d = evidence.paired_difference(a, c)  # 0.04 each: sd 0 -> beats
    assert d["beats"] is True and d["sd"] == pytest.approx(0.0, abs=1e-12)
    # ADE: lower is better, so a beats b when its ADE is lower
    lo = [evidence.load_run(_run(tmp_path, f"lo{s}", s, 0.9, ade=1.0 + 0.01 * s)) for s in range(3)]
    hi = [evidence.load_run(_run(tmp_path, f"hi{s}", s, 0.9, ade=2.0)) for s in range(3)]
    assert evidence.paired_difference(lo, hi, "ade")["beats"] is True
    # the deterministic CV run pairs with every seed; a trained one-seed row only with its own seed (no sd, no verdict)
    cv = [evidence.load_run(_run(tmp_path, "cv", 0, 0.80, baseline="constant_velocity"))]
    assert evidence.paired_difference(a, cv)["n"] == 3
    assert evidence.paired_difference(a, b[1:2])["n"] == 1 and evidence.paired_difference(a, b[1:2])["beats"] is None


def test_table_rows_margin_and_wall_clock(tmp_path):
    cv = _run(tmp_path, "cv", 0, 0.80, wall=12.0, baseline="constant_velocity")
    seeds = []
    for s, (tok, real, shuf) in enumerate(((0.90, 0.86, 0.80), (0.92, 0.87, 0.86), (0.91, 0.85, 0.82))):
        p = tmp_path / f"s{s}"
        os.makedirs(p)
        seeds.append({"tokens": _run(p, "il_tokens", s, tok), "real": _run(p, "il_real", s, real),
                      "shuffled": _run(p, "il_shuffled", s, shuf)})
        # a later rerun that only resumed (1 s) must not hide the real run's 600 s; failed entries never count
        _summary(p, "", [("sft", 300.0, True), ("cache", 60.0, True), ("il_tokens", 120.0, True),
                         ("il_real", 600.0, True), ("il_shuffled", 600.0, True)])
        _summary(p, ".rerun", [("il_real", 1.0, True), ("il_shuffled", 9999.0, False)])
    rows = [("CV", [cv]), ("scene-token IL", [r["tokens"] for r in seeds]),
            ("cache-IL", [r["real"] for r in seeds]), ("cache-IL, shuffled", [r["shuffled"] for r in seeds])]
    text = evidence.table(rows, upstream={"cache-IL": ["sft", "cache"]})
    lines = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["CV"].startswith("| CV | 1 | 0.800 | 0.800 | 1.00 | 0.2 |")
    tok = lines["scene-token IL"].split(" | ")
    assert tok[1:3] == ["3", "0.910 ± 0.010"] and tok[5] == "2.0 ± 0.0"
    real = lines["cache-IL"].split(" | ")
    assert real[2] == "0.860 ± 0.010" and real[5] == "10.0 ± 0.0 (+6.0 sft+cache)"
    assert real[6] == "+0.060 ± 0.010 **beats**"  # vs CV: 0.06, 0.07, 0.05
    assert real[7] == "+0.033 ± 0.025 no"  # vs shuffled: 0.06, 0.01, 0.03
    assert real[9] == "0.55 |"  # (0.86 - 0.80) / (0.91 - 0.80)
    assert "256 held-out scenes" in text


def test_errors_name_the_run(tmp_path, capsys):
    a = _run(tmp_path, "a", 0, 0.9)
    b = _run(tmp_path, "b", 0, 0.9, scenes=128)
    with pytest.raises(evidence.EvidenceError, match="different numbers of scenes"):
        evidence.table([("A", [a]), ("B", [b])])
    assert evidence.main([f"A={tmp_path / 'missing'}"]) == 2
    assert "missing: no eval/eval/metrics.json" in capsys.readouterr().err
    assert evidence.main([f"A={a}", "--upstream", "B=sft"]) == 2
    for bad in ("A", "=x", "A=", "A=,"):
        assert evidence.main([bad]) == 2
        assert f"error: expected NAME=RUN_DIR[,RUN_DIR...], got {bad!r}" in capsys.readouterr().err
    assert evidence.main([f"A={a}", "--upstream", "A"]) == 2
    assert "error: expected ROW=STEP[,STEP...], got 'A'" in capsys.readouterr().err
    out = tmp_path / "table.md"
    assert evidence.main([f"A={a}", "--out", str(out)]) == 0
    assert capsys.readouterr().out == out.read_text() and "| A | 1 |" in out.read_text()


def test_no_margin_when_scene_tokens_are_not_above_cv(tmp_path):
    cv = _run(tmp_path, "cv", 0, 0.85, baseline="constant_velocity")
    tok, real = _run(tmp_path, "tok", 0, 0.80), _run(tmp_path, "real", 0, 0.82)
    text = evidence.table([("CV", [cv]), ("scene-token IL", [tok]), ("cache-IL", [real])])
    assert "| cache-IL | 1 | 0.820 |" in text and text.split("| cache-IL |")[1].splitlines()[0].endswith("| – |")
    assert "not above CV (-0.050 PDMS)" in text
