"""InternVL checkpoint conversion, both directions, both PyTorch layouts.

Layouts (spec §2, manifest in `third_party/internvl_keys.md`):
* ``native``: transformers `InternVLForConditionalGeneration` (`model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head.weight`; legacy `*-hf` prefixes without `model.` are accepted on read);
* ``remote``: the original remote-code `InternVLChatModel` (`vision_model.*`, `mlp1.*`, `language_model.*`).

Reading streams one tensor at a time from (sharded) safetensors through `safe_open` into preallocated numpy
arrays of the Flax layout, so a conversion holds one copy of the model. Writing fills one shard at a time.

CLI (dispatched by `python -m recogdrive_jax.convert internvl ...`):
    internvl --from-hf DIR --out DIR [--dtype float32|bfloat16]      # HF dir -> Orbax params + config
    internvl --to-hf PARAMS_DIR --out DIR [--layout native|remote] [--dtype bfloat16] [--max-shard-size 5GB]
             [--tokenizer DIR]   # + tokenizer, chat template, processor configs (convert/hf_processor.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np
from recogdrive_jax.errors import CheckpointKeyError  # noqa: F401  (re-exported)

CONFIG_NAME = "recogdrive_internvl.json"  # our config (remote-layout HF form), next to the Orbax params
PARAMS_DIR = "params"


# ----------------------------------------------------------------------------------------------- key rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax parameter ← one or more PyTorch tensors (per layer when `stacked`)."""

    path: tuple[str, ...]
    keys: tuple[str, ...]  # PyTorch key templates; `{i}` = layer index
    stacked: bool
    to_flax: Callable[[list[np.ndarray]], np.ndarray]
    from_flax: Callable[[np.ndarray], list[np.ndarray]]


def _ident(ts):
    return ts[0]


def _ident_inv(a):
    return [a]


def _lin(ts):  # torch Linear [out, in] -> Flax kernel [in, out]
    return ts[0].T


def _lin_inv(a):
    return [a.T]


def _cat_lin(ts):  # separate q/k/v Linear -> fused Flax kernel
    return np.concatenate(ts, axis=0).T


def _cat_bias(ts):
    return np.concatenate(ts, axis=0)


def _split3_lin(a):
    return list(np.split(a.T, 3, axis=0))


def _split3_bias(a):
    return list(np.split(a, 3, axis=0))


def _conv(ts):  # OIHW -> HWIO
    return ts[0].transpose(2, 3, 1, 0)


def _conv_inv(a):
    return [a.transpose(3, 2, 0, 1)]


