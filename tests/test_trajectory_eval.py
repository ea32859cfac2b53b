"""Text-waypoint ADE of the SFT'd VLM (vlm/trajectory_eval.py): the strict parser, the metrics against the expert and
constant velocity, the prompt = the SFT trajectory row's, the batching, and the sft stage's eval wiring."""
import dataclasses
import json
import os
import re

import numpy as np
import pytest

from recogdrive_jax import config_types, configs, stage_configs
from recogdrive_jax.data import driving_prompt as dp
from recogdrive_jax.data import scene_qa
from recogdrive_jax.data import template as tpl
from recogdrive_jax.data.tokenizer import build_tokenizer
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.sim import render, world
from recogdrive_jax.sim.baselines import constant_velocity_plan
from recogdrive_jax.stages import sft
from recogdrive_jax.train.metrics import read_metrics
from recogdrive_jax.vlm import trajectory_eval as te


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def scenes():
    return te.held_out_scenes(5, scene_seed=0)


# ------------------------------------------------------------------------------------------------ parser

def test_parser_round_trips_trajectory_answer():
    rng = np.random.default_rng(0)
    futures = [rng.normal(0, 15, (8, 3)), np.zeros((8, 3)), np.full((8, 3), -0.001), np.full((8, 3), 123.456)]
    for f in futures:
        text = dp.trajectory_answer(f)
        poses = dp.parse_trajectory(text)
        assert poses.shape == (8, 3)
        np.testing.assert_allclose(poses, f, atol=0.005 + 1e-9)
        assert dp.trajectory_answer(poses) == text  # the text round-trips exactly
    assert dp.parse_trajectory("  [PT,(1,2,3),( -1.5 , +2.25,0.)] \n", num_poses=2).tolist() == [[1, 2, 3],
                                                                                                [-1.5, 2.25, 0]]


@pytest.mark.parametrize("text,why", [
    ("", "expected '[PT, (x, y, h), ...]'"),
    ("The trajectory is [PT, (1.00, 2.00, 0.10)]", "expected '[PT, (x, y, h), ...]'"),
    ("[PT, (1.00, 2.00, 0.10)] and then stop", "expected '[PT, (x, y, h), ...]'"),
    ("[PT, (1.00, 2.00, 0.10), (2.00, 3.00)]", "point 1: expected '(x, y, h)'"),
    ("[PT, (1.00, 2.00, nan)]", "point 0: expected '(x, y, h)'"),
    ("[PT, " + ", ".join(["(1.00, 2.00, 0.10)"] * 7) + "]", "expected 8 points, got 7"),
    ("[PT, " + ", ".join(["(1.00, 2.00, 0.10)"] * 9) + "]", "expected 8 points, got 9"),
    ("[PT, (1.00, 2.00, 0.10), (2.00, 3.00, 0.1)", "expected '[PT, (x, y, h), ...]'"),
])
def test_parser_rejects_malformed_text_saying_why(text, why):
    with pytest.raises(dp.TrajectoryParseError, match="^" + re.escape(why)):
        dp.parse_trajectory(text)


def test_unparsed_answers_are_counted_not_raised(scenes):
    texts = [dp.trajectory_answer(e) for e in scenes.expert]
    texts[1], texts[3] = "[PT, (1.00, 2.00)]", "go straight"
    poses, errors = te.parse_answers(texts)
    assert [e is None for e in errors] == [True, False, True, False, True]
    assert np.isnan(poses[[1, 3]]).all() and np.isfinite(poses[[0, 2, 4]]).all()
    assert "expected '(x, y, h)'" in errors[1] and "go straight" in errors[3]


# ------------------------------------------------------------------------------------------------ metrics

def test_expert_answers_score_zero_and_cv_matches_the_baseline(scenes):
    expert = np.asarray(scenes.expert, np.float64)
    texts = [dp.trajectory_answer(e) for e in expert]
    m, records = te.score(texts, scenes)
    assert m["parse_rate"] == 1.0 and m["num_scenes"] == 5
    assert m["ade"] <= 0.005 * np.sqrt(2) and m["fde"] <= 0.005 * np.sqrt(2)  # the answer's 2 decimals only
    cv = constant_velocity_plan(scenes.status, scenes.history)  # sim/baselines, as the eval stage scores it
    err = np.linalg.norm(cv[..., :2] - expert[..., :2], axis=-1)
    np.testing.assert_allclose([m["cv_ade"], m["cv_fde"], m["cv_ade_all"]], [err.mean(), err[:, -1].mean(),
                                                                              err.mean()], rtol=1e-6)
    assert m["cv_ade"] > 0.05  # the scenes are not all constant-velocity ones: the comparison means something

    texts[0] = "no idea"  # an unparsed answer: left out of ade (paired cv_ade too), the CV plan in ade_all
    m2, records = te.score(texts, scenes)
    assert m2["parse_rate"] == 0.8 and not records[0]["parsed"] and records[0]["ade"] is None
    np.testing.assert_allclose(m2["cv_ade"], err[1:].mean(), rtol=1e-6)
    np.testing.assert_allclose(m2["ade_all"], (err[0].mean() + 4 * m2["ade"]) / 5, rtol=1e-6)


