"""Planner checkpoint conversion: strict key checks, dropped entries, CLI round trips (bitwise)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from torch_ref.planner import TorchPlanner, lightning_state_dict, randomize_  # noqa: E402

from recogdrive_jax.convert import planner as conv  # noqa: E402
from recogdrive_jax.models.planner import planner_config  # noqa: E402



@pytest.fixture(scope="module")
def tiny():
    cfg = planner_config("tiny")
    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    randomize_(tm, 0)
    return cfg, lightning_state_dict(tm)


def test_state_dict_roundtrip_bitwise(tiny):
    cfg, sd = tiny
    params = conv.torch_state_dict_to_params(sd, cfg, verbose=False)
    back = conv.params_to_torch_state_dict(params, cfg)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    again = conv.torch_state_dict_to_params(back, cfg, verbose=False)
    flat_a, flat_b = conv._flatten(params), conv._flatten(again)
    assert flat_a.keys() == flat_b.keys()
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


@pytest.mark.parametrize("ext", ["ckpt", "pt", "safetensors"])
def test_cli_roundtrip(tiny, tmp_path, ext, capsys):
    cfg, sd = tiny
    src = tmp_path / f"in.{ext}"
    full = dict(sd)
    # a Stage-3 checkpoint of the original release also carries the frozen reference policy
    full.update({k.replace("agent.action_head.", "agent.action_head.old_policy."): v.clone()
                 for k, v in sd.items()})
    if ext == "ckpt":
        torch.save({"state_dict": full, "epoch": 3, "global_step": 120}, src)
    else:
        conv.save_torch_file(full, src)
    assert conv.main(["--from-torch", str(src), "--out", str(tmp_path / "orbax")]) == 0
    err = capsys.readouterr().err
    assert "old_policy" in err and "eta.eta_logit" in err and "schedule buffers" in err
    assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "planner_config.json").is_file()
    loaded_cfg, params = conv.load_planner_checkpoint(tmp_path / "orbax")
    assert loaded_cfg == cfg  # inferred from the shapes
    planner = conv.restore_planner(tmp_path / "orbax", nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(planner.feature_encoder.kernel[...]),
                                  sd["agent.action_head.feature_encoder.weight"].numpy().T)
    out = tmp_path / f"out.{ext}"
    assert conv.main(["--to-torch", str(tmp_path / "orbax"), "--out", str(out)]) == 0
    back = conv.load_torch_file(out)
    assert set(back) == set(sd)
    for k, v in sd.items():
        b = back[k] if isinstance(back[k], torch.Tensor) else torch.from_numpy(np.asarray(back[k]))
        assert b.dtype == v.dtype and torch.equal(b, v), k
    # refuses to overwrite an existing checkpoint
    assert conv.main(["--from-torch", str(src), "--out", str(tmp_path / "orbax")]) == 2


def test_bad_checkpoints_list_offending_keys(tiny):
    cfg, sd = tiny
    bad = dict(sd)
    del bad["agent.action_head.model.transformer_blocks.1.attn.to_k.weight"]
    del bad["agent.action_head.ddpm_betas"]
    bad["agent.action_head.model.transformer_blocks.2.norm1.weight"] = torch.ones(cfg.embed_dim)
    bad["agent.action_head.fusion_projector.weight"] = torch.zeros(cfg.embed_dim, 2 * cfg.embed_dim)
    bad["agent.backbone.model.embed.weight"] = torch.zeros(2, 2)
    with pytest.raises(conv.CheckpointKeyError) as e:
        conv.torch_state_dict_to_params(bad, cfg, verbose=False)
    msg = str(e.value)
    for s in ["missing 2", "transformer_blocks.1.attn.to_k.weight", "ddpm_betas", "unexpected 2",
              "transformer_blocks.2.norm1.weight", "agent.backbone.model.embed.weight", "mis-shaped 1",
              "fusion_projector.weight: got (16, 32), expected (16, 48)"]:
        assert s in msg, (s, msg)
    # a flow-mode checkpoint loaded as ddim gets a hint
    flow = {k: v for k, v in sd.items() if not any(s in k for s in ("ddpm_", "ddim_", "eta."))}
    with pytest.raises(conv.CheckpointKeyError, match="flow"):
        conv.torch_state_dict_to_params(flow, cfg, verbose=False)
    conv.torch_state_dict_to_params(flow, cfg.replace(sampling_method="flow"), verbose=False)
    wrong_rope = dict(sd)
    wrong_rope["agent.action_head.model.rotary_embedder.inv_freq"] = torch.ones(cfg.head_dim // 2)
    with pytest.raises(conv.CheckpointKeyError, match="RoPE"):
        conv.torch_state_dict_to_params(wrong_rope, cfg, verbose=False)


def test_cli_errors(tiny, tmp_path, capsys):
    cfg, sd = tiny
    src = tmp_path / "in.pt"
    bad = dict(sd)
    del bad["agent.action_head.action_decoder.fc2.bias"]
    torch.save(bad, src)
    assert conv.main(["--from-torch", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "action_decoder.fc2.bias" in capsys.readouterr().err
    # --config enforces a size: the tiny checkpoint is not `small`
    torch.save(sd, src)
    assert conv.main(["--from-torch", str(src), "--out", str(tmp_path / "o2"), "--config", "small"]) == 2
    assert "mis-shaped" in capsys.readouterr().err
    # arbitrary pickled objects are refused (weights_only)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": sd, "obj": _Unsafe()}, evil)
    assert conv.main(["--from-torch", str(evil), "--out", str(tmp_path / "o3")]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert conv.main(["--from-torch", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o4")]) == 2


class _Unsafe:
    pass


# The key manifests in third_party/ are checked in tests/test_upstream_planner.py against upstream's own module.