def rules(cfg, layout: str) -> list[Rule]:
    """The full mapping for `cfg` in `layout` ('native' or 'remote')."""
    if layout not in ("native", "remote"):
        raise ValueError(f"layout {layout!r}; expected 'native' or 'remote'")
    v = cfg.vision_config
    out: list[Rule] = []

    def add(path, keys, stacked, fwd=_ident, inv=_ident_inv):
        out.append(Rule(tuple(path.split(".")), tuple(keys), stacked, fwd, inv))

    norm_leaves = ("scale", "bias") if v.norm_type == "layer_norm" else ("weight",)
    # The two layouts name the same vision tensors differently (and native splits the fused qkv): a table of names
    # per layout, then one list of rules, so both always cover the same parameters.
    if layout == "remote":
        e, L = "vision_model.embeddings.", "vision_model.encoder.layers.{i}."
        vit = dict(cls=e + "class_embedding", pos=e + "position_embedding", patch=e + "patch_embedding",
                   norm1=L + "norm1", norm2=L + "norm2", proj=L + "attn.proj", q_norm=L + "attn.q_norm",
                   k_norm=L + "attn.k_norm", ls1=L + "ls1", ls2=L + "ls2", mlp=L + "mlp")
        qkv_kernel = [L + "attn.qkv.weight"], _lin, _lin_inv
        qkv_bias = [L + "attn.qkv.bias"], _ident, _ident_inv
        proj = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}
        lm, head = "language_model.model.", "language_model.lm_head.weight"
    else:
        e, L = "model.vision_tower.embeddings.", "model.vision_tower.encoder.layer.{i}."
        vit = dict(cls=e + "cls_token", pos=e + "position_embeddings", patch=e + "patch_embeddings.projection",
                   norm1=L + "layernorm_before", norm2=L + "layernorm_after", proj=L + "attention.projection_layer",
                   q_norm=L + "attention.q_norm", k_norm=L + "attention.k_norm", ls1=L + "lambda_1",
                   ls2=L + "lambda_2", mlp=L + "mlp")
        qkv_kernel = [L + f"attention.{p}_proj.weight" for p in "qkv"], _cat_lin, _split3_lin
        qkv_bias = [L + f"attention.{p}_proj.bias" for p in "qkv"], _cat_bias, _split3_bias
        proj = {k: "model.multi_modal_projector." + k for k in ("layer_norm", "linear_1", "linear_2")}
        lm, head = "model.language_model.", "lm_head.weight"
    add("vision_model.class_embedding", [vit["cls"]], False)
    add("vision_model.position_embedding", [vit["pos"]], False)
    add("vision_model.patch_embedding.kernel", [vit["patch"] + ".weight"], False, _conv, _conv_inv)
    add("vision_model.patch_embedding.bias", [vit["patch"] + ".bias"], False)
    for norm in ("norm1", "norm2"):
        for leaf in norm_leaves:
            add(f"vision_model.layers.{norm}.{leaf}", [vit[norm] + f".{'weight' if leaf == 'scale' else leaf}"], True)
    keys, fwd, inv = qkv_kernel
    add("vision_model.layers.attn.qkv.kernel", keys, True, fwd, inv)
    if v.qkv_bias:
        keys, fwd, inv = qkv_bias
        add("vision_model.layers.attn.qkv.bias", keys, True, fwd, inv)
    add("vision_model.layers.attn.proj.kernel", [vit["proj"] + ".weight"], True, _lin, _lin_inv)
    add("vision_model.layers.attn.proj.bias", [vit["proj"] + ".bias"], True)
    if v.qk_normalization:
        add("vision_model.layers.attn.q_norm.weight", [vit["q_norm"] + ".weight"], True)
        add("vision_model.layers.attn.k_norm.weight", [vit["k_norm"] + ".weight"], True)
    add("vision_model.layers.ls1", [vit["ls1"]], True)
    add("vision_model.layers.ls2", [vit["ls2"]], True)
    for fc in ("fc1", "fc2"):
        add(f"vision_model.layers.mlp.{fc}.kernel", [vit["mlp"] + f".{fc}.weight"], True, _lin, _lin_inv)
        add(f"vision_model.layers.mlp.{fc}.bias", [vit["mlp"] + f".{fc}.bias"], True)
    add("mlp1.layer_norm.scale", [proj["layer_norm"] + ".weight"], False)
    add("mlp1.layer_norm.bias", [proj["layer_norm"] + ".bias"], False)
    for k in ("linear_1", "linear_2"):
        add(f"mlp1.{k}.kernel", [proj[k] + ".weight"], False, _lin, _lin_inv)
        add(f"mlp1.{k}.bias", [proj[k] + ".bias"], False)
    add("language_model.model.embed_tokens.embedding", [lm + "embed_tokens.weight"], False)
    ll = lm + "layers.{i}."
    for n in ("input_layernorm", "post_attention_layernorm"):
        add(f"language_model.model.layers.{n}.weight", [ll + f"{n}.weight"], True)
    for p in ("q_proj", "k_proj", "v_proj"):
        add(f"language_model.model.layers.self_attn.{p}.kernel", [ll + f"self_attn.{p}.weight"], True, _lin,
            _lin_inv)
        add(f"language_model.model.layers.self_attn.{p}.bias", [ll + f"self_attn.{p}.bias"], True)
    add("language_model.model.layers.self_attn.o_proj.kernel", [ll + "self_attn.o_proj.weight"], True, _lin,
        _lin_inv)
    for p in ("gate_proj", "up_proj", "down_proj"):
        add(f"language_model.model.layers.mlp.{p}.kernel", [ll + f"mlp.{p}.weight"], True, _lin, _lin_inv)
    add("language_model.model.norm.weight", [lm + "norm.weight"], False)
    if not cfg.llm_config.tie_word_embeddings:
        add("language_model.lm_head.kernel", [head], False, _lin, _lin_inv)
    return out


def _n_layers(cfg, path: tuple[str, ...]) -> int:
    return (cfg.vision_config.num_hidden_layers if path[0] == "vision_model"
            else cfg.llm_config.num_hidden_layers)


def expected_keys(cfg, layout: str) -> list[str]:
    keys = []
    for r in rules(cfg, layout):
        for i in range(_n_layers(cfg, r.path) if r.stacked else 1):
            keys.extend(k.format(i=i) for k in r.keys)
    return keys


