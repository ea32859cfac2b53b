"""Stage 1 (`sft`): InternVL supervised fine-tuning on a QA mixture (upstream `internvl_chat_finetune.py`).

Starts from converted weights (`config.model.init_from`: a transformers / remote-code HF directory, an Orbax
directory written by `convert internvl --from-hf`, or another sft run's workdir) or from random init
(`config.model.variant`), on the mixture of a meta JSON (`config.data.meta_path`, upstream format with
`repeat_time`) or, when that is empty, on synthetic driving QA it generates itself (`config.data.synthetic_scenes`).
Loss only on assistant tokens (data/template.py), bf16 compute with fp32 master params, per-layer remat,
length-grouped (optionally packed) batches padded to a few static bucket shapes (data/length_grouping.py), freeze
flags for vision / LLM / mlp1, and the generic loop for ZeRO-1 + DP, gradient accumulation, checkpoints and exact
resume. At the end the weights are exported as a transformers-loadable directory (`WORKDIR/hf_export`).

Outputs: WORKDIR/{checkpoints, metrics.jsonl, recogdrive_internvl.json (model config), tokenizer/, hf_export/}.
A later stage (`cache`) points `config.model.init_from` at this workdir.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import ml_collections
import numpy as np

from recogdrive_jax import configs

MODEL_CONFIG_NAME = "recogdrive_internvl.json"  # = convert.internvl.CONFIG_NAME
TOKENIZER_DIR = "tokenizer"
FREEZE_PATTERNS = {"freeze_vision": r"^vision_model/", "freeze_llm": r"^language_model/", "freeze_mlp": r"^mlp1/"}


# ------------------------------------------------------------------------------------------------------ config

def model_block(**overrides) -> ml_collections.ConfigDict:
    """`config.model`: which InternVL and how it is computed (shared by `sft` and `cache`)."""
    d = dict(
        variant="tiny",  # random init only: models/internvl.VARIANTS
        init_from="",  # HF dir | Orbax dir from `convert internvl --from-hf` | an sft workdir; '' = random init
        tokenizer="",  # tokenizer dir; '' = init_from's (HF dir / sft workdir), else WORKDIR's, else generated (tiny)
        dtype="bfloat16",  # compute dtype; params stay fp32
        remat=True,  # gradient checkpointing per layer (both towers)
        drop_path_rate=-1.0,  # ViT drop path; < 0 keeps the checkpoint's / variant's value
        freeze_vision=False, freeze_llm=False, freeze_mlp=False,  # upstream freeze_backbone / freeze_llm / freeze_mlp
        loss_chunk=2048,  # tokens per logits chunk (the [T, vocab] logits are never materialised at once)
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def data_block(**overrides) -> ml_collections.ConfigDict:
    """`config.data` of the sft stage."""
    d = dict(
        meta_path="",  # meta JSON {name: {root, annotation, repeat_time, length}}; '' = synthetic QA
        eval_meta_path="",  # held-out mixture for the eval loss; '' = none (synthetic: generated)
        synthetic_scenes=0,  # with meta_path '': scenes of the synthetic world turned into QA (WORKDIR/qa)
        synthetic_eval_scenes=0,
        synthetic_seed=0,  # = the planner stages' data.scene_seed: train QA from the planner's train scenes
        skip_bad_rows=False,  # drop (and count) malformed rows and undecodable images instead of failing
        max_seq_length=12288,
        max_dynamic_patch=16,  # ReCogDrive: up to 16 tiles (+ thumbnail)
        min_dynamic_patch=1,
        use_thumbnail=True,
        dynamic_image_size=True,
        system_message="__default__",  # '__default__' = the internvl2_5 system message
        length_buckets=(),  # padded lengths; () = powers of two from 256 up to max_seq_length
        tile_buckets=(),  # tiles per row; () = (1, 2, 4, ..., max_dynamic_patch + thumbnail)
        pack=False,  # pack several samples per row (segment-masked attention)
        per_device_batch_size=0,  # > 0: optim.grad_accum = train.batch_size / (this x devices), as upstream
        num_epochs=0,  # > 0: train.num_steps = epochs x batches per epoch (upstream trains 3 epochs)
        num_workers=2,  # Grain reader threads
        prefetch=4,
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def sft_stage_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """Common keys + model/data/export blocks with upstream's InternVL3 fine-tune recipe (seed 000)."""
    c = configs.base_config()
    c.stage = "sft"
    c.model = model_block(variant=variant)
    c.data = data_block()
    c.export = ml_collections.ConfigDict(dict(at_end=True, each_eval=False, layout="native", dtype="bfloat16",
                                              max_shard_size="5GB"))
    c.eval = ml_collections.ConfigDict(dict(max_batches=0))  # 0 = the whole eval mixture
    c.optim.update(dict(lr=4e-5, warmup_ratio=0.1, schedule="cosine", weight_decay=0.05, b1=0.9, b2=0.999,
                        eps=1e-8, clip_norm=1.0))
    return c


