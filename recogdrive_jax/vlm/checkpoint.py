"""Which InternVL a VLM stage runs and where its weights and tokenizer are (`config.model`, see `vlm/defaults.py`):
an HF directory (converted once to Orbax), a `convert internvl --from-hf` output, an sft/ppo run workdir, or a
random-init variant; plus the files a run writes so a later stage can start from its workdir."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from recogdrive_jax.convert import internvl as conv
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train.module_def import ModuleDef

MODEL_CONFIG_NAME = "recogdrive_internvl.json"  # = convert.internvl.CONFIG_NAME
TOKENIZER_DIR = "tokenizer"
JOINT_VLM_DIR = "vlm"  # an il_joint workdir's VLM part (a `convert internvl --from-hf` layout)
FREEZE_PATTERNS = {"freeze_vision": r"^vision_model/", "freeze_llm": r"^language_model/", "freeze_mlp": r"^mlp1/"}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def freeze_patterns(model_cfg) -> tuple[str, ...]:
    """`config.model.freeze_*` flags → regexes over parameter paths (`config.optim.freeze`)."""
    return tuple(p for flag, p in FREEZE_PATTERNS.items() if model_cfg.get(flag, False))


@dataclasses.dataclass
class ResolvedModel:
    cfg: Any  # InternVLConfig
    params_path: str | None  # what train.init_from / load_init_params reads; None = random init
    tokenizer_dir: str | None


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, "model.safetensors"))
        or os.path.isfile(os.path.join(path, "model.safetensors.index.json")))


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def run_stage(path: str) -> str | None:
    """The `stage` a run workdir was written by (its config.json), None for anything else."""
    f = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(f):
        try:
            return json.load(open(f)).get("stage")
        except (OSError, ValueError):
            return None
    return None


def resolve_model(model_cfg, data_cfg, workdir: str, *, convert_dir: str | None = None) -> ResolvedModel:
    """InternVLConfig + where its weights are, from `config.model` (see `stage_configs.model_block`).

    An HF directory is converted once to Orbax (`convert_dir`, default WORKDIR/init) so the loop restores it
    straight onto the parameter shardings.
    """
    src = model_cfg.get("init_from", "") or ""
    overrides = {}
    if data_cfg is not None:
        overrides = dict(max_dynamic_patch=int(data_cfg.max_dynamic_patch), min_dynamic_patch=int(
            data_cfg.min_dynamic_patch), use_thumbnail=bool(data_cfg.use_thumbnail),
            dynamic_image_size=bool(data_cfg.dynamic_image_size))
    overrides["remat"] = bool(model_cfg.get("remat", False))
    tok_dir = model_cfg.get("tokenizer", "") or None
    if not src:
        cfg = iv.with_field_overrides(iv.get_config(model_cfg.variant, **overrides), model_cfg.get("llm"),
                                      model_cfg.get("vit"))
        params_path = None
    else:
        src = os.path.abspath(src)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"config.model.init_from={src!r} is not a directory")
        if run_stage(src) == "il_joint":  # an il_joint workdir: its VLM part, written at the end of the run
            if not os.path.isdir(os.path.join(src, JOINT_VLM_DIR)):
                raise FileNotFoundError(f"config.model.init_from={src!r}: an il_joint run without "
                                        f"{JOINT_VLM_DIR}/ (it is written when the run finishes)")
            src = os.path.join(src, JOINT_VLM_DIR)
        if os.path.isdir(os.path.join(src, "checkpoints")) and os.path.isfile(os.path.join(src, MODEL_CONFIG_NAME)):
            cfg = iv.load_hf_config(os.path.join(src, MODEL_CONFIG_NAME), **overrides)  # an sft workdir
            params_path = src
            if tok_dir is None and os.path.isdir(os.path.join(src, TOKENIZER_DIR)):
                tok_dir = os.path.join(src, TOKENIZER_DIR)
        elif os.path.isfile(os.path.join(src, conv.CONFIG_NAME)) and os.path.isdir(os.path.join(src, conv.PARAMS_DIR)):
            cfg = iv.load_hf_config(os.path.join(src, conv.CONFIG_NAME), **overrides)  # convert --from-hf output
            params_path = os.path.join(src, conv.PARAMS_DIR)
            if tok_dir is None and has_tokenizer(src):
                tok_dir = src
        elif _is_hf_dir(src):
            cfg = iv.load_hf_config(src, **overrides)
            out = os.path.abspath(convert_dir or os.path.join(workdir, "init"))
            if not os.path.isdir(os.path.join(out, conv.PARAMS_DIR)):
                logging.info("converting %s to Orbax params in %s", src, out)
                conv.from_hf(src, out)
            params_path = os.path.join(out, conv.PARAMS_DIR)
            if tok_dir is None and has_tokenizer(src):
                tok_dir = src
            cfg = conv.ids_from_tokenizer(cfg, src, tok_dir)  # remote-code configs carry no token ids
        else:
            raise FileNotFoundError(
                f"config.model.init_from={src!r}: expected an HF checkpoint (config.json + model.safetensors[.index."
                f"json]), an Orbax dir from `convert internvl --from-hf` ({conv.CONFIG_NAME} + {conv.PARAMS_DIR}/) "
                f"or an sft workdir (checkpoints/ + {MODEL_CONFIG_NAME})")
    if tok_dir is None and os.path.isdir(os.path.join(workdir, TOKENIZER_DIR)):
        tok_dir = os.path.join(workdir, TOKENIZER_DIR)  # the one this run saved (resume of a generated tokenizer)
    dpr = float(model_cfg.get("drop_path_rate", -1.0))
    if dpr >= 0:
        cfg = dataclasses.replace(cfg, vision_config=dataclasses.replace(cfg.vision_config, drop_path_rate=dpr))
    return ResolvedModel(cfg, params_path, tok_dir)


def save_model_files(cfg, tok, workdir: str) -> None:
    """WORKDIR/recogdrive_internvl.json + WORKDIR/tokenizer/ (what `cache` and a later sft run read)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MODEL_CONFIG_NAME), "w") as f:
        json.dump(iv.config_to_hf(cfg, "remote"), f, indent=2)
    tok.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))


def module_def(cfg, dtype: str) -> ModuleDef:
    """The bare InternVL module (fp32 params, `dtype` compute)."""
    dt = DTYPES[dtype]
    return ModuleDef(lambda rngs: iv.InternVLModel(cfg, dtype=dt, param_dtype=jnp.float32, rngs=rngs))


def load_params(resolved: ResolvedModel, mdef: ModuleDef, rt: runtime_lib.Runtime | Mesh, *, prefer_ema: bool = True):
    """The resolved model's parameters restored straight onto `rt`'s shardings (a random init of the variant when
    it has no weights); a bare mesh gets the default rules."""
    rt = rt if isinstance(rt, runtime_lib.Runtime) else runtime_lib.from_mesh(rt)
    abstract = mdef.abstract_params()
    if resolved.params_path is None:
        return rt.init_params(mdef.init, abstract, mdef.logical, jax.random.key(0))
    return ckpt_lib.load_params(resolved.params_path, rt.targets(abstract, mdef.logical), prefer_ema=prefer_ema)
