"""Which InternVL a VLM stage runs and where its weights and tokenizer are (`config.model`, see `vlm/defaults.py`):
an HF directory (converted once to Orbax), a `convert internvl --from-hf` output, an sft/ppo run workdir, or a
random-init variant; plus the files a run writes so a later stage can start from its workdir.

Every path here may be a local directory or an object-store URL (`gs://...`, through `storage`): Orbax restores
URLs itself; the readers that only take local paths (config JSON, transformers' tokenizer, the HF weights while
they are converted) get a local copy, without the weights when only the config and tokenizer are read."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from recogdrive_jax import config_types, storage
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
# Left out of a remote checkpoint's local copy when only its config and tokenizer are read.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "checkpoints", "params",
                "init", "hf_export*", "tensorboard")
CONVERTED_MARKER = "CONVERTED"  # written last into a remote conversion output (an object store has no rename)


def freeze_patterns(model_cfg) -> tuple[str, ...]:
    """`config.model.freeze_*` flags → regexes over parameter paths (`config.optim.freeze`)."""
    model_cfg = config_types.model_config(model_cfg)
    return tuple(p for flag, p in FREEZE_PATTERNS.items() if getattr(model_cfg, flag))


@dataclasses.dataclass
class ResolvedModel:
    cfg: Any  # InternVLConfig
    params_path: str | None  # what train.init_from / load_init_params reads; None = random init
    tokenizer_dir: str | None


def _is_hf_dir(path: str) -> bool:
    return storage.isfile(storage.join(path, "config.json")) and (
        storage.isfile(storage.join(path, "model.safetensors"))
        or storage.isfile(storage.join(path, "model.safetensors.index.json")))


def has_tokenizer(path: str) -> bool:
    return any(storage.isfile(storage.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def run_stage(path: str) -> str | None:
    """The `stage` a run workdir was written by (its config.json), None for anything else."""
    f = storage.join(path, "config.json")
    if storage.isdir(storage.join(path, "checkpoints")) and storage.isfile(f):
        try:
            return json.loads(storage.read_text(f)).get("stage")
        except (OSError, ValueError):
            return None
    return None


@contextlib.contextmanager
def local_dir(path: str | None) -> Iterator[str | None]:
    """`path` itself when local (None stays None); a remote directory's local copy without its weights (config
    and tokenizer files: what transformers and `load_hf_config` read) for the block."""
    if path is None:
        yield None
        return
    with storage.local_copy(path, skip=WEIGHT_FILES) as local:
        yield local


def _load_config(path: str, **overrides):
    with storage.local_copy(path) as local:  # one JSON file
        return iv.load_hf_config(local, **overrides)


def _converted(out: str) -> bool:
    if storage.is_remote(out):
        return storage.isfile(storage.join(out, CONVERTED_MARKER))
    return storage.isdir(storage.join(out, conv.PARAMS_DIR))


def convert_hf_once(src: str, out: str) -> str:
    """The Orbax params of the HF checkpoint `src`, converted into `out` unless done before; returns
    `out/params`. Either may be remote: the weights are read from a local copy and written through a staging
    directory, then CONVERTED marks a remote output complete. A remote output is shared by every host: process 0
    converts and the others wait for it."""
    remote = storage.is_remote(out)
    if (not remote or jax.process_index() == 0) and not _converted(out):
        logging.info("converting %s to Orbax params in %s", src, out)
        with storage.local_copy(src) as local_src, storage.staged_dir(out) as local_out:
            conv.from_hf(local_src, local_out)
        if remote:
            storage.write_text(storage.join(out, CONVERTED_MARKER), src + "\n")
    if remote and jax.process_count() > 1:
        multihost_utils.sync_global_devices("vlm_convert_hf_once")
    return storage.join(out, conv.PARAMS_DIR)


def resolve_model(model_cfg, data_cfg, workdir: str, *, convert_dir: str | None = None) -> ResolvedModel:
    """InternVLConfig + where its weights are, from `config.model` (see `stage_configs.model_block`).

    An HF directory is converted once to Orbax (`convert_dir`, default WORKDIR/init) so the loop restores it
    straight onto the parameter shardings.
    """
    model_cfg = config_types.model_config(model_cfg)
    src = model_cfg.init_from
    overrides = {}
    if data_cfg is not None:
        overrides = dict(max_dynamic_patch=int(data_cfg.max_dynamic_patch), min_dynamic_patch=int(
            data_cfg.min_dynamic_patch), use_thumbnail=bool(data_cfg.use_thumbnail),
            dynamic_image_size=bool(data_cfg.dynamic_image_size))
    overrides.update(remat=model_cfg.remat, remat_policy=model_cfg.remat_policy,
                     attention_impl=model_cfg.attention_impl)
    tok_dir = model_cfg.tokenizer or None
    if not src:
        cfg = iv.with_field_overrides(iv.get_config(model_cfg.variant, **overrides), model_cfg.llm,
                                      model_cfg.vit)
        params_path = None
    else:
        src = storage.abspath(src)
        if not storage.isdir(src):
            raise FileNotFoundError(f"config.model.init_from={src!r} is not a directory")
        if run_stage(src) == "il_joint":  # an il_joint workdir: its VLM part, written at the end of the run
            if not storage.isdir(storage.join(src, JOINT_VLM_DIR)):
                raise FileNotFoundError(f"config.model.init_from={src!r}: an il_joint run without "
                                        f"{JOINT_VLM_DIR}/ (it is written when the run finishes)")
            src = storage.join(src, JOINT_VLM_DIR)
        if storage.isdir(storage.join(src, "checkpoints")) and storage.isfile(storage.join(src, MODEL_CONFIG_NAME)):
            cfg = _load_config(storage.join(src, MODEL_CONFIG_NAME), **overrides)  # an sft workdir
            params_path = src
            if tok_dir is None and storage.isdir(storage.join(src, TOKENIZER_DIR)):
                tok_dir = storage.join(src, TOKENIZER_DIR)
        elif storage.isfile(storage.join(src, conv.CONFIG_NAME)) and storage.isdir(
                storage.join(src, conv.PARAMS_DIR)):
            cfg = _load_config(storage.join(src, conv.CONFIG_NAME), **overrides)  # convert --from-hf output
            params_path = storage.join(src, conv.PARAMS_DIR)
            if tok_dir is None and has_tokenizer(src):
                tok_dir = src
        elif _is_hf_dir(src):
            params_path = convert_hf_once(src, storage.abspath(convert_dir or storage.join(workdir, "init")))
            if tok_dir is None and has_tokenizer(src):
                tok_dir = src
            with local_dir(src) as meta, local_dir(tok_dir) as local_tok:
                cfg = iv.load_hf_config(meta, **overrides)
                cfg = conv.ids_from_tokenizer(cfg, meta, local_tok)  # remote-code configs carry no token ids
        else:
            raise FileNotFoundError(
                f"config.model.init_from={src!r}: expected an HF checkpoint (config.json + model.safetensors[.index."
                f"json]), an Orbax dir from `convert internvl --from-hf` ({conv.CONFIG_NAME} + {conv.PARAMS_DIR}/) "
                f"or an sft workdir (checkpoints/ + {MODEL_CONFIG_NAME})")
    if tok_dir is None and storage.isdir(storage.join(workdir, TOKENIZER_DIR)):
        tok_dir = storage.join(workdir, TOKENIZER_DIR)  # the one this run saved (resume of a generated tokenizer)
    dpr = model_cfg.drop_path_rate
    if dpr >= 0:
        cfg = dataclasses.replace(cfg, vision_config=dataclasses.replace(cfg.vision_config, drop_path_rate=dpr))
    return ResolvedModel(cfg, params_path, tok_dir)


def save_model_files(cfg, tok, workdir: str) -> None:
    """WORKDIR/recogdrive_internvl.json + WORKDIR/tokenizer/ (what `cache` and a later sft run read); WORKDIR may
    be a URL (the tokenizer is saved into a staging directory and uploaded)."""
    if jax.process_index() != 0:
        return
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, MODEL_CONFIG_NAME), json.dumps(iv.config_to_hf(cfg, "remote"), indent=2))
    with storage.staged_dir(storage.join(workdir, TOKENIZER_DIR)) as local:
        tok.save_pretrained(local)


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