def validate(config) -> None:
    def req(cond, key, msg):
        if not cond:
            raise configs.ConfigError(f"config.{key}: {msg}")
    for block in ("model", "data"):
        req(block in config, block, "missing (start from stages.sft.sft_stage_config())")
    m, d = config.model, config.data
    req(m.dtype in ("bfloat16", "float32"), "model.dtype", f"must be 'bfloat16' or 'float32', got {m.dtype!r}")
    req(isinstance(d.max_seq_length, int) and d.max_seq_length >= 16, "data.max_seq_length",
        f"must be an int >= 16, got {d.max_seq_length!r}")
    req(1 <= d.min_dynamic_patch <= d.max_dynamic_patch, "data.max_dynamic_patch",
        f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {d.min_dynamic_patch}, {d.max_dynamic_patch}")
    if config.stage == "sft":
        req(bool(d.meta_path) or d.synthetic_scenes > 0 or "virl_sft" in config, "data.meta_path",
            "empty and config.data.synthetic_scenes is 0: give a meta JSON or a number of synthetic scenes")
        if d.meta_path:
            req(os.path.isfile(d.meta_path), "data.meta_path", f"{d.meta_path!r} is not a file")
        if d.eval_meta_path:
            req(os.path.isfile(d.eval_meta_path), "data.eval_meta_path", f"{d.eval_meta_path!r} is not a file")
        buckets = tuple(d.length_buckets)
        req(all(isinstance(b, int) and b > 0 for b in buckets), "data.length_buckets",
            f"must be positive ints, got {buckets}")
        req(not buckets or max(buckets) <= d.max_seq_length, "data.length_buckets",
            f"largest bucket {max(buckets) if buckets else 0} exceeds data.max_seq_length={d.max_seq_length}")
        req(not (m.freeze_vision and m.freeze_llm and m.freeze_mlp), "model.freeze_*", "every part is frozen")
        req(config.export.layout in ("native", "remote"), "export.layout",
            f"must be 'native' or 'remote', got {config.export.layout!r}")


def freeze_patterns(model_cfg) -> tuple[str, ...]:
    """`config.model.freeze_*` flags → regexes over parameter paths (`config.optim.freeze`)."""
    return tuple(p for flag, p in FREEZE_PATTERNS.items() if model_cfg.get(flag, False))


# ---------------------------------------------------------------------------------------------- model loading

@dataclasses.dataclass
class ResolvedModel:
    cfg: Any  # InternVLConfig
    params_path: str | None  # what train.init_from / load_init_params reads; None = random init
    tokenizer_dir: str | None


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, "model.safetensors"))
        or os.path.isfile(os.path.join(path, "model.safetensors.index.json")))


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def resolve_model(model_cfg, data_cfg, workdir: str, *, convert_dir: str | None = None) -> ResolvedModel:
    """InternVLConfig + where its weights are, from `config.model` (see `model_block`).

    An HF directory is converted once to Orbax (`convert_dir`, default WORKDIR/init) so the loop restores it
    straight onto the parameter shardings.
    """
    from recogdrive_jax.convert import internvl as conv
    from recogdrive_jax.models import internvl as iv
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
        if os.path.isdir(os.path.join(src, "checkpoints")) and os.path.isfile(os.path.join(src, MODEL_CONFIG_NAME)):
            cfg = iv.load_hf_config(os.path.join(src, MODEL_CONFIG_NAME), **overrides)  # an sft workdir
            params_path = src
            if tok_dir is None and os.path.isdir(os.path.join(src, TOKENIZER_DIR)):
                tok_dir = os.path.join(src, TOKENIZER_DIR)
        elif os.path.isfile(os.path.join(src, conv.CONFIG_NAME)) and os.path.isdir(os.path.join(src, conv.PARAMS_DIR)):
            cfg = iv.load_hf_config(os.path.join(src, conv.CONFIG_NAME), **overrides)  # convert --from-hf output
            params_path = os.path.join(src, conv.PARAMS_DIR)
            if tok_dir is None and _has_tokenizer(src):
                tok_dir = src
        elif _is_hf_dir(src):
            cfg = iv.load_hf_config(src, **overrides)
            out = os.path.abspath(convert_dir or os.path.join(workdir, "init"))
            if not os.path.isdir(os.path.join(out, conv.PARAMS_DIR)):
                logging.info("converting %s to Orbax params in %s", src, out)
                conv.from_hf(src, out)
            params_path = os.path.join(out, conv.PARAMS_DIR)
            if tok_dir is None and _has_tokenizer(src):
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


