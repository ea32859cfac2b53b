"""User-fixable faults end in one `error:` line naming the culprit, exit status 2, no traceback (issue 13).

One subprocess per fault, run as a user would (`python -m recogdrive_jax.main` / `python -m recogdrive_jax.convert`)
with tiny inputs; the bad-row skip flag and the planner splits are checked in-process. Cache damage (a missing chunk,
NaN rows) is in tests/test_hidden_cache.py.
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from PIL import Image
from safetensors.numpy import save_file

from recogdrive_jax import stage_configs
from recogdrive_jax.data import planner_data
from recogdrive_jax.sim import world
from recogdrive_jax.vlm import qa_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = os.path.join(ROOT, "tests", "configs", "tiny_sft.py")
BAD_ROW = 3  # the row whose image is truncated (line 4 of the JSONL)


def write_qa(out, n: int, truncated: int | None = None) -> str:
    """n one-image QA rows with 40x60 noise PNGs; row `truncated`'s PNG is cut in half (its header still reads)."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, "qa.jsonl"), "w") as f:
        for i in range(n):
            path = os.path.join(out, "images", f"{i}.png")
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 60, 3), np.uint8)).save(path)
            if i == truncated:
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
            f.write(json.dumps({"id": i, "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat is ahead?"}, {"from": "gpt", "value": "a road"}]}) + "\n")
    meta = os.path.join(out, "meta.json")
    json.dump({"toy": {"root": str(out), "annotation": os.path.join(out, "qa.jsonl"), "repeat_time": 1}},
              open(meta, "w"))
    return meta


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    rand = d / "random.safetensors"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    foreign = d / "foreign.safetensors"
    save_file({"encoder.layer.0.weight": np.zeros((3, 4), np.float32)}, str(foreign))
    return {"dir": d, "truncated": write_qa(d / "truncated", 8, truncated=BAD_ROW),  # exactly one batch
            "small": write_qa(d / "small", 3), "random": str(rand), "foreign": str(foreign)}


def _run(module, args, cwd):
    # one device: the same faults, a quicker compile of the tiny model's initialisation
    env = subprocess_env(1)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


# name -> (module, args, substrings the error line must contain); "{x}" is filled from the `inputs` fixture
FAULTS = {
    "missing_config": ("recogdrive_jax.main", ["--config=configs/nope.py"], ["--config=configs/nope.py",
                                                                             "No such file"]),
    "missing_config_with_override": ("recogdrive_jax.main", ["--config=configs/nope.py", "--config.train.num_steps=2"],
                                     ["--config=configs/nope.py", "No such file"]),
    "unknown_pipeline_step": ("recogdrive_jax.main", ["--config=configs/demo.py:foo"], ["configs/demo.py", "foo"]),
    "truncated_image": ("recogdrive_jax.main", [f"--config={TINY_SFT}", "--config.data.meta_path={truncated}"],
                        [f"qa.jsonl:{BAD_ROW + 1}", f"images/{BAD_ROW}.png", "truncated", "skip_bad_rows"]),
    "dataset_smaller_than_batch": ("recogdrive_jax.main", [f"--config={TINY_SFT}", "--config.data.meta_path={small}"],
                                   ["{small}", "3 samples", "global batch of 8", "config.train.batch_size"]),
    "random_safetensors": ("recogdrive_jax.convert", ["planner", "--from-torch", "{random}", "--out", "{dir}/o1"],
                           ["{random}", "not a readable .safetensors"]),
    "foreign_safetensors": ("recogdrive_jax.convert", ["planner", "--from-torch", "{foreign}", "--out", "{dir}/o2"],
                            ["{foreign}", "missing key(s)", "feature_encoder.weight", "encoder.layer.0.weight"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_one_error_line(fault, inputs, tmp_path):
    module, args, expect = FAULTS[fault]
    fill = lambda s: s.format(**inputs)  # noqa: E731
    args = [fill(a) for a in args]
    if module == "recogdrive_jax.main":
        args.append(f"--workdir={tmp_path / 'work'}")
    r = _run(module, args, ROOT)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for s in map(fill, expect):
        assert s in last, (s, last)
    assert sum(line.startswith("error:") for line in r.stderr.splitlines()) == 1, r.stderr


def test_truncated_image_row_is_skipped_with_the_flag(inputs, caplog):
    """`data.skip_bad_rows=True`: the row becomes padding, is counted and named in a warning; the batch is built."""
    from recogdrive_jax.data import qa as qa_index
    from recogdrive_jax.data.tokenizer import build_tokenizer
    from recogdrive_jax.models import internvl as iv
    tok = build_tokenizer()
    cfg = iv.get_config("tiny", max_dynamic_patch=1)
    dcfg = stage_configs.data_block(max_seq_length=256, max_dynamic_patch=1, use_thumbnail=False, length_buckets=(256,),
                          tile_buckets=(1,), skip_bad_rows=True)
    plan = qa_batches.build_batches(inputs["truncated"], tok, cfg, dcfg, global_batch=8, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = plan.batch(0)
    assert plan.skipped == 1
    assert f"qa.jsonl:{BAD_ROW + 1}: cannot decode image" in caplog.text and f"{BAD_ROW}.png" in caplog.text
    real_rows = batch["attention_mask"].any(-1)
    # the other 7 rows are intact: their 7 tiles (one a row), packed flat (data/length_grouping.py)
    assert real_rows.sum() == 7 and int(batch["image_flags"].sum()) == 7
    # without the flag, the row is an error naming the file and line (the CLI test above shows the one line)
    strict = qa_batches.build_batches(inputs["truncated"], tok, cfg, stage_configs.data_block(**{**dcfg.to_dict(), "skip_bad_rows": False}),
                               global_batch=8, seed=0)
    with pytest.raises(qa_index.QADataError, match=rf"qa.jsonl:{BAD_ROW + 1}: cannot decode image .*{BAD_ROW}.png"):
        strict.batch(0)


def test_planner_split_smaller_than_a_batch_names_its_source():
    split = planner_data.PlannerSplit("train", world.stack_scenes(world.generate_scenes(3, seed=0)), None, None)
    with pytest.raises(planner_data.TooFewSamplesError,
                       match=r"split 'train' \(config.data.num_train_scenes\) has 3 samples, fewer than one global "
                             r"batch of 8 \(config.train.batch_size\)"):
        planner_data.train_iterator(split, 8, seed=0)
