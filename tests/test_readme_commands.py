"""Every command README.md prints, in its smallest form, and the overrides it gives land in each step's config.json.

The commands are read from the README's ```bash blocks by bash itself (loops, `$M`, line continuations), with
`python`/`make` replaced by recorders, so the list is exactly what a user's shell would run. Each main.py command
gets the README's arguments, then `SMALLEST` (1 step, few scenes; a repeated key: the last one wins, as on the
command line), with the README's stand-in paths replaced by files in tmp_path.

`test_readme_command` (every command, fast) runs the real command line through the real flag parser and main.run,
pipeline included; each stage's body is replaced by what every stage does first — writing its config.json through
`provenance.write_config` — so it checks that no README key is unknown, mistyped or ignored in seconds. The stage
bodies themselves run in the stage tests (CONTRIBUTING.md, README claims → tests) and, chained on one tmp dir in
README order, in `test_readme_commands_run_for_real` (slow).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess

import pytest
from cli_config import parse_config

from recogdrive_jax import main as cli
from recogdrive_jax import provenance, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# Stand-ins the README uses for files a user has -> files the test makes (or names) in tmp_path.
PATHS = {"/ckpt/InternVL3-8B": "hf_internvl", "/data/recogdrive_pretrain.json": "qa/synthetic_meta.json",
         "recogdrive_stage2.ckpt": "runs/planner_stage2.ckpt", "/tmp/sanity": "sanity"}

_TRAIN = ["--config.train.num_steps=1", "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.checkpoint_every=0", "--config.train.eval_every=0", "--config.train.tensorboard=false"]
_SCENES = ["--config.data.num_train_scenes=16", "--config.data.num_eval_scenes=8"]
_EVAL = ["--config.eval.num_plots=0", "--config.eval.batch_size=8"]
_TINY_DIT = ["--config.planner.variant=tiny", "--config.planner.vl_dim=64"]
_TINY_VLM = ["--config.model.dtype=float32", "--config.model.remat=false"]
_NAV = ["--config.eval_nav.max_routes=1", "--config.eval_nav.max_new_tokens=8", "--config.eval_nav.num_render=0"]
# The smallest form of each config file's commands (appended after the README's own arguments).
SMALLEST = {
    "configs/recogdrive_8b/sft.py": _TRAIN + _TINY_VLM + [
        "--config.data.max_seq_length=512", "--config.data.max_dynamic_patch=2", "--config.data.num_workers=1",
        "--config.data.per_device_batch_size=0", "--config.data.num_epochs=0", "--config.export.at_end=false",
        "--config.eval.max_batches=1", "--config.optim.grad_accum=1"],
    "configs/recogdrive_8b/cache.py": _SCENES + _TINY_VLM[:1] + ["--config.cache.batch_size=8",
                                                                 "--config.cache.max_dynamic_patch=2"],
    # a tiny DiT reading the tiny VLM's cache (Hv 64)
    "configs/recogdrive_8b/il.py": _TRAIN + _SCENES + _EVAL + _TINY_DIT,
    "configs/recogdrive_8b/rl.py": _TRAIN + _SCENES + _EVAL + _TINY_DIT,
    "configs/recogdrive_8b/eval.py": _SCENES[1:] + _EVAL + _TINY_DIT,
    "configs/demo.py": _TRAIN + _SCENES + _EVAL,  # a pipeline: each override reaches every step with the key
    "configs/demo_rl.py:rl": _TRAIN + _SCENES + _EVAL,
    "configs/demo_rl.py:eval": _SCENES[1:] + _EVAL,
    "configs/virl/sft.py": _TRAIN + _NAV + ["--config.virl_sft.num_routes=2", "--config.virl_sft.rail_redraws=1"],
    "configs/virl/ppo.py": _TRAIN + _NAV + [
        "--config.ppo.num_envs=8", "--config.ppo.num_steps=1", "--config.ppo.epochs=1",
        "--config.ppo.num_minibatches=1", "--config.ppo.minibatch_grad_accum=1", "--config.optim.optimizer_steps_per_step=1",
        "--config.prompt.max_new_tokens=8"],
    "configs/virl/eval_nav.py": _NAV + ["--config.eval_nav.splits=in_distribution"],
    "configs/navsim_fake.py": ["--config.train.num_steps=1"],
}
SMALLEST_ARGS = {  # other modules: their smallest arguments, or why the fast test leaves them out
    "recogdrive_jax.sim.sanity": ["--num_scenes", "4", "--num_bev", "1"],
}
SKIP_FAST = {
    "recogdrive_jax.sim.sanity": "not main.py (no config.json); its scoring compiles PDM: run for real in the slow "
                                "test, scored by tests/test_pdm*.py",
    "recogdrive_jax.convert": "a conversion (no config.json); run for real in the slow test, covered by "
                              "tests/test_internvl_convert.py and tests/test_planner_convert.py",
    "recogdrive_jax.eval.nav_compare": "reads eval_nav outputs (no config.json); run for real in the slow test, "
                                       "covered by tests/test_ppo_math.py::test_nav_compare_table_mean_and_sd",
}
SKIP_REAL = {
    ("recogdrive_jax.convert", "navsim-metric-cache"): "needs the optional navsim install and a NAVSIM metric cache",
}

_BASH_PRELUDE = r"""
python() { printf '%s\x1f' "$@"; printf '\n'; }
make() { printf 'make\x1f%s\x1f' "$@"; printf '\n'; }
command_not_found_handle() { printf 'unknown\x1f%s\x1f' "$@"; printf '\n'; }
PATH=/nonexistent
"""


def readme_commands() -> list[list[str]]:
    """The argv (after `python`) of every command in the README's bash blocks, in order."""
    text = open(README).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        # the syntax line `--config=configs/<name>.py[:arg] ...` is a template, not a command
        body = "\n".join(line for line in block.splitlines() if "<name>" not in line)
        r = subprocess.run(["/bin/bash", "-c", _BASH_PRELUDE + body], capture_output=True, text=True, cwd=ROOT,
                           timeout=30)
        assert r.returncode == 0 and not r.stderr, f"README bash block does not parse:\n{block}\n{r.stderr}"
        for line in r.stdout.splitlines():
            argv = line.split("\x1f")[:-1]
            assert argv[0] != "unknown", f"README runs a command the test does not know: {argv}"
            if argv[0] != "make":  # `make demo` / `make test` are CI's own two commands (.ci/run)
                out.append(argv)
    return out