def load_or_build_tokenizer(resolved: ResolvedModel, workdir: str, corpus=None):
    """The tokenizer (checked against the model's special-token ids); `tiny` random init generates one, trained
    on `corpus()` when given (e.g. navigation text; only called when a tokenizer is built)."""
    from recogdrive_jax.data import tokenizer as tok_lib
    cfg = resolved.cfg
    if resolved.tokenizer_dir:
        tok = tok_lib.load_tokenizer(resolved.tokenizer_dir)
    elif resolved.params_path is None and cfg.llm_config.vocab_size <= 4096:
        tok = tok_lib.build_tokenizer(vocab_size=cfg.llm_config.vocab_size, corpus=corpus() if corpus else None)
    else:
        raise FileNotFoundError("config.model.tokenizer: empty and config.model.init_from has no tokenizer files; "
                                "give the model's tokenizer directory")
    want = {"<IMG_CONTEXT>": cfg.image_token_id, "<img>": cfg.img_start_token_id, "</img>": cfg.img_end_token_id}
    bad = {t: (tok.convert_tokens_to_ids(t), i) for t, i in want.items() if tok.convert_tokens_to_ids(t) != i}
    if bad:
        raise ValueError(f"tokenizer and model disagree on special-token ids (tokenizer, model): {bad}")
    from recogdrive_jax.convert.hf_processor import NAMED_TOKENS
    beyond = sorted(t for t, i in tok.get_vocab().items() if i >= cfg.llm_config.vocab_size
                    and t != NAMED_TOKENS["video_token"])  # an export's processor-only placeholder (hf_processor)
    if beyond:
        raise ValueError(f"tokenizer has {len(beyond)} token(s) past the model's vocab_size "
                         f"{cfg.llm_config.vocab_size}, e.g. {beyond[:5]}")
    return tok


def save_model_files(cfg, tok, workdir: str) -> None:
    """WORKDIR/recogdrive_internvl.json + WORKDIR/tokenizer/ (what `cache` and a later sft run read)."""
    import jax

    from recogdrive_jax.models.internvl import config_to_hf
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MODEL_CONFIG_NAME), "w") as f:
        json.dump(config_to_hf(cfg, "remote"), f, indent=2)
    tok.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))


def module_def(cfg, dtype: str):
    import jax.numpy as jnp

    from recogdrive_jax.models.internvl import InternVLModel
    from recogdrive_jax.train.module_def import ModuleDef
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    return ModuleDef(lambda rngs: InternVLModel(cfg, dtype=dt, param_dtype=jnp.float32, rngs=rngs))


# --------------------------------------------------------------------------------------------------- the loss

def segment_mask(segment_ids):
    """segment_ids [B, T] (0 = pad) → causal mask [B, T, T] within each segment (packing-safe)."""
    import jax.numpy as jnp
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] > 0)


