"""The VLM-side benches (bench/sft.py, vlm.py, ppo.py, grpo.py) run their `--quick` smoke path end to end: both sides
on the same weights and batch (the first losses / prefill logits agree), timed by the interleaved method, one
`name: 1.23x` line per ratio."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _ratio_lines(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z0-9_]+): (\d+\.\d+)x$", out, re.M)}


def test_sft_quick_same_first_loss_and_ratio_line(capsys):
    from bench import sft
    assert sft.main(sft._parse(["--quick", "--threads", "0"])) == 0
    out = capsys.readouterr().out
    m = re.search(r"first-step loss: jax ([\d.]+)\s+torch ([\d.]+)", out)
    assert m and float(m[1]) == pytest.approx(float(m[2]), rel=1e-5), out
    assert "sft_tokens_per_s_jax_vs_torch" in _ratio_lines(out), out


def test_sft_batch_packs_tiles_flat_like_the_collator():
    from bench import sft
    from recogdrive_jax.models import internvl as iv
    cfg = iv.get_config("tiny")
    b = sft.make_batch(cfg, 2, 64, "2,1")  # one device: one tile group of the 3 real tiles, no padding tile
    assert b["image_flags"].tolist() == [[1, 1, 1]] and b["pixel_values"].shape[:2] == (1, 3)
    rows = sft.make_batch(cfg, 2, 64, "2,1", layout="rows")  # the per-row layout it replaced, same real tiles
    assert rows["image_flags"].tolist() == [[1, 1], [1, 0]] and not rows["pixel_values"][1, 1].any()
    real = rows["pixel_values"].reshape(-1, *rows["pixel_values"].shape[2:])[rows["image_flags"].reshape(-1) > 0]
    assert (real == b["pixel_values"][0]).all()
    assert [(r == cfg.image_token_id).sum() for r in b["input_ids"]] == [8, 4]
    with pytest.raises(ValueError, match="one count >= 1 per row"):
        sft.make_batch(cfg, 2, 64, "2,1,1")


@pytest.mark.slow
def test_vlm_quick_same_prefill_logits_and_ratio_lines(capsys):
    from bench import vlm
    assert vlm.main(vlm._parse(["--quick", "--threads", "0"])) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|jax - torch\| ([\d.e+-]+)", out)[1]) < 1e-4, out
    names = {"vlm_prefill_jax_vs_torch", "vlm_decode_jax_vs_torch", "vlm_generate_jax_vs_torch"}
    assert names <= set(_ratio_lines(out)), out


@pytest.mark.slow
def test_ppo_quick_ratio_line(capsys):
    from bench import ppo
    assert ppo.main(ppo._parse(["--quick", "--threads", "0"])) == 0
    assert "ppo_env_steps_jax_vs_torch" in _ratio_lines(capsys.readouterr().out)


@pytest.mark.slow
def test_grpo_quick_ratio_line(capsys):
    from bench import grpo
    assert grpo.main(grpo._parse(["--quick", "--threads", "0"])) == 0
    assert "grpo_step_jax_vs_torch" in _ratio_lines(capsys.readouterr().out)