COMMANDS = readme_commands()


def _id(argv):
    wd = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
    return (wd[0] if wd else " ".join(argv[1:3])).replace("/", "_")


def _config_key(argv) -> str:
    """The SMALLEST key of a main.py command: 'configs/x.py:arg' when listed so, else 'configs/x.py'."""
    cfg = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")][0]
    return cfg if cfg in SMALLEST else cfg.split(":")[0]


def smallest_form(argv: list[str], tmp: str) -> list[str]:
    """README argv -> argv run by the test: stand-in paths -> tmp files, config file absolute, SMALLEST appended."""
    def sub(a):
        for stand_in, mine in PATHS.items():
            a = a.replace(stand_in, os.path.join(tmp, mine))
        return a
    args = [sub(a) for a in argv[2:]]
    if argv[1] == "recogdrive_jax.main":
        key = _config_key(argv)
        args = [a.replace("--config=configs/", f"--config={ROOT}/configs/") for a in args] + SMALLEST[key]
    elif argv[1] in SMALLEST_ARGS:
        args += SMALLEST_ARGS[argv[1]]
    return args


def overrides_of(args: list[str]) -> dict[str, str]:
    """--config.a.b=v arguments -> {'a.b': 'v'}; the last of a repeated key wins (as with absl flags)."""
    out = {}
    for a in args:
        if a.startswith("--config.") and "=" in a:
            key, value = a[len("--config."):].split("=", 1)
            out[key] = value
    return out


def _lookup(tree: dict, path: str):
    for p in path.split("."):
        if not isinstance(tree, dict) or p not in tree:
            raise KeyError(path)
        tree = tree[p]
    return tree


def _matches(raw: str, got) -> bool:
    """Does config.json's value equal the command line's text (parsed as ml_collections parses it)?"""
    if isinstance(got, bool):
        return raw.lower() in ("true", "1") if got else raw.lower() in ("false", "0")
    if isinstance(got, (int, float)):
        return float(raw) == float(got)
    if isinstance(got, list):
        try:
            want = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            want = raw
        return list(want if isinstance(want, (list, tuple)) else (want,)) == got
    return raw == got


def check_config_jsons(workdir: str, overrides: dict[str, str]) -> list[str]:
    """Asserts each override in every config.json of the run (one per pipeline step); returns the dirs checked."""
    top = provenance.read_config(workdir)
    if top["stage"] != "pipeline":
        dirs = {"": workdir}
    else:
        dirs = {s.split(":")[0]: os.path.join(workdir, s.split(":")[0]) for s in top["pipeline"]["steps"].split(",")}
    got = {name: provenance.read_config(d) for name, d in dirs.items()}
    for name, cfg in got.items():
        p = cfg["provenance"]
        assert p["packages"]["jax"] and p["devices"]["device_count"] >= 1 and "commit" in p["git"], name
    for key, raw in overrides.items():
        if key.startswith("pipeline.configs."):  # one step's own override
            step, rest = key[len("pipeline.configs."):].split(".", 1)
            if step in got:
                assert _matches(raw, _lookup(got[step], rest)), (step, key, raw)
            continue
        if key.startswith("pipeline."):
            continue
        holders = []
        for name, cfg in got.items():
            try:
                value = _lookup(cfg, key)
            except KeyError:
                continue
            holders.append(name)
            assert _matches(raw, value), f"{name or workdir}: config.{key} is {value!r}, the command line says {raw!r}"
        assert holders, f"config.{key}: in no config.json of {workdir}"
    return list(dirs.values())