def chunked_ce(lm, hidden, labels, chunk: int):
    """Next-token CE over labels != -100 without the full [B, T, V] logits: scans T in chunks (each
    rematerialised in the backward). hidden [B, T, D], labels [B, T]. Returns (nll_sum, correct, count)."""
    import jax
    import jax.numpy as jnp

    from recogdrive_jax.models.qwen2 import token_logprobs
    b, t, d = hidden.shape
    tgt = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), -100, labels.dtype)], axis=1)  # [B, T]
    c = chunk if (chunk and t % chunk == 0) else t
    hs = hidden.reshape(b, t // c, c, d).swapaxes(0, 1)  # [n, B, c, D]
    ts = tgt.reshape(b, t // c, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, y):
        logits = lm.logits(h)  # [B, c, V] fp32
        valid = y != -100
        yy = jnp.where(valid, y, 0)
        lp = token_logprobs(logits, yy)
        correct = (jnp.argmax(logits, axis=-1) == yy) & valid
        return -jnp.sum(jnp.where(valid, lp, 0.0)), jnp.sum(correct), jnp.sum(valid)

    def body(acc, xs):
        out = one(*xs)
        return tuple(a + o.astype(a.dtype) for a, o in zip(acc, out)), None

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    (nll, correct, count), _ = jax.lax.scan(body, zero, (hs, ts))
    return nll, correct, count


def forward_sums(model, batch, rng, *, chunk: int, drop_path: bool):
    """Model forward on a collated batch (data/length_grouping.py) → (nll_sum, correct, count)."""
    b, m = batch["image_flags"].shape
    pv = batch["pixel_values"]
    pv = pv.reshape(b * m, *pv.shape[2:]).astype(model.dtype)
    emb, _ = model.embed_inputs(batch["input_ids"], pv, batch["image_flags"].reshape(-1),
                                rng=rng if drop_path else None)
    hidden, _ = model.language_model.model(emb, batch["positions"], segment_mask(batch["segment_ids"]))
    return chunked_ce(model.language_model, hidden, batch["labels"], chunk)


def make_loss_fn(mdef, *, chunk: int, drop_path: bool, grad_accum: int):
    import jax.numpy as jnp

    def loss_fn(params, batch, rng):
        nll, correct, count = forward_sums(mdef.bind(params), batch, rng, chunk=chunk, drop_path=drop_path)
        n = jnp.maximum(count, 1).astype(jnp.float32)
        # `tokens`: real (non-pad) tokens of the whole optimizer step (the loop averages micro-batch metrics).
        tokens = jnp.sum(batch["attention_mask"]).astype(jnp.float32) * grad_accum
        return nll / n, {"token_acc": correct / n, "tokens": tokens,
                         "label_tokens": count.astype(jnp.float32) * grad_accum}
    return loss_fn


# ------------------------------------------------------------------------------------------------------- data

def sample_cfg(model_cfg, data_cfg):
    from recogdrive_jax.data import template as tpl
    sysmsg = data_cfg.get("system_message", "__default__")
    return tpl.sample_config(model_cfg, max_seq_length=int(data_cfg.max_seq_length), pad_to_max_length=False,
                             system_message=tpl.INTERNVL2_5_SYSTEM if sysmsg == "__default__" else (sysmsg or None))


def default_tile_buckets(cfg) -> tuple[int, ...]:
    top = cfg.max_dynamic_patch + (1 if cfg.use_thumbnail and cfg.max_dynamic_patch > 1 else 0)
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return tuple(out) + (top,)


EVAL_QA_SEED = 5_000_011  # disjoint from the planner splits' scene seeds (scene_seed + k * 1_000_003, k < 3)


def synthetic_qa(data_cfg, workdir: str, split: str) -> str:
    """Generates the synthetic driving QA of `split` (sim/qa.py) into WORKDIR/qa/<split> once; returns its meta JSON.

    The train QA comes from the planner's train scenes (`synthetic_seed` = `data.scene_seed` of the planner
    stages, like upstream's SFT on navtrain QA); the eval QA from scenes no planner split uses.
    """
    from recogdrive_jax.data.generate_once import generate_once
    from recogdrive_jax.sim import qa as sim_qa
    n = int(data_cfg.synthetic_scenes if split == "train" else data_cfg.synthetic_eval_scenes)
    seed = int(data_cfg.synthetic_seed) + (0 if split == "train" else EVAL_QA_SEED)
    out = os.path.join(workdir, "qa", split)
    done = generate_once(out, {"num_scenes": n, "seed": seed},
                         lambda: {"meta": os.path.abspath(sim_qa.write_qa_dataset(out, num_scenes=n, seed=seed))},
                         barrier=f"sft_synthetic_qa_{split}")
    return done["meta"]


def build_batches(meta_path: str, tok, cfg, data_cfg, *, global_batch: int, seed: int, for_eval: bool = False):
    """The QA mixture of `meta_path` (validated rows after repeat_time, `data/qa.build_index`) as a
    `GroupedBatches` plan."""
    import jax

    from recogdrive_jax.data import length_grouping as lg
    from recogdrive_jax.data import qa as qa_index
    from recogdrive_jax.data import qa_records as qa_lib
    from recogdrive_jax.data import template as tpl
    scfg = sample_cfg(cfg, data_cfg)
    records, stats = qa_index.build_index(meta_path, seed=seed, skip_bad_rows=bool(data_cfg.skip_bad_rows))
    if stats.bad_rows and jax.process_index() == 0:
        logging.warning("%s: skipped %d bad rows, e.g. %s", meta_path, stats.bad_rows, stats.bad_reasons[:3])
    if not records:
        raise qa_index.QADataError(f"{meta_path}: the mixture is empty")
    lengths, tiles = qa_lib.estimate_lengths(records, tok, scfg)

    def load(i: int) -> dict:
        r = records[i]
        with qa_index.row_errors(r, skip_bad_rows=bool(data_cfg.skip_bad_rows)):  # names the JSONL file:line
            return tpl.build_sample(r["conversations"], r["image_paths"], tok, scfg)

    buckets = tuple(data_cfg.length_buckets) or lg.default_buckets(int(data_cfg.max_seq_length))
    tile_buckets = tuple(data_cfg.tile_buckets) or default_tile_buckets(cfg)
    return lg.GroupedBatches(load, np.minimum(lengths, max(buckets)), tiles, global_batch=global_batch,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             buckets=buckets, tile_buckets=tile_buckets, image_size=cfg.force_image_size,
                             pad_token_id=tok.pad_token_id, seed=seed, pack=bool(data_cfg.pack) and not for_eval,
                             source=meta_path)


# ------------------------------------------------------------------------------------------------- the stage

def export_hf(params, cfg, tok, out_dir: str, export_cfg) -> None:
    """A complete transformers directory from fp32 params: config.json + safetensors, tokenizer, chat template,
    processor / preprocessor / generation configs (`AutoProcessor.from_pretrained(out_dir)` works)."""
    import jax

    from recogdrive_jax.convert import hf_processor
    from recogdrive_jax.convert import internvl as conv
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    if jax.process_index() != 0:
        return
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    conv.save_hf(params, cfg, tmp, layout=export_cfg.get("layout", "native"), dtype=export_cfg.get("dtype", "bfloat16"),
                 max_shard_size=export_cfg.get("max_shard_size", "5GB"))
    hf_processor.write_processor_files(tmp, cfg, tok)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def derive_steps_and_accum(config, batches_per_epoch: int, num_devices: int) -> None:
    """`data.num_epochs` → train.num_steps; `data.per_device_batch_size` → optim.grad_accum (upstream's
    GRADIENT_ACC = BATCH_SIZE / PER_DEVICE_BATCH_SIZE / GPUS)."""
    d = config.data
    if d.get("num_epochs", 0):
        config.train.num_steps = int(d.num_epochs) * int(batches_per_epoch)
    pdb = int(d.get("per_device_batch_size", 0) or 0)
    if pdb:
        gbs, per_step = int(config.train.batch_size), pdb * num_devices
        if gbs % per_step:
            raise configs.ConfigError(
                f"config.data.per_device_batch_size={pdb}: {pdb} x {num_devices} devices does not divide "
                f"config.train.batch_size={gbs}")
        config.optim.grad_accum = gbs // per_step
    configs.validate_common(config)


def run(config, workdir: str) -> dict:
    import jax

    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax.parallel import sharding as sh
    from recogdrive_jax.train import loop
    validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    resolved = resolve_model(config.model, config.data, workdir)
    cfg = resolved.cfg
    virl = "virl_sft" in config and not config.data.meta_path      # V-IRL expert answers (configs/virl/sft.py)
    from recogdrive_jax.envs import sft_data as virl_data
    tok = load_or_build_tokenizer(resolved, workdir,
                                  corpus=(lambda: virl_data.tokenizer_corpus(config.env)) if virl else None)
    save_model_files(cfg, tok, workdir)

    data = config.data
    if virl:
        meta = virl_data.write_from_config(config, os.path.join(workdir, "virl_sft"))
    else:
        meta = data.meta_path or synthetic_qa(data, workdir, "train")
    eval_meta = data.eval_meta_path or (synthetic_qa(data, workdir, "eval")
                                        if not data.meta_path and data.synthetic_eval_scenes > 0 else "")
    gbs = int(config.train.batch_size)
    plan = build_batches(meta, tok, cfg, data, global_batch=gbs, seed=int(config.seed))
    eval_plan = build_batches(eval_meta, tok, cfg, data, global_batch=gbs, seed=int(config.seed) + 1,
                              for_eval=True) if eval_meta else None

    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: derived knobs below
    derive_steps_and_accum(config, plan.batches_per_epoch, jax.device_count())
    config.optim.freeze = tuple(config.optim.get("freeze", ()) or ()) + freeze_patterns(config.model)
    if resolved.params_path and not config.train.get("init_from"):
        config.train.init_from = resolved.params_path
    mdef = module_def(cfg, config.model.dtype)
    grad_accum = int(config.optim.grad_accum)
    chunk = int(config.model.loss_chunk)
    drop_path = cfg.vision_config.drop_path_rate > 0
    loss_fn = make_loss_fn(mdef, chunk=chunk, drop_path=drop_path, grad_accum=grad_accum)
    mesh = mesh_lib.make_mesh(config.get("mesh"))
    eval_step = jax.jit(lambda p, b: forward_sums(mdef.bind(p), b, None, chunk=chunk, drop_path=False))

    def eval_fn(state, step):
        out = {}
        if eval_plan is not None:
            nll = correct = count = 0.0
            for k, local in enumerate(eval_plan.eval_batches()):
                if config.eval.max_batches and k >= config.eval.max_batches:
                    break
                s = jax.device_get(eval_step(state.params, sh.make_global_batch(mesh, local)))
                nll, correct, count = nll + float(s[0]), correct + float(s[1]), count + float(s[2])
            out = {"loss": nll / max(count, 1.0), "token_acc": correct / max(count, 1.0), "label_tokens": count}
        if eval_nav_splits:
            from recogdrive_jax.stages import eval_nav
            res = eval_nav.evaluate(state.params, config, cfg, tok, os.path.join(workdir, "eval_nav"), mesh=mesh)
            out.update(eval_nav.flat_metrics(res))
        if config.export.each_eval and step < int(config.train.num_steps):
            export_hf(state.params, cfg, tok, os.path.join(workdir, f"hf_export_step_{step:07d}"), config.export)
        return out

    eval_nav_splits = bool(virl and config.get("eval_nav") and config.eval_nav.splits)
    task = loop.Task(name="sft", init_params=mdef.init, loss_fn=loss_fn, logical=mdef.logical,
                     train_iter=plan.iterator(int(data.num_workers), int(data.prefetch)),
                     eval_fn=eval_fn if (eval_plan is not None or config.export.each_eval or eval_nav_splits)
                     else None)
    if jax.process_index() == 0:
        print(f"[sft] {len(plan.rows)} rows, {plan.batches_per_epoch} batches/epoch of {gbs}; buckets "
              f"{plan.buckets} x tiles {plan.tile_buckets}; init "
              f"{config.train.init_from or 'random ' + config.model.variant}", flush=True)
    state, final = loop.train(config, workdir, task, mesh=mesh)
    if config.export.at_end:
        export_hf(state.params, cfg, tok, os.path.join(workdir, "hf_export"), config.export)
    summary = summarize(workdir)
    summary.update({f"eval_{k}": v for k, v in final.items()})
    summary["skipped_samples"] = plan.skipped
    if jax.process_index() == 0:
        print(f"[sft] loss {summary.get('first_loss', float('nan')):.4f} -> {summary.get('last_loss', float('nan')):.4f}"
              f", token acc {summary.get('last_token_acc', float('nan')):.3f}, "
              f"{summary.get('tokens_per_sec', float('nan')):.0f} tokens/s"
              + (f", eval loss {final['loss']:.4f}" if "loss" in final else ""), flush=True)
    return summary


def summarize(workdir: str) -> dict:
    """First/last train loss, token accuracy and tokens/s (tokens per step × steps/s) from metrics.jsonl."""
    from recogdrive_jax.train.metrics import read_metrics
    rows = [r for r in read_metrics(workdir, "train") if "loss" in r]
    if not rows:
        return {}
    last = rows[-1]
    tps = [r["tokens"] * r["steps_per_sec"] for r in rows[1:] if "tokens" in r] or \
          [r["tokens"] * r["steps_per_sec"] for r in rows if "tokens" in r]
    return {"first_loss": rows[0]["loss"], "last_loss": last["loss"], "last_token_acc": last.get("token_acc"),
            "tokens_per_sec": float(np.median(tps)) if tps else float("nan"), "steps": last["step"]}