_LEGACY_NATIVE = (("vision_tower.", "model.vision_tower."),
                  ("multi_modal_projector.", "model.multi_modal_projector."),
                  ("language_model.model.", "model.language_model."),
                  ("language_model.lm_head.", "lm_head."))


def normalize_key(key: str, layout: str) -> str:
    """Maps legacy `*-hf` native prefixes to the current ones (HF `_checkpoint_conversion_mapping`)."""
    if layout == "native":
        for old, new in _LEGACY_NATIVE:
            if key.startswith(old):
                return new + key[len(old):]
    return key


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("vision_model.") or k.startswith("mlp1.") for k in keys):
        return "remote"
    if any(k.startswith(("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.")) for k in keys):
        return "native"
    raise CheckpointKeyError("cannot tell the checkpoint layout: no `vision_model.*`/`mlp1.*` (remote code) and "
                             "no `model.vision_tower.*` (transformers-native) keys")


# ------------------------------------------------------------------------------------ tree <-> flat helpers

def flat_params(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat_params(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def param_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter shapes (no memory used)."""
    from flax import nnx

    from recogdrive_jax.models.internvl import abstract_model
    pure = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    return {p: tuple(a.shape) for p, a in flat_params(pure)}


# --------------------------------------------------------------------------------------- tensor conversion

def _to_numpy(t, dtype) -> np.ndarray:
    """numpy (bf16 as `ml_dtypes.bfloat16`) or, for in-memory test dicts only, a torch tensor -> `dtype`."""
    if not isinstance(t, np.ndarray):  # a torch tensor: only tests hand these in, so torch is imported lazily
        import torch
        t = t.detach().to(torch.float32).numpy()
    return t.astype(dtype, copy=False)


class TensorSource:
    """Tensor-at-a-time reader over `model.safetensors` or a sharded `model.safetensors.index.json` dir,
    or over an in-memory dict (tests)."""

    def __init__(self, path_or_tensors, layout: str | None = None):
        self._handles = {}
        if isinstance(path_or_tensors, dict):
            self._mem = dict(path_or_tensors)
            raw = {k: None for k in self._mem}
        else:
            self._mem = None
            d = path_or_tensors
            idx, single = os.path.join(d, "model.safetensors.index.json"), os.path.join(d, "model.safetensors")
            if os.path.exists(idx):
                with open(idx) as f:
                    wm = json.load(f).get("weight_map")
                if not isinstance(wm, dict):
                    raise CheckpointKeyError(f"{idx}: no 'weight_map' object")
                raw = {k: os.path.join(d, fn) for k, fn in wm.items()}
            elif os.path.exists(single):
                from safetensors import safe_open
                with safe_open(single, framework="numpy") as f:
                    raw = {k: single for k in f.keys()}
            else:
                raise FileNotFoundError(f"{d}: neither model.safetensors nor model.safetensors.index.json "
                                        "(.bin/.pth checkpoints: convert them to safetensors first)")
        self.layout = layout or detect_layout(raw)
        self.files = {}
        self.orig = {}
        for k, fn in raw.items():
            nk = normalize_key(k, self.layout)
            self.files[nk], self.orig[nk] = fn, k

    def keys(self) -> set[str]:
        return set(self.files)

    def get(self, key: str, dtype=np.float32) -> np.ndarray:
        if self._mem is not None:
            v = self._mem[self.orig[key]]
            return _to_numpy(v, dtype) if not isinstance(v, np.ndarray) else v.astype(dtype, copy=False)
        fn = self.files[key]
        if fn not in self._handles:
            from safetensors import safe_open
            self._handles[fn] = safe_open(fn, framework="numpy")  # no torch: bf16 reads as ml_dtypes
        return _to_numpy(self._handles[fn].get_tensor(self.orig[key]), dtype)


def hf_to_params(src: TensorSource, cfg, dtype=np.float32) -> dict:
    """Flax pure-dict params from a PyTorch checkpoint. Raises CheckpointKeyError listing every missing/unexpected
    key and shape mismatch."""
    rs = rules(cfg, src.layout)
    exp = expected_keys(cfg, src.layout)
    present = src.keys()
    missing = [k for k in exp if k not in present]
    unexpected = sorted(present - set(exp))
    head = "lm_head.weight" if src.layout == "native" else "language_model.lm_head.weight"
    tied_head = cfg.llm_config.tie_word_embeddings and head in present
    if tied_head:  # a tied checkpoint may still carry the head: allowed only if it is the embedding (checked below)
        unexpected = [k for k in unexpected if k != head]
    if missing or unexpected:
        raise CheckpointKeyError(
            f"InternVL checkpoint ({src.layout} layout) does not match the config:\n"
            f"  missing ({len(missing)}): {missing[:50]}{' ...' if len(missing) > 50 else ''}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:50]}{' ...' if len(unexpected) > 50 else ''}")
    shapes = param_shapes(cfg)
    out: dict = {}
    mismatches = []
    from recogdrive_jax.train.metrics import track
    for r in track(rs, desc="convert internvl: read", unit="params"):
        full = shapes[r.path]
        arr = np.zeros(full, dtype)
        layers = range(_n_layers(cfg, r.path)) if r.stacked else [None]
        for i in layers:
            keys = [k.format(i=i) for k in r.keys]
            t = r.to_flax([src.get(k, dtype) for k in keys])
            want = full[1:] if r.stacked else full
            if tuple(t.shape) != tuple(want):
                mismatches.append(f"{keys} -> {'.'.join(r.path)}: got {tuple(t.shape)} (Flax layout), "
                                  f"expected {tuple(want)}")
                continue
            if r.stacked:
                arr[i] = t
            else:
                arr[...] = t
            del t
        _set(out, r.path, arr)
    if mismatches:
        raise CheckpointKeyError("InternVL checkpoint shape mismatches:\n  " + "\n  ".join(mismatches))
    if tied_head:
        emb = out["language_model"]["model"]["embed_tokens"]["embedding"]
        if not np.array_equal(src.get(head, dtype), emb):
            raise CheckpointKeyError(
                f"InternVL checkpoint: the config ties word embeddings (tie_word_embeddings; transformers 5 reads the "
                f"top-level flag, 4.x text_config's) but {head} differs from the embedding: the flag is wrong for "
                "this checkpoint; set tie_word_embeddings false in its config.json")
    return out


def params_to_hf(params: dict, cfg, layout: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (PyTorch key, array) one tensor at a time."""
    for r in rules(cfg, layout):
        a = np.asarray(_get(params, r.path))
        for i in range(_n_layers(cfg, r.path)) if r.stacked else [None]:
            pieces = r.from_flax(a[i] if r.stacked else a)
            for k, t in zip(r.keys, pieces):
                yield k.format(i=i), np.ascontiguousarray(t)


# --------------------------------------------------------------------------------------- model-level API

def model_params(model) -> dict:
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_params(params: dict, cfg, where: str) -> None:
    """Raises one CheckpointKeyError line naming every parameter `cfg`'s model has that `params` lacks, every one it
    does not have, and every shape mismatch (a tie-flag mismatch shows as lm_head missing / unexpected)."""
    want = param_shapes(cfg)
    got = {p: tuple(getattr(a, "shape", np.shape(a))) for p, a in flat_params(params)}
    missing = sorted(".".join(p) for p in want.keys() - got.keys())
    unexpected = sorted(".".join(p) for p in got.keys() - want.keys())
    wrong = sorted(f"{'.'.join(p)} {got[p]} (model {want[p]})" for p in want.keys() & got.keys() if got[p] != want[p])
    if not (missing or unexpected or wrong):
        return
    parts = [f"{name} ({len(v)}): {', '.join(v)}" for name, v in
             (("unfilled", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if v]
    if any("lm_head" in p for p in missing + unexpected):
        parts.append(f"the config has tie_word_embeddings={cfg.llm_config.tie_word_embeddings}")
    raise CheckpointKeyError(f"{where}: parameters do not match the InternVL config: " + "; ".join(parts))


def model_from_params(cfg, params: dict, *, dtype=None):
    """An InternVLModel holding `params` (pure dict); every parameter must be given (`check_params`)."""
    import jax.numpy as jnp
    from flax import nnx

    from recogdrive_jax.models.internvl import abstract_model
    check_params(params, cfg, "model_from_params")
    model = abstract_model(cfg, dtype=dtype or jnp.float32)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax_tree_asarray(params))
    return nnx.merge(graphdef, state, _materialize(rest))


def jax_tree_asarray(tree):
    import jax
    import jax.numpy as jnp
    return jax.tree.map(jnp.asarray, tree)


def _materialize(rest):
    import jax
    import jax.numpy as jnp
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s, rest)


def load_hf_model(path_or_tensors, cfg=None, *, layout: str | None = None, dtype=None):
    """InternVLModel from a HF directory (config from its config.json unless `cfg`) or an in-memory state dict."""
    from recogdrive_jax.models.internvl import load_hf_config
    if cfg is None:
        if isinstance(path_or_tensors, dict):
            raise ValueError("load_hf_model: pass cfg with an in-memory state dict")
        cfg = load_hf_config(path_or_tensors)
    src = TensorSource(path_or_tensors, layout)
    return model_from_params(cfg, hf_to_params(src, cfg), dtype=dtype)


def model_state_dict(model, layout: str = "native") -> dict[str, np.ndarray]:
    """PyTorch-layout state dict (numpy) of `model` (tests, small models)."""
    return dict(params_to_hf(model_params(model), model.cfg, layout))


def _parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mul in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mul)
    return int(s)


def np_dtype(name: str):
    """numpy dtype for a checkpoint dtype name; bf16 is `ml_dtypes.bfloat16` (what safetensors.numpy writes as BF16)."""
    if name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype {name!r}; expected bfloat16, float32 or float16")
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def untied(params: dict, cfg):
    """(params, cfg) with a separate lm_head equal to the embedding: remote code always unties (spec §1)."""
    if not cfg.llm_config.tie_word_embeddings:
        return params, cfg
    lm = dict(params["language_model"])
    lm["lm_head"] = {"kernel": np.asarray(lm["model"]["embed_tokens"]["embedding"]).T}  # [D, V]
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=False))
    return {**params, "language_model": lm}, cfg


