"""Convert ReCogDrive planner weights between upstream PyTorch checkpoints and Orbax (spec/planner.md §1).

    python -m recogdrive_jax.convert planner --from-torch IN.{ckpt,pt,safetensors} --out DIR [--config small]
                                             [--scan-layers]
    python -m recogdrive_jax.convert planner --to-torch DIR --out OUT.{ckpt,pt,safetensors}   [--no-ema]
      (DIR: a --from-torch output, or an il/rl run workdir: its newest checkpoint, EMA params when present)

Orbax layout written to DIR:
    DIR/params/               StandardCheckpointer pytree = `planner_params(planner)` (nnx.List indices as '0', '1', ..;
                              with `planner.scan_layers` one stacked `transformer_blocks` whose leaves are [L, ...])
    DIR/planner_config.json   the PlannerConfig fields (restore with `load_planner_checkpoint` / `restore_planner`)

Loading is strict: missing, unexpected or mis-shaped keys are one error listing all of them. Dropped with a printed
note: `eta.eta_logit` (eta fixed to 1), the 19 `ddpm_*`/`ddim_*` schedule buffers and `model.rotary_embedder.inv_freq`
(recomputed; inv_freq is checked), and `old_policy.*` (the frozen RL reference of original Stage-3 checkpoints).
.ckpt/.pt files are read with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from recogdrive_jax.errors import CheckpointKeyError  # noqa: F401  (re-exported)

PREFIX = "agent.action_head."
ROTARY_KEY = "model.rotary_embedder.inv_freq"
ETA_KEY = "eta.eta_logit"
# NNX module attribute -> torch submodule path (torch wraps these Linears in Sequential / ModuleList).
_MODULE_RENAMES = {"to_out": "to_out.0", "adaLN_modulation": "adaLN_modulation.1",
                   "modulation_proj": "modulation_proj.1"}


# ---------------------------------------------------------------------------------------------------------------
# Key mapping.

def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _torch_key(path: tuple) -> tuple[str, bool]:
    """NNX param path -> (torch key without prefix, transpose?)."""
    *mods, leaf = [str(p) for p in path]
    mods = [_MODULE_RENAMES.get(m, m) for m in mods]
    if not mods and leaf == "position_embedding":
        return "position_embedding.weight", False
    if leaf == "kernel":
        return ".".join(mods + ["weight"]), True
    if leaf in ("bias", "weight"):
        return ".".join(mods + [leaf]), False
    raise AssertionError(f"unmapped planner parameter path {path}")


def param_key_map(cfg) -> dict[tuple, tuple[str, bool, tuple[int, ...]]]:
    """NNX path -> (torch key, transpose, jax shape) for every planner parameter of `cfg` (diffusion kind)."""
    from recogdrive_jax.models.planner import abstract_planner, planner_params

    if cfg.kind != "diffusion":
        raise ValueError("convert planner: only planner kind 'diffusion' has an upstream checkpoint layout "
                         f"(got kind={cfg.kind!r})")
    flat = _flatten(planner_params(abstract_planner(cfg.replace(scan_layers=False))))  # upstream's list layout
    out = {}
    for path, leaf in flat.items():
        key, transpose = _torch_key(path)
        out[path] = (key, transpose, tuple(leaf.shape))
    return out


def _torch_schedule_buffers(num_timesteps: int, num_steps: int) -> dict[str, np.ndarray]:
    """The 19 buffers computed with torch ops in upstream order, so an export is bit-identical to what upstream
    saves (torch's CPU sqrt/log differ from numpy's by an ulp on a few entries)."""
    import torch
    from recogdrive_jax.diffusion.schedule import cosine_beta_schedule

    b = torch.from_numpy(cosine_beta_schedule(num_timesteps))
    a = 1.0 - b
    ac = torch.cumprod(a, dim=0)
    acp = torch.cat([torch.ones(1), ac[:-1]])
    var = b * (1.0 - acp) / (1.0 - ac)
    out = dict(betas=b, alphas=a, alphas_cumprod=ac, alphas_cumprod_prev=acp, sqrt_alphas_cumprod=ac.sqrt(),
               sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(), sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
               sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1).sqrt(), var=var,
               logvar_clipped=torch.log(torch.clamp(var, min=1e-20)), mu_coef1=b * acp.sqrt() / (1.0 - ac),
               mu_coef2=(1.0 - acp) * a.sqrt() / (1.0 - ac))
    out = {f"ddpm_{k}": v for k, v in out.items()}
    ts = torch.arange(0, num_steps) * (num_timesteps // num_steps)
    da = ac[ts].clone()
    dap = torch.cat([torch.tensor([1.0]), ac[ts[:-1]]])
    flip = lambda x: torch.flip(x, [0])
    out.update(ddim_t_schedule=ts.clone(), ddim_t=flip(ts), ddim_alphas=flip(da), ddim_alphas_sqrt=flip(da.sqrt()),
               ddim_alphas_prev=flip(dap), ddim_sqrt_one_minus_alphas=flip((1.0 - da) ** 0.5),
               ddim_sigmas=flip(0.0 * ((1 - dap) / (1 - da) * (1 - da / dap)) ** 0.5))
    return {k: v.numpy() for k, v in out.items()}


def non_param_entries(cfg) -> dict[str, np.ndarray]:
    """The buffers/non-trainable entries upstream also saves (recomputed on export): inv_freq, eta_logit = +inf and
    the 19 schedule buffers (with torch ops when torch is installed, else the numpy schedule, equal to ~1 ulp)."""
    from recogdrive_jax.diffusion.schedule import schedule_buffers
    from recogdrive_jax.models.layers import rope_inv_freq

    out = {ROTARY_KEY: rope_inv_freq(cfg.head_dim, cfg.rope_base)}
    if cfg.sampling_method == "ddim":
        out[ETA_KEY] = np.full((1,), np.inf, np.float32)
        try:
            out.update(_torch_schedule_buffers(cfg.num_train_timesteps, cfg.num_inference_steps))
        except ImportError:
            out.update(schedule_buffers(cfg.num_train_timesteps, cfg.num_inference_steps))
    return out


def expected_manifest(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(key with prefix, torch shape) for the full upstream state dict of `cfg`, in upstream order-insensitive sort."""
    rows = []
    for key, transpose, shape in param_key_map(cfg).values():
        rows.append((PREFIX + key, tuple(reversed(shape)) if transpose else shape))
    for key, v in non_param_entries(cfg).items():
        rows.append((PREFIX + key, tuple(v.shape)))
    return sorted(rows)