def _recording_get_stage(real_get_stage):
    def get_stage(name):
        if name == "pipeline":
            return real_get_stage(name)
        real_get_stage(name)  # the stage exists and imports

        def first_thing_every_stage_does(config, workdir):
            provenance.write_config(config, workdir)
            return {}
        return first_thing_every_stage_does
    return get_stage


def run_main(args: list[str]) -> str:
    config = parse_config(*args)
    workdir = cli.check_workdir([a.split("=", 1)[1] for a in args if a.startswith("--workdir=")][0])
    cli.run(config, workdir)
    return workdir


def test_readme_has_the_documented_commands():
    main_cfgs = {_config_key(a) for a in COMMANDS if a[1] == "recogdrive_jax.main"}
    assert {"configs/demo.py", "configs/recogdrive_8b/sft.py", "configs/virl/ppo.py"} <= main_cfgs
    assert main_cfgs <= set(SMALLEST), f"README commands without a smallest form here: {main_cfgs - set(SMALLEST)}"
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("argv", COMMANDS, ids=[_id(a) for a in COMMANDS])
def test_readme_command(argv, tmp_path, monkeypatch):
    if argv[1] != "recogdrive_jax.main":
        pytest.skip(SKIP_FAST[argv[1]])
    monkeypatch.chdir(tmp_path)  # the README's relative workdirs (runs/..., workdir/...) land in tmp_path
    monkeypatch.setattr(stages, "get_stage", _recording_get_stage(stages.get_stage))
    args = smallest_form(argv, str(tmp_path))
    workdir = run_main(args)
    checked = check_config_jsons(workdir, overrides_of(args))
    if provenance.read_config(workdir)["stage"] == "pipeline":
        assert len(checked) == len(provenance.read_config(workdir)["pipeline"]["steps"].split(","))
        summary = json.load(open(os.path.join(workdir, "pipeline_summary.json")))
        assert summary["completed"] and [s["name"] for s in summary["steps"]] == [os.path.basename(d)
                                                                                  for d in checked]


def _make_inputs(tmp: str):
    """The files the README's stand-in paths name: a tiny InternVL HF directory and a synthetic QA meta JSON."""
    import jax
    import numpy as np

    from recogdrive_jax.convert import internvl as conv
    from recogdrive_jax.data.tokenizer import build_tokenizer
    from recogdrive_jax.models import internvl as iv
    from recogdrive_jax.data import scene_qa as qa
    hf = os.path.join(tmp, PATHS["/ckpt/InternVL3-8B"])
    cfg = iv.get_config("tiny")
    conv.save_hf(jax.tree.map(np.asarray, conv.model_params(iv.init_model(cfg, seed=3))), cfg, hf, dtype="float32")
    build_tokenizer(hf)
    meta = qa.write_qa_dataset(os.path.join(tmp, "qa"), 4, image_size=(56, 112))
    assert meta == os.path.join(tmp, PATHS["/data/recogdrive_pretrain.json"])


@pytest.mark.slow
def test_readme_commands_run_for_real(tmp_path, monkeypatch):
    """Every README command in its smallest form with the real stages, chained in README order in one tmp dir."""
    import runpy
    import sys
    monkeypatch.chdir(tmp_path)
    tmp = str(tmp_path)
    _make_inputs(tmp)
    for argv in COMMANDS:
        if tuple(argv[1:3]) in SKIP_REAL:
            continue
        args = smallest_form(argv, tmp)
        if argv[1] == "recogdrive_jax.main":
            check_config_jsons(run_main(args), overrides_of(args))
            continue
        if argv[1:3] == ["recogdrive_jax.convert", "planner"] and "--from-torch" in args:
            # the README's upstream checkpoint: made by the reverse command from the README's il run
            src = os.path.join(tmp, "runs", "il8b")
            from recogdrive_jax.convert import planner as conv_planner
            assert conv_planner.main(["--to-torch", src, "--out", args[args.index("--from-torch") + 1]]) == 0
        monkeypatch.setattr(sys, "argv", [argv[1], *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_module(argv[1], run_name="__main__")
        assert e.value.code in (0, None), argv
