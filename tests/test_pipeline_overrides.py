"""An override on a pipeline config applies to every step that has the key; a key no step has is an error naming
it; `pipeline.configs.<step>.` overrides change one step. Parsed by the real flag parser, as on the command line."""
import os
import subprocess
import sys

import pytest
from cli_config import parse_config as parse

from recogdrive_jax import configs
from recogdrive_jax.stages import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def test_top_level_override_reaches_every_step_with_the_key():
    c = parse(f"--config={DEMO}", "--config.train.num_steps=2", "--config.optim.lr=1e6", "--config.seed=3",
              "--config.data.num_eval_scenes=8", "--config.optim.freeze=('vision_model/.*',)")
    steps = dict(pipeline.resolve(c, "/wd"))
    assert list(steps) == ["sft", "cache", "il_vlm", "il", "rl", "eval"]
    for name in ("sft", "il_vlm", "il", "rl"):
        assert steps[name].train.num_steps == 2 and steps[name].optim.lr == 1e6, name
        assert steps[name].optim.freeze == ("vision_model/.*",)
    assert "train" not in steps["cache"] and "train" not in steps["eval"]
    assert all(s.seed == 3 for s in steps.values())
    assert [steps[n].data.num_eval_scenes for n in ("cache", "il_vlm", "il", "rl", "eval")] == [8] * 5
    assert steps["rl"].train.init_from == "/wd/il"  # untouched keys keep the step's value, {workdir} filled
    assert pipeline.overrides(c) == {"train.num_steps": 2, "optim.lr": 1e6, "seed": 3, "data.num_eval_scenes": 8,
                                     "optim.freeze": ("vision_model/.*",)}


def test_override_equal_to_a_default_still_applies():
    # base_config's lr is 1e-4 and the il step's 2e-3: a comparison with defaults would miss this one
    steps = dict(pipeline.resolve(parse(f"--config={DEMO}:il", "--config.optim.lr=1e-4")))
    assert steps["il"].optim.lr == 1e-4


def test_step_override_changes_one_step_and_unset_slots_change_nothing():
    plain = dict(pipeline.resolve(parse(f"--config={DEMO}:il,rl")))
    assert plain["il"].train.num_steps == 1500 and plain["rl"].train.num_steps == 30
    steps = dict(pipeline.resolve(parse(f"--config={DEMO}:il,rl", "--config.pipeline.configs.il.train.num_steps=2")))
    assert steps["il"].train.num_steps == 2 and steps["rl"].train.num_steps == 30


def test_key_of_no_running_step_is_an_error_naming_it():
    with pytest.raises(configs.ConfigError, match=r"config\.rl\.bc_weight: no step of this pipeline \(il\) has "
                                                  r"this key; steps that do: \['rl'\]"):
        configs.validate_common(parse(f"--config={DEMO}:il", "--config.rl.bc_weight=0"))
    with pytest.raises(AttributeError, match="bogus"):  # no step at all: the flag parser rejects it
        parse(f"--config={DEMO}", "--config.train.bogus=1")


def test_invalid_override_names_the_step():
    with pytest.raises(configs.ConfigError, match=r"pipeline step 'sft': config\.train\.num_steps"):
        configs.validate_common(parse(f"--config={DEMO}", "--config.train.num_steps=0"))


def test_cli_unknown_key_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "recogdrive_jax.main", f"--config={DEMO}:il",
                        "--config.rl.bc_weight=0", f"--workdir={tmp_path}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.rl.bc_weight: no step of this pipeline")


def test_wall_times_printed_and_summarised_also_when_a_step_fails(tmp_path, monkeypatch, capsys):
    import json

    from recogdrive_jax import stages
    real = stages.get_stage

    def fake_get_stage(name):
        if name == "pipeline":
            return real(name)

        def run(config, workdir):
            if config.stage == "rl":
                raise RuntimeError("rl broke")
            return {"pdms": 0.5, "name": config.stage}
        return run
    monkeypatch.setattr(stages, "get_stage", fake_get_stage)
    with pytest.raises(RuntimeError, match="rl broke"):
        pipeline.run(parse(f"--config={DEMO}:il,rl,eval"), str(tmp_path))
    summary = json.load(open(tmp_path / "pipeline_summary.json"))
    assert not summary["completed"] and summary["failed_step"] == "rl"
    assert [(s["name"], s["ok"]) for s in summary["steps"]] == [("il", True), ("rl", False)]
    assert summary["steps"][0]["metrics"] == {"pdms": 0.5, "name": "il"}
    assert summary["total_wall_s"] >= sum(s["wall_s"] for s in summary["steps"]) >= 0
    out = capsys.readouterr().out
    assert "=== pipeline stopped at step 'rl'" in out and "| il | il |" in out and "| total |" in out