# ---------------------------------------------------------------------------------------------------------------
# state dict <-> params.

def _strip_prefix(sd: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Accepts `agent.action_head.*` (Lightning), `action_head.*` (agent) or bare keys. Returns (bare dict,
    keys outside the action head)."""
    keys = list(sd)
    for prefix in (PREFIX, "action_head."):
        if any(k.startswith(prefix) for k in keys):
            inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            outside = [k for k in keys if not k.startswith(prefix)]
            return inside, outside
    return dict(sd), []


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        import torch
        t = v.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    return np.asarray(v)


def torch_state_dict_to_params(sd: Mapping[str, Any], cfg, *, verbose: bool = True) -> dict:
    """Upstream state dict (torch tensors or numpy arrays; any of the accepted prefixes) -> nested pure dict of
    fp32 numpy params matching `planner_params(build_planner(cfg))`. Strict: raises CheckpointKeyError listing
    missing, unexpected and mis-shaped keys."""
    bare, outside = _strip_prefix(sd)
    notes = []
    old = sorted(k for k in bare if k.startswith("old_policy."))
    for k in old:
        bare.pop(k)
    if old:
        notes.append(f"dropped {len(old)} old_policy.* keys (frozen RL reference copy of original Stage-3 checkpoints)")
    kmap = param_key_map(cfg)
    extras = non_param_entries(cfg)
    expected_param = {key: (path, transpose, shape) for path, (key, transpose, shape) in kmap.items()}
    if not set(expected_param) & set(bare):  # e.g. some other model's file: listing every key would not help
        found = sorted(sd)
        raise CheckpointKeyError(
            f"not a ReCogDrive planner (TrajectoryHead) state dict: none of its {len(expected_param)} parameter keys "
            f"(e.g. {PREFIX}feature_encoder.weight) is present; it has {len(found)} key(s), e.g. "
            f"{', '.join(found[:5]) or 'none'}")
    missing = sorted(set(expected_param) - set(bare)) + sorted(k for k in extras if k not in bare)
    unexpected = sorted(PREFIX + k for k in set(bare) - set(expected_param) - set(extras)) + sorted(outside)
    misshaped = []
    flat = {}
    from recogdrive_jax.train.metrics import track
    for key, (path, transpose, shape) in track(expected_param.items(), desc="convert planner: read", unit="params"):
        if key not in bare:
            continue
        arr = _to_numpy(bare[key])
        tshape = tuple(reversed(shape)) if transpose else shape
        if tuple(arr.shape) != tshape:
            misshaped.append(f"{PREFIX}{key}: got {tuple(arr.shape)}, expected {tshape}")
            continue
        arr = arr.astype(np.float32)
        flat[path] = np.ascontiguousarray(arr.T) if transpose else arr
    for key, ref in extras.items():
        if key in bare and tuple(_to_numpy(bare[key]).shape) != tuple(ref.shape):
            misshaped.append(f"{PREFIX}{key}: got {tuple(_to_numpy(bare[key]).shape)}, expected {tuple(ref.shape)}")
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): " + ", ".join(PREFIX + k for k in missing))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): " + ", ".join(unexpected))
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)} key(s): " + "; ".join(misshaped))
        hint = ""
        if cfg.sampling_method == "ddim" and all(k in missing for k in extras if k != ROTARY_KEY):
            hint = " (no eta/schedule buffers: a flow-mode checkpoint? use sampling_method='flow')"
        raise CheckpointKeyError(f"planner checkpoint does not match config (D={cfg.embed_dim}, "
                                 f"layers={cfg.num_layers}, Hv={cfg.vl_dim}, O={cfg.output_dim}): "
                                 + " | ".join(parts) + hint)
    inv = _to_numpy(bare[ROTARY_KEY]).astype(np.float32)
    if not np.allclose(inv, extras[ROTARY_KEY], rtol=1e-6, atol=0):
        raise CheckpointKeyError(f"{PREFIX}{ROTARY_KEY}: RoPE frequencies {inv[:3]}... do not match base "
                                 f"{cfg.rope_base} / head_dim {cfg.head_dim}")
    dropped = [ROTARY_KEY]
    if ETA_KEY in extras:
        eta_logit = _to_numpy(bare[ETA_KEY]).reshape(-1)
        if not np.all(np.isposinf(eta_logit)):
            notes.append(f"WARNING: {ETA_KEY} = {eta_logit.tolist()} (not +inf); this port fixes eta = 1")
        dropped.append(ETA_KEY)
        dropped.append(f"{len(extras) - 2} schedule buffers (ddpm_*, ddim_*)")
    notes.append("dropped " + ", ".join(dropped) + " (recomputed from the config)")
    if verbose:
        for n in notes:
            print(f"convert planner: note: {n}", file=sys.stderr)
    from recogdrive_jax.models.planner import to_layout
    return to_layout(_unflatten(flat), cfg)  # stacked [L, ...] blocks when cfg.scan_layers


def params_to_torch_state_dict(params: Mapping, cfg, *, prefix: str = PREFIX, as_torch: bool = True) -> dict:
    """Nested params -> full upstream state dict (params + inv_freq + eta + schedule buffers), keys with `prefix`.
    Values are torch tensors (as_torch) or numpy arrays."""
    from recogdrive_jax.models.planner import _int_keys, unstack_blocks

    params = _int_keys(params)
    if isinstance(params.get("model"), Mapping) and isinstance(params["model"].get("transformer_blocks"), Mapping):
        params = unstack_blocks(params)  # either block layout: upstream's is the list
    flat = _flatten(params)
    kmap = param_key_map(cfg)
    missing = sorted(set(kmap) - set(flat))
    unexpected = sorted(set(flat) - set(kmap), key=str)
    if missing or unexpected:
        raise CheckpointKeyError(f"params do not match config: missing {missing}, unexpected {unexpected}")
    out: dict[str, Any] = {}
    from recogdrive_jax.train.metrics import track
    for path, (key, transpose, shape) in track(kmap.items(), desc="convert planner: write", unit="params"):
        arr = np.asarray(flat[path], np.float32)
        if tuple(arr.shape) != shape:
            raise CheckpointKeyError(f"params {'/'.join(map(str, path))}: got {arr.shape}, expected {shape}")
        out[prefix + key] = np.ascontiguousarray(arr.T) if transpose else arr
    for key, v in non_param_entries(cfg).items():
        out[prefix + key] = v
    if as_torch:
        import torch
        out = {k: torch.from_numpy(np.array(v)) for k, v in out.items()}
    return out


def infer_config_from_state_dict(sd: Mapping[str, Any], *, sampling_method: str = "ddim", **overrides):
    """PlannerConfig from the shapes of an upstream state dict (Hv, D, layers, head_dim, O, MLP hidden)."""
    from recogdrive_jax.models.planner import PlannerConfig

    bare, _ = _strip_prefix(sd)
    need = {"feature_encoder.weight": 2, "model.transformer_blocks.0.attn.q_norm.weight": 1,
            "model.final_layer.linear.weight": 2, "his_traj_encoder.fc1.weight": 2, "position_embedding.weight": 2}
    miss = [PREFIX + k for k in need if k not in bare]
    if miss:
        found = sorted(sd)
        raise CheckpointKeyError(
            f"not a ReCogDrive planner (TrajectoryHead) state dict: cannot infer its size, missing key(s) "
            f"{', '.join(miss)} (also accepted without the 'agent.' or 'agent.action_head.' prefix); it has "
            f"{len(found)} key(s), e.g. {', '.join(found[:5]) or 'none'}")
    bad = [f"{PREFIX}{k}: shape {tuple(np.shape(bare[k]))}, expected {r}-D" for k, r in need.items()
           if np.ndim(bare[k]) != r]
    if bad:
        raise CheckpointKeyError("not a ReCogDrive planner (TrajectoryHead) state dict: " + "; ".join(bad))
    d, hv = _to_numpy(bare["feature_encoder.weight"]).shape
    hd = _to_numpy(bare["model.transformer_blocks.0.attn.q_norm.weight"]).shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in bare if k.startswith("model.transformer_blocks."))
    o = _to_numpy(bare["model.final_layer.linear.weight"]).shape[0]
    hidden = _to_numpy(bare["his_traj_encoder.fc1.weight"]).shape[0]
    horizon = _to_numpy(bare["position_embedding.weight"]).shape[0]
    if d % hd:
        raise CheckpointKeyError(f"feature_encoder width {d} is not a multiple of head_dim {hd}")
    kw = dict(vl_dim=int(hv), num_heads=int(d // hd), head_dim=int(hd), num_layers=int(layers), output_dim=int(o),
              mlp_hidden=int(hidden), horizon=int(horizon), sampling_method=sampling_method)
    kw.update(overrides)
    return PlannerConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------
# Files.

def load_torch_file(path: str | os.PathLike) -> dict[str, Any]:
    """Flat state dict from .ckpt/.pt (torch.load weights_only=True; a Lightning dict's `state_dict` is taken)
    or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"convert planner: {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors' errors are not ValueErrors; re-raised with the file name
            raise ValueError(f"convert planner: {path}: not a readable .safetensors file ({e})") from None
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"convert planner: {path}: unsupported extension {path.suffix!r}; "
                         "expected .ckpt, .pt, .pth, .bin or .safetensors")
    import torch
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"convert planner: {path}: cannot be read with torch.load(weights_only=True) ({e}); "
                         "re-save it as a plain state dict (torch.save(model.state_dict())) or .safetensors") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"convert planner: {path}: expected a state dict (str -> tensor), got {type(obj).__name__}")
    return dict(obj)