def save_hf(params: dict, cfg, out_dir: str, *, layout: str = "native", dtype: str = "bfloat16",
            max_shard_size: str | int = "5GB") -> list[str]:
    """Writes config.json + safetensors (sharded with model.safetensors.index.json when > max_shard_size).

    numpy-only (safetensors.numpy, bf16 via ml_dtypes, round-to-nearest-even as torch's `.to(bfloat16)`), so the
    base install exports without torch.
    """
    from safetensors.numpy import save_file

    from recogdrive_jax.models.internvl import config_to_hf
    ndtype = np_dtype(dtype)
    limit = _parse_size(max_shard_size)
    check_params(params, cfg, f"export to {out_dir}")
    if layout == "remote":
        params, cfg = untied(params, cfg)
    os.makedirs(out_dir, exist_ok=True)
    hf_cfg = config_to_hf(cfg, layout)
    hf_cfg["torch_dtype" if layout == "remote" else "dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    shard, shard_bytes, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"tmp-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})  # "pt": transformers' check
            shards.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    from recogdrive_jax.train.metrics import track
    for key, arr in track(params_to_hf(params, cfg, layout), total=len(expected_keys(cfg, layout)),
                          desc="convert internvl: write", unit="tensors"):
        t = np.ascontiguousarray(np.asarray(arr, np.float32).astype(ndtype))
        if shard and shard_bytes + t.nbytes > limit:
            flush()
        shard[key] = t
        shard_bytes += t.nbytes
        total += t.nbytes
    flush()
    files = []
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, shards[0][0]), os.path.join(out_dir, "model.safetensors"))
        files.append("model.safetensors")
    else:
        for j, (tmp, keys) in enumerate(shards):
            name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
            files.append(name)
            weight_map.update({k: name for k in keys})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