def test_linear_reference_is_least_squares_so_it_beats_cv_in_sample(scenes):
    """CV's x, y are linear in the features (velocity x t): the fit's in-sample squared xy error is at most CV's."""
    train = te.sft_train_scenes(40, seed=0)
    predict = te.fit_linear_reference(train, ridge=0.0)
    expert = np.asarray(train.expert, np.float64)
    fit = predict(train)
    assert fit.shape == (40, 8, 3)
    cv = constant_velocity_plan(train.status, train.history)
    assert ((fit - expert)[..., :2] ** 2).sum() <= ((cv - expert)[..., :2] ** 2).sum()
    texts = [dp.trajectory_answer(e) for e in scenes.expert]
    m, records = te.score(texts, scenes, reference=te.fit_linear_reference(train))
    assert np.isfinite(m["linear_ade"]) and m["linear_ade"] > m["ade"] and "linear_ade" in records[0]


# ------------------------------------------------------------------------------------------------ prompt, batching

@pytest.mark.parametrize("system", [None, tpl.INTERNVL2_5_SYSTEM])
def test_prompt_is_the_sft_trajectory_rows_prompt(tok, scenes, tmp_path, system):
    """The eval asks exactly what SFT trained: the trajectory row's ids up to the answer, and its tiles."""
    scfg = tpl.sample_config(iv.get_config("tiny"), max_dynamic_patch=6, system_message=system,
                             max_seq_length=4096, pad_to_max_length=False)
    scene = world.index_scene(scenes, 2)
    render.save_png(render.render_front(scene, *te.FRONT_SIZE), str(tmp_path / "front.png"))
    row = scene_qa.qa_rows_for_scene(scene, "s", "front.png", "bev.png")["trajectory"][0]
    sample = tpl.build_sample(row["conversations"], [str(tmp_path / row["image"])], tok, scfg)
    tiles = te.front_tiles(scene, scfg)
    ids = te.prompt_ids(scene, tok, scfg, len(tiles))
    np.testing.assert_array_equal(sample["input_ids"][:len(ids)], ids)
    assert (sample["labels"][:len(ids)] == tpl.IGNORE_INDEX).all() and sample["labels"][len(ids)] >= 0
    np.testing.assert_array_equal(sample["pixel_values"], tiles)
    answer = tok.decode(sample["input_ids"][len(ids):-2])  # up to <|im_end|>\n
    np.testing.assert_allclose(dp.parse_trajectory(answer), scene.expert, atol=0.005 + 1e-9)


class ExpertGenerator:
    """Stands in for vlm/generate.Generator: answers each prompt row with its scene's expert text (then EOS)."""

    def __init__(self, ev, answer=None):
        self.ev, self.answer, self.calls = ev, answer, []

    def __call__(self, mdef, enc, temperature, runtime=None):
        assert temperature == 0.0
        self.enc = enc
        return self.generate

    def generate(self, params, prompts, rng):
        b, p = prompts["prompt_ids"].shape
        s = self.ev.scfg.image_size
        assert prompts["pixel_values"].shape == (b, self.ev.max_tiles, s, s, 3) and prompts["image_flags"].all()
        self.calls.append(b)
        out = np.full((b, self.enc.layout.answer_len), self.enc.pad_id, np.int32)
        for r in range(b):
            i = next(k for k, x in enumerate(self.ev.ids) if np.array_equal(prompts["prompt_ids"][r, p - len(x):], x)
                     and prompts["prompt_mask"][r].sum() == len(x))
            text = self.answer(i) if self.answer else dp.trajectory_answer(self.ev.scenes.expert[i])
            ids = tok_ids(self.enc.tok, text) + [self.enc.eos_id]
            out[r, :len(ids)] = ids[:self.enc.layout.answer_len]
        return out