def save_torch_file(sd: Mapping[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(_to_numpy(v)) for k, v in sd.items()}, str(path))
        return
    import torch
    tsd = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))) for k, v in sd.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tsd}, str(path))  # Lightning layout (state_dict only)
    elif path.suffix in (".pt", ".pth", ".bin"):
        torch.save(tsd, str(path))
    else:
        raise ValueError(f"convert planner: {path}: unsupported extension {path.suffix!r}")


def _str_keys(tree):
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def save_planner_checkpoint(out_dir: str | os.PathLike, params: Mapping, cfg) -> Path:
    """Writes DIR/params (Orbax StandardCheckpointer) and DIR/planner_config.json. Refuses to overwrite."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if (out / "params").exists():
        raise FileExistsError(f"convert planner: {out / 'params'} already exists; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", _str_keys(params))
    ckptr.wait_until_finished()
    (out / "planner_config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    return out


def load_planner_checkpoint(ckpt_dir: str | os.PathLike, *, prefer_ema: bool = True):
    """-> (PlannerConfig, nested numpy params with int list indices) from a `--from-torch` output directory or an
    il/rl run workdir (its config.json's planner block and newest checkpoint; EMA params when present and
    `prefer_ema`)."""
    import orbax.checkpoint as ocp
    from recogdrive_jax.models.planner import PlannerConfig, _int_keys, abstract_planner, planner_params

    d = Path(ckpt_dir).absolute()
    cfg_file = d / "planner_config.json"
    if not cfg_file.is_file() and (d / "config.json").is_file() and (d / "checkpoints").is_dir():
        return _load_run_planner(d, prefer_ema)
    if not cfg_file.is_file() or not (d / "params").exists():
        raise FileNotFoundError(f"{d}: not a planner checkpoint (expected params/ and planner_config.json from "
                                "`convert planner --from-torch`, or an il/rl run workdir with config.json and "
                                "checkpoints/)")
    cfg = PlannerConfig.from_mapping(json.loads(cfg_file.read_text()))
    import jax
    target = _str_keys(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), planner_params(abstract_planner(cfg))))
    params = ocp.StandardCheckpointer().restore(d / "params", target)
    return cfg, _int_keys(jax.tree.map(np.asarray, params))


def _load_run_planner(d: Path, prefer_ema: bool):
    """An il/rl run workdir -> (PlannerConfig from its config.json, numpy params of its newest checkpoint)."""
    import jax
    from recogdrive_jax.models.planner import PlannerConfig, _int_keys, abstract_planner, planner_params
    from recogdrive_jax.train import checkpoint as ckpt_lib

    run_cfg = json.loads((d / "config.json").read_text())
    if not isinstance(run_cfg.get("planner"), Mapping):
        raise ValueError(f"{d / 'config.json'}: no `planner` block; not a planner (il/rl) run workdir")
    cfg = PlannerConfig.from_mapping(run_cfg["planner"])
    abstract = planner_params(abstract_planner(cfg))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = ckpt_lib.attach_shardings(abstract, jax.tree.map(lambda _: one, abstract))
    params = ckpt_lib.load_params(str(d), target, prefer_ema=prefer_ema)
    return cfg, _int_keys(jax.tree.map(np.asarray, params))


def restore_planner(ckpt_dir: str | os.PathLike, rngs=None):
    """Builds the planner from DIR/planner_config.json and loads DIR/params into it."""
    from flax import nnx
    from recogdrive_jax.models.planner import build_planner, load_planner_params

    cfg, params = load_planner_checkpoint(ckpt_dir)
    planner = build_planner(cfg, rngs or nnx.Rngs(0))
    load_planner_params(planner, params)
    return planner


# ---------------------------------------------------------------------------------------------------------------
# CLI.

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recogdrive_jax.convert planner",
                                description="Convert ReCogDrive planner weights between PyTorch and Orbax.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-torch", metavar="IN", help="upstream .ckpt/.pt/.safetensors to read")
    g.add_argument("--to-torch", metavar="DIR",
                   help="a `--from-torch` output directory, or an il/rl run workdir (its newest checkpoint), to export")
    p.add_argument("--out", required=True, help="output directory (from-torch) or file (to-torch)")
    p.add_argument("--config", default=None,
                   help="planner variant to enforce (small, large, ...); default: inferred from the shapes")
    p.add_argument("--vlm-size", default=None, choices=["large", "small"],
                   help="with --config: VLM width (large 8B = 3584, small 2B = 1536); default inferred")
    p.add_argument("--sampling-method", default="ddim", choices=["ddim", "flow"])
    p.add_argument("--scan-layers", action="store_true",
                   help="with --from-torch: write the DiT blocks stacked (planner.scan_layers=true) instead of "
                        "upstream's per-block list")
    p.add_argument("--no-ema", action="store_true",
                   help="with --to-torch of a run workdir: export its params, not its EMA params")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from recogdrive_jax.models.planner import planner_config

    try:
        if args.from_torch:
            sd = load_torch_file(args.from_torch)
            if args.config:
                bare, _ = _strip_prefix(sd)
                fe = bare.get("feature_encoder.weight")
                vlm = args.vlm_size or ({3584: "large", 1536: "small"}.get(_to_numpy(fe).shape[1], "large")
                                        if fe is not None else "large")
                cfg = planner_config(args.config, vlm_size=vlm, sampling_method=args.sampling_method)
            else:
                try:
                    cfg = infer_config_from_state_dict(sd, sampling_method=args.sampling_method)
                except CheckpointKeyError as e:
                    raise CheckpointKeyError(f"convert planner: {args.from_torch}: {e}") from None
            cfg = cfg.replace(scan_layers=args.scan_layers)
            try:
                params = torch_state_dict_to_params(sd, cfg)
            except CheckpointKeyError as e:
                raise CheckpointKeyError(f"convert planner: {args.from_torch}: {e}") from None
            out = save_planner_checkpoint(args.out, params, cfg)
            print(f"convert planner: wrote {out} (D={cfg.embed_dim}, layers={cfg.num_layers}, Hv={cfg.vl_dim}, "
                  f"O={cfg.output_dim})")
        else:
            cfg, params = load_planner_checkpoint(args.to_torch, prefer_ema=not args.no_ema)
            sd = params_to_torch_state_dict(params, cfg, as_torch=not str(args.out).endswith(".safetensors"))
            save_torch_file(sd, args.out)
            print(f"convert planner: wrote {args.out} ({len(sd)} keys)")
    except (CheckpointKeyError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