# ------------------------------------------------------------------------------------------- Orbax I/O

def save_params(params: dict, cfg, out_dir: str) -> None:
    """Orbax params under out_dir/params plus our config (remote-layout HF form) as recogdrive_internvl.json."""
    import orbax.checkpoint as ocp

    from recogdrive_jax.models.internvl import config_to_hf
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config_to_hf(cfg, "remote"), f, indent=2)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
    ckptr.wait_until_finished()


def load_params(params_dir: str):
    """(cfg, params pure dict of numpy/jax arrays) from a directory written by `save_params`."""
    import orbax.checkpoint as ocp

    from recogdrive_jax.models.internvl import load_hf_config
    params_dir = os.path.abspath(params_dir)
    cfg_path = os.path.join(params_dir, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{params_dir}: no {CONFIG_NAME} (write it with `--from-hf`)")
    cfg = load_hf_config(cfg_path)
    params = ocp.StandardCheckpointer().restore(os.path.join(params_dir, PARAMS_DIR))
    return cfg, params


def ids_from_tokenizer(cfg, src_dir: str, tokenizer_dir: str | None):
    """`cfg` with the token ids of `tokenizer_dir` when `src_dir` is a remote-code checkpoint: its config stores
    none, and upstream's `chat()` reads <IMG_CONTEXT>, <img>, </img> and the stop token <|im_end|> from the
    tokenizer (for InternVL3 these are the defaults 151667, 151665, 151666, 151645)."""
    with open(os.path.join(src_dir, "config.json")) as f:
        d = json.load(f)
    if tokenizer_dir is None or "llm_config" not in d or "image_token_id" in d:
        return cfg
    from recogdrive_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<IMG_CONTEXT>"),
                                                        ("img_start_token_id", "<img>"),
                                                        ("img_end_token_id", "</img>"), ("eos_token_id", "<|im_end|>"))}
    return dataclasses.replace(cfg, pad_token_id=tok.pad_token_id, **ids)