def tok_ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_batched_answers_of_an_expert_model_score_zero(tok, scenes, monkeypatch):
    cfg = iv.get_config("tiny")
    scfg = tpl.sample_config(cfg, max_dynamic_patch=6, system_message=None)
    ev = te.TrajectoryEval(scenes, tok, cfg, scfg, batch_size=2)
    fake = ExpertGenerator(ev)
    monkeypatch.setattr(te, "Generator", fake)
    m = ev(None, None, out_dir=None)
    assert fake.calls == [2, 2, 2]  # 5 scenes in fixed batches of 2: the last one padded
    assert m["parse_rate"] == 1.0 and m["ade"] <= 0.005 * np.sqrt(2)
    fake.answer = lambda i: "[PT, (1.00, 2.00, 0.10)]" * 30  # longer than the answer budget: cut, not parsed
    assert ev(None, None)["parse_rate"] == 0.0


# ------------------------------------------------------------------------------------------------ the sft stage

def test_eval_keys_are_validated():
    c = stage_configs.sft_stage_config("tiny")
    c.data.synthetic_scenes = 2
    c.eval.trajectory_scenes = -1
    with pytest.raises(configs.ConfigError, match="config.eval.trajectory_scenes"):
        config_types.typed(c)
    c.eval.trajectory_scenes, c.eval.trajectory_batch_size = 4, 0
    with pytest.raises(configs.ConfigError, match="config.eval.trajectory_batch_size"):
        config_types.typed(c)


def test_a_max_seq_length_that_cuts_the_trajectory_rows_is_warned_about(tok, capsys):
    """The demo's 512 tokens cut the ~600-token trajectory rows: the model never sees the list's end or EOS."""
    c = config_types.typed(stage_configs.sft_stage_config("tiny"))
    ev_cfg = dataclasses.replace(c.eval, trajectory_scenes=2)
    for max_len, warned in ((512, True), (640, False)):
        d = dataclasses.replace(c.data, synthetic_scenes=0, system_message="", max_seq_length=max_len)
        ev = te.from_sft_config(ev_cfg, d, iv.get_config("tiny"), tok)
        assert 580 < ev.row_len <= 640
        assert ("data.max_seq_length 512 cuts it" in capsys.readouterr().out) == warned


@pytest.mark.slow  # ~30-60 s (one SFT step + the generation's compile, twice); the default suite checks the rerun
# path on test_sft.py's finished run (test_mid_epoch_resume_gives_identical_losses)
def test_sft_stage_reports_the_text_waypoint_ade_and_a_rerun_evaluates_a_finished_run(tmp_path):
    def config(scenes):
        c = stage_configs.sft_stage_config("tiny")
        c.model.update(remat=False, dtype="float32")
        c.data.update(synthetic_scenes=2, max_dynamic_patch=6, max_seq_length=640, system_message="", pack=True,
                      length_buckets=(640,), tile_buckets=(24,), num_workers=1)
        c.train.update(num_steps=1, batch_size=8, log_every=1, checkpoint_every=1, eval_every=1,
                       async_checkpoint=False, tensorboard=False)
        c.export.at_end = False
        c.eval.update(trajectory_scenes=scenes, trajectory_batch_size=4)
        return c

    wd = str(tmp_path / "sft")
    out = sft.run(config(3), wd)
    m = json.load(open(os.path.join(wd, "eval_trajectory", "metrics.json")))
    assert m["num_scenes"] == 3 and m["step"] == 1 and 0 <= m["parse_rate"] <= 1
    assert out["eval_trajectory/num_scenes"] == 3 and np.isfinite(out["eval_trajectory/linear_ade_all"])
    scenes = te.held_out_scenes(3, 0)
    err = np.linalg.norm(constant_velocity_plan(scenes.status, scenes.history)[..., :2] - scenes.expert[..., :2], axis=-1)
    np.testing.assert_allclose(m["cv_ade_all"], err.mean(), rtol=1e-6)
    answers = [json.loads(x) for x in open(os.path.join(wd, "eval_trajectory", "answers.jsonl"))]
    assert len(answers) == 3 and all(isinstance(a["answer"], str) for a in answers)
    assert read_metrics(wd, "eval")[-1]["trajectory/num_scenes"] == 3

    train_rows = len(read_metrics(wd, "train"))
    out = sft.run(config(4), wd)  # the finished run, asked again: no step trained, the eval on 4 scenes
    assert len(read_metrics(wd, "train")) == train_rows
    assert json.load(open(os.path.join(wd, "eval_trajectory", "metrics.json")))["num_scenes"] == 4
    assert out["eval_trajectory/num_scenes"] == 4
