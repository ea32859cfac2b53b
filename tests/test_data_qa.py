"""Synthetic QA writer (InternVL format) and the Grain QA mixture: parsing, repeat_time, resume, bad rows."""
import json
import os

import numpy as np
import pytest

from recogdrive_jax.data import qa
from recogdrive_jax.data import scene_qa as sim_qa


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    meta = sim_qa.write_qa_dataset(str(out), num_scenes=4, seed=2, image_size=(64, 112), bev_size=100,
                                   repeat_time={"perception": 0.5, "trajectory": 2, "planning": 1.5})
    return out, meta


def test_rows_parse_and_reference_images(qa_dir):
    out, meta_path = qa_dir
    meta = json.load(open(meta_path))
    assert set(meta) == {f"synthetic_{k}" for k in sim_qa.DEFAULT_REPEAT}
    for name, d in meta.items():
        rows = [json.loads(line) for line in open(d["annotation"])]
        assert len(rows) == d["length"] > 0
        for r in rows:
            images = r["image"] if isinstance(r["image"], list) else [r["image"]]
            assert all(os.path.isfile(os.path.join(d["root"], p)) for p in images)
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == len(images)
    traj = [json.loads(line) for line in open(meta["synthetic_trajectory"]["annotation"])]
    assert traj[0]["conversations"][1]["value"].startswith("[PT, (")
    cog = json.loads(open(meta["synthetic_cognitive"]["annotation"]).readline())["conversations"][1]["value"]
    assert [ln.split(":")[0] for ln in cog.split("\n")] == ["Perception", "Understanding", "Reasoning", "Decision"]


def test_mixture_counts_follow_repeat_time(qa_dir):
    _, meta_path = qa_dir
    meta = json.load(open(meta_path))
    records, stats = qa.build_index(meta_path, seed=0)
    n = {k: d["length"] for k, d in meta.items()}
    assert stats.per_dataset["synthetic_perception"] == int(n["synthetic_perception"] * 0.5)
    assert stats.per_dataset["synthetic_trajectory"] == 2 * n["synthetic_trajectory"]
    assert stats.per_dataset["synthetic_planning"] == n["synthetic_planning"] + int(n["synthetic_planning"] * 0.5)
    assert stats.total == len(records) == sum(stats.per_dataset.values())
    again, _ = qa.build_index(meta_path, seed=0)
    other, _ = qa.build_index(meta_path, seed=1)
    ids = lambda rs: [r["id"] for r in rs]  # noqa: E731
    assert ids(again) == ids(records)
    per = lambda rs: [r["id"] for r in rs if r["dataset"] == "synthetic_perception"]  # noqa: E731
    assert per(other) != per(records) or len(per(records)) <= 1


def test_pipeline_transform_and_resume(qa_dir):
    _, meta_path = qa_dir
    seen = []

    def transform(sample):
        seen.append(sample["images"][0].shape)
        return {"index": sample["index"], "n_images": np.int32(len(sample["images"]))}

    ds, stats = qa.qa_dataset(meta_path, transform=transform, seed=3, num_epochs=None, batch_size=2)
    it = iter(ds)
    expected = [next(it)["index"].tolist() for _ in range(6)]
    assert seen and seen[0] == (64, 112, 3)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = it.get_state()
    ds2, _ = qa.qa_dataset(meta_path, transform=transform, seed=3, num_epochs=None, batch_size=2)
    it2 = iter(ds2)
    it2.set_state(state)
    assert [next(it2)["index"].tolist() for _ in range(4)] == expected[2:]
    one_epoch, _ = qa.qa_dataset(meta_path, seed=3, load_images=False)
    assert sorted(int(s["index"]) for s in one_epoch) == list(range(stats.total))


def _meta_with(tmp_path, lines, root):
    ann = tmp_path / "bad.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"bad": {"root": str(root), "annotation": str(ann), "repeat_time": 1, "length": 3}}))
    return str(meta), str(ann)


def test_bad_rows_error_or_skip(qa_dir, tmp_path):
    out, meta_path = qa_dir
    good = open(json.load(open(meta_path))["synthetic_planning"]["annotation"]).readline().strip()
    row = json.loads(good)
    missing = dict(row, image="images/nope.png")
    two_tokens = dict(row, conversations=[{"from": "human", "value": "<image>\n<image>\nq"},
                                          {"from": "gpt", "value": "a"}])
    cases = [("{not json", "malformed JSON"), (json.dumps(missing), "image file not found"),
             (json.dumps(two_tokens), "2 '<image>' placeholders but 1 images")]
    for k, (bad, msg) in enumerate(cases):
        meta, ann = _meta_with(tmp_path, [good, bad, good], out)
        with pytest.raises(qa.QADataError, match=rf"{ann}:2: .*{msg}"):
            qa.build_index(meta)
    meta, _ = _meta_with(tmp_path, [good] + [c for c, _ in cases] + [good], out)
    records, stats = qa.build_index(meta, skip_bad_rows=True)
    assert len(records) == 2 and stats.bad_rows == 3 and stats.rows_read == 5