def from_hf(src_dir: str, out_dir: str, *, layout: str | None = None, dtype: str = "float32") -> None:
    """HF dir -> Orbax params + our config, and the source's tokenizer (for `to_hf` and `sft`'s init_from)."""
    from recogdrive_jax.convert import hf_processor
    from recogdrive_jax.models.internvl import load_hf_config
    tok_dir = src_dir if hf_processor.has_tokenizer(src_dir) else None
    cfg = ids_from_tokenizer(load_hf_config(src_dir), src_dir, tok_dir)
    src = TensorSource(src_dir, layout)
    params = hf_to_params(src, cfg, np_dtype(dtype))
    save_params(params, cfg, out_dir)
    if tok_dir is not None:
        try:
            hf_processor.copy_tokenizer(src_dir, out_dir)
        except (OSError, ValueError) as e:  # the weights are converted; only `--to-hf` needs the tokenizer
            print(f"convert internvl: note: the tokenizer of {src_dir} was not kept ({e}); give --to-hf "
                  "--tokenizer DIR", file=sys.stderr)


def to_hf(params_dir: str, out_dir: str, *, layout: str = "native", dtype: str = "bfloat16",
          max_shard_size: str | int = "5GB", tokenizer: str | None = None) -> list[str]:
    """A complete transformers directory: weights + config (`save_hf`), tokenizer, chat template, processor configs.
    The tokenizer is `tokenizer` or the one `from_hf` kept in `params_dir`."""
    from recogdrive_jax.convert import hf_processor
    tokenizer = tokenizer or (params_dir if hf_processor.has_tokenizer(params_dir) else None)
    if tokenizer is None:
        raise hf_processor.ExportError(f"--to-hf {params_dir}: no tokenizer there (convert --from-hf keeps the "
                                       "source's); pass --tokenizer DIR")
    cfg, params = load_params(params_dir)
    files = save_hf(params, cfg, out_dir, layout=layout, dtype=dtype, max_shard_size=max_shard_size)
    hf_processor.write_processor_files(out_dir, cfg, tokenizer)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recogdrive_jax.convert internvl",
                                 description="InternVL checkpoints: HF (native or remote-code layout) <-> Orbax")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="DIR", help="HF checkpoint directory (config.json + safetensors)")
    g.add_argument("--to-hf", metavar="DIR", help="directory written by --from-hf (Orbax params + config)")
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--layout", choices=("auto", "native", "remote"), default="auto",
                    help="--from-hf: source layout (auto-detected); --to-hf: output layout (default native)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="parameter dtype (default: float32 for --from-hf, bfloat16 for --to-hf)")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--tokenizer", metavar="DIR", default=None,
                    help="--to-hf: tokenizer directory (default: the one --from-hf kept next to the params)")
    a = ap.parse_args(argv)
    if a.from_hf:
        if a.dtype == "float16":
            ap.error("--from-hf: --dtype float16 is not supported; use float32 or bfloat16")
        from_hf(a.from_hf, a.out, layout=None if a.layout == "auto" else a.layout, dtype=a.dtype or "float32")
        print(f"wrote Orbax params to {os.path.join(a.out, PARAMS_DIR)}")
    else:
        files = to_hf(a.to_hf, a.out, layout="native" if a.layout == "auto" else a.layout,
                      dtype=a.dtype or "bfloat16", max_shard_size=a.max_shard_size, tokenizer=a.tokenizer)
        print(f"wrote {len(files)} safetensors file(s), config.json, tokenizer, chat template and processor configs "
              f"to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
