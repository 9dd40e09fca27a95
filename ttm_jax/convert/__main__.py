"""Checkpoint conversion: one grammar, a source and a destination, each `KIND:PATH`.

  python -m ttm_jax.convert --from=KIND:PATH --to=KIND:PATH [--stage=0|1|2] [--config=FILE[:ARG]]
      [--dtype=bf16|fp32] [--params=ema|raw] [--scan_layers=true|false] [--seed=N] [--like=FOLDER] [--overwrite]

Sources (`--from`) and where each goes (`--to`):

  diffusers:PATH -> orbax:DIR
      a diffusers `WanTransformer3DModel` folder -> `DIR/params` (Orbax) + `DIR/ttm_convert.json`. Without --stage
      the backbone as it is (same input channels, no TTM layers), so that diffusers -> orbax -> torch gives back a
      folder `WanTransformer3DModel.from_pretrained` loads, every tensor bit-identical. With --stage the backbone is
      grafted into the stage model (3 x latent input channels, the new ones zero; stage 2 adds TTM layers, freshly
      initialised (--seed) with zero output, in the first ceil(num_layers / 4) blocks), or into the model --config
      describes (it needs --stage, which must be the config's): the init checkpoint for
      `config.train.init_from=DIR/params`. A `diffusers:` folder that holds `ttm_config.json` is a `torch:` source.
  diffusers-unet:PATH[,motion_adapter:PATH] -> orbax:DIR
      the AnimateDiff U-Net (`config.model.backbone="unet"`): a diffusers `UNetMotionModel` folder, or SD 1.5's
      `unet/` folder plus an AnimateDiff `MotionAdapter` folder (`ttm_jax/backbones/animatediff/weights.py`) ->
      `DIR/params` + `DIR/ttm_convert.json` (`backbone: "unet"`). Without --stage the backbone as it is (diffusers ->
      orbax -> torch
      is bit-identical); with --stage the stage init checkpoint: the input conv widened to the stage's channels (the
      new ones zero), stage 2 with TTM's layers (zero output) in every encoder spatial transformer (SD 1.5: 6), or as
      --config says (e.g. configs/stage2.py:animatediff; its model.unet must match the folder's).
  orbax:DIR | workdir:DIR[@STEP] -> torch:FOLDER (or diffusers:FOLDER, the same)
      a converted checkpoint (`DIR` or `DIR/params`; its dims from `ttm_convert.json` beside the params, else from
      --config, or --like=FOLDER naming the diffusers transformer folder a backbone came from) or a trained run (the
      latest step, or STEP; --params=ema|raw) -> the backbone in diffusers' layout (safetensors + config.json; a U-Net
      stage as a `UNetMotionModel` folder) + the TTM weights (`ttm_layers.safetensors`, `ttm_config.json`), loadable
      by `ttm_jax.torch.TTMWanTransformer3DModel`. --dtype casts the tensors (default: as trained).
  torch:FOLDER -> orbax:DIR
      an exported TTM folder (or a plain `UNetMotionModel` export) back to `DIR/params` + `DIR/ttm_convert.json`,
      bit-identical (--scan_layers picks the Orbax layout of the DiT's blocks).
  diffusers-vae:PATH -> diffusers-vae:FOLDER
      a Wan VAE folder: checks that every key and shape maps, and writes it back (bit-identical). The Wan VAE needs
      no conversion at run time: `config.autoencoder.path` is the diffusers folder itself.

`orbax:DIR` is always the folder that holds `params/` and `ttm_convert.json`. A destination that already holds
something is refused before any source is read: a non-empty `torch:` folder, an existing Orbax params checkpoint;
`--overwrite` replaces what is there (the export's files; the whole params folder). A bad command line is one line
`error: ...` and exit status 2 (`ttm_jax/cli.py`). In a program: `convert([...the same arguments...])`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import registry
from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.backbones.animatediff import weights as unet_convert
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import vae as wan_vae
from ttm_jax.backbones.wan import vae_weights as vae_convert
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.convert import export
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import ttm_export

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "": ""}
SOURCES = ("diffusers", "diffusers-unet", "diffusers-vae", "torch", "orbax", "workdir")
DESTINATIONS = ("orbax", "torch", "diffusers", "diffusers-vae")
SUPPORTED = ("diffusers:PATH | diffusers-unet:PATH[,motion_adapter:PATH] | torch:PATH -> orbax:DIR, orbax:DIR | "
             "workdir:DIR[@STEP] -> torch:PATH, diffusers-vae:PATH -> diffusers-vae:PATH")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `main` (defined only when this module runs, or into `convert`'s own `FlagValues`, so importing
    it defines nothing)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("from", None, "the source, KIND:PATH: " + " | ".join(f"{k}:PATH" for k in SOURCES),
                        required=True, **fv)
    flags.DEFINE_string("to", None, "the destination, KIND:PATH: orbax:DIR | torch:FOLDER | diffusers-vae:FOLDER",
                        required=True, **fv)
    flags.DEFINE_enum("stage", None, ["0", "1", "2"], "graft a diffusers backbone into this stage's model", **fv)
    flags.DEFINE_string("config", "", "FILE[:ARG]: the stage model to graft into (configs/stage2.py:wan1.3b), or "
                        "the model an Orbax source without ttm_convert.json holds", **fv)
    flags.DEFINE_string("dtype", "", "bf16 | fp32: the stored tensors' dtype (default: as the source)", **fv)
    flags.DEFINE_enum("params", "ema", ["ema", "raw"], "workdir sources: the EMA params when kept, or the raw", **fv)
    flags.DEFINE_bool("scan_layers", True, "the Orbax layout of the DiT's blocks (scanned or one per block)", **fv)
    flags.DEFINE_integer("seed", 0, "init of the TTM layers (--stage=2)", **fv)
    flags.DEFINE_string("like", "", "orbax sources without ttm_convert.json: the diffusers transformer folder whose "
                        "config.json describes the backbone", **fv)
    flags.DEFINE_bool("overwrite", False, "replace what the destination holds (refused without)", **fv)


def _load_config(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARG]` -> `FILE`'s `get_config(ARG)` (e.g. configs/stage2.py:wan1.3b)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise cli.MissingInput(f"--config={spec}: no such file {path!r}; give a config file such as "
                               f"configs/stage2.py:wan1.3b")
    module_spec = importlib.util.spec_from_file_location("ttm_convert_config", path)
    if module_spec is None or module_spec.loader is None:
        raise cli.BadInput(f"--config={spec}: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def check_destination(kind: str, path: str, overwrite: bool) -> None:
    """Refuse (`BadInput` naming the fix) a destination that holds something unless `overwrite`: a `torch` folder
    that exists and is not empty, an `orbax` params checkpoint that exists. Called before any source is read."""
    if overwrite or not os.path.exists(path):
        return
    if kind == "torch":
        if not os.path.isdir(path):
            raise cli.BadInput(f"--to=torch:{path}: exists and is not a folder; choose a folder path")
        entries = sorted(os.listdir(path))
        if not entries:
            return
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise cli.BadInput(f"--to=torch:{path}: the folder is not empty ({shown}); pass --overwrite to replace the "
                           f"export there, or choose a new folder")
    raise cli.BadInput(f"--to=orbax:{path}: an Orbax checkpoint is already there; pass --overwrite to replace it, or "
                       f"choose a new folder")


def _clear_orbax(target: str) -> None:
    """With `--overwrite`: remove the Orbax params checkpoint at `target` just before the new one is written."""
    if os.path.isdir(target):
        shutil.rmtree(target)


def _cast(params: Any, dtype: str) -> Any:
    """The params as numpy arrays, cast to `dtype` when given (the storage dtype; training keeps fp32 master weights:
    config.model.param_dtype)."""
    if dtype:
        return jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    return jax.tree.map(np.asarray, params)


def _checked_config(spec: str, stage: int | None) -> ml_collections.ConfigDict:
    config = config_lib.validate(_load_config(spec))
    if stage is not None and int(config.stage) != stage:
        raise cli.BadInput(f"--stage={stage} but {spec} is a stage-{config.stage} config; give --stage={config.stage}")
    return config


# ----------------------------------------------------------------------------------------------- sources -> orbax


def _dit(src: str, out: str, *, stage: int | None, config_spec: str, scan_layers: bool, seed: int, dtype: str,
         overwrite: bool) -> str:
    """A diffusers Wan transformer folder -> Orbax params at `out/params` (the backbone, or the stage's init)."""
    target = os.path.join(out, "params")
    t0 = time.perf_counter()
    backbone_cfg, cin, cout, backbone = dit_convert.load_diffusers_folder(src, scan_layers=scan_layers)
    print(f"read {src}: dim {backbone_cfg.dim}, {backbone_cfg.num_layers} layers, in/out channels {cin}/{cout} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    if config_spec:
        config = _checked_config(config_spec, stage)
        if registry.backbone_name(config) != "dit":
            raise cli.BadInput(f"--config={config_spec}: config.model.backbone={registry.backbone_name(config)!r}; a "
                               f"diffusers: source needs a DiT config (e.g. configs/stage2.py:wan1.3b)")
        stage_cfg = dit_lib.DiTConfig.from_config(config.model)
        in_channels = config_lib.in_channels(config)
        for f in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim", "patch_size", "eps"):
            if getattr(stage_cfg, f) != getattr(backbone_cfg, f):
                raise cli.BadInput(f"{config_spec}: config.model.{f}={getattr(stage_cfg, f)} but {src}/config.json "
                                   f"has {getattr(backbone_cfg, f)}; set config.model.{f}={getattr(backbone_cfg, f)}")
        stage_cfg = dataclasses.replace(stage_cfg, scan_layers=scan_layers)
    elif stage is not None:
        if stage == 0:
            raise cli.BadInput("--stage=0 needs --config=configs/stage0.py[:VARIANT]: the TI2V model's layout")
        in_channels = 3 * cin  # noisy latent + the stage's two conditions
        stage_cfg = dataclasses.replace(backbone_cfg, ttm_layers=0 if stage == 1
                                        else math.ceil(backbone_cfg.num_layers / 4))  # the paper: 10 of 40 blocks
    else:
        stage_cfg, in_channels = backbone_cfg, cin
    if in_channels < cin:
        raise cli.BadInput(f"{config_spec}: {in_channels} input channels are below the checkpoint's {cin}")
    params = backbone
    if stage_cfg.ttm_layers or in_channels != cin:
        model = dit_lib.DiT(stage_cfg, in_channels, cout)
        iargs, ikw = dit_lib.init_inputs(stage_cfg, in_channels)
        fresh = jax.jit(lambda r: nn.unbox(model.init(r, *iargs, **ikw)["params"]))(jax.random.key(seed))
        params = dit_lib.graft_backbone(fresh, backbone, ttm_layers=stage_cfg.ttm_layers,
                                        scan_layers=stage_cfg.scan_layers)
        del fresh
    params = _cast(params, dtype)
    if overwrite:
        _clear_orbax(target)
    target = dit_convert.save_converted(target, params, stage_cfg, in_channels, cout, src)
    print(f"wrote {target} (set config.train.init_from to it) in {time.perf_counter() - t0:.1f}s", flush=True)
    return target


# the `model.unet` fields a stage config must share with the converted backbone (ttm_layers and the input channels
# are the stage's own)
_UNET_ARCH = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "num_attention_heads",
              "cross_attention_dim", "norm_num_groups", "norm_eps", "transformer_layers_per_block",
              "use_linear_projection", "mid_block_scale_factor", "mid_block_layers", "use_motion_mid_block",
              "motion_num_attention_heads", "motion_max_seq_length", "temporal_transformer_layers_per_block",
              "temporal_transformer_layers_per_mid_block")


def _unet_paths(src: str) -> list[str]:
    """`PATH[,motion_adapter:PATH]` -> [unet folder, adapter folder] (one folder: a `UNetMotionModel`)."""
    first, sep, rest = src.partition(",")
    if not sep:
        return [first]
    kind, sep2, adapter = rest.partition(":")
    if kind != "motion_adapter" or not sep2 or not adapter:
        raise cli.BadInput(f"--from=diffusers-unet:{src}: expected PATH or PATH,motion_adapter:PATH (SD 1.5's unet/ "
                           f"folder, then the AnimateDiff MotionAdapter folder)")
    return [first, adapter]


def _unet(src: str, out: str, *, stage: int | None, config_spec: str, seed: int, dtype: str,
          overwrite: bool) -> str:
    """diffusers U-Net folder(s) -> Orbax params at `out/params` (the backbone, or with `stage` the stage's init)."""
    target = os.path.join(out, "params")
    t0 = time.perf_counter()
    paths = _unet_paths(src)
    backbone_cfg, cin, cout, backbone = unet_convert.load_diffusers_folders(*paths)
    print(f"read {' + '.join(paths)}: levels {backbone_cfg.block_out_channels}, in/out channels {cin}/{cout} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    stage_cfg, in_channels = backbone_cfg, cin
    if config_spec:
        config = _checked_config(config_spec, stage)
        if registry.backbone_name(config) != "unet":
            raise cli.BadInput(f"{config_spec}: config.model.backbone={registry.backbone_name(config)!r}; a U-Net "
                               f"source needs a backbone='unet' config (e.g. configs/stage2.py:animatediff)")
        stage_cfg = registry.model_config(config)
        for f in _UNET_ARCH:
            if getattr(stage_cfg, f) != getattr(backbone_cfg, f):
                raise cli.BadInput(f"{config_spec}: config.model.unet.{f}={getattr(stage_cfg, f)!r} but {paths[0]} "
                                   f"has {getattr(backbone_cfg, f)!r}; set config.model.unet.{f} to it")
        in_channels = config_lib.in_channels(config)
        if int(config.autoencoder.latent_channels) != cout:
            raise cli.BadInput(f"{config_spec}: autoencoder.latent_channels={config.autoencoder.latent_channels} but "
                               f"the U-Net predicts {cout} channels")
    elif stage is not None:
        if stage == 0:
            raise cli.BadInput("--stage=0 needs --config naming the TI2V model's layout")
        in_channels = 3 * cin  # noisy latent + the stage's two conditions
        stage_cfg = dataclasses.replace(backbone_cfg, ttm_layers=0 if stage == 1
                                        else backbone_cfg.num_encoder_transformers)  # the paper: all 6 of SD 1.5
    params = backbone
    if stage_cfg.ttm_layers or in_channels != cin:
        model = unet_lib.UNet(stage_cfg, in_channels, cout)
        iargs, ikw = unet_lib.init_inputs(stage_cfg, in_channels)
        fresh = jax.jit(lambda r: nn.unbox(model.init(r, *iargs, **ikw)["params"]))(jax.random.key(seed))
        params = unet_lib.graft_backbone(fresh, backbone)
        del fresh
    params = _cast(params, dtype)
    if overwrite:
        _clear_orbax(target)
    target = dit_convert.save_converted(target, params, stage_cfg, in_channels, cout, paths[0], backbone="unet")
    print(f"wrote {target} (set config.train.init_from to it) in {time.perf_counter() - t0:.1f}s", flush=True)
    return target


def _import(src: str, out: str, *, scan_layers: bool, overwrite: bool) -> str:
    """An exported TTM folder (or a plain U-Net export) -> Orbax params at `out/params`, bit-identical."""
    target = os.path.join(out, "params")
    cfg, cin, cout, params = export.import_folder(src, scan_layers=scan_layers)
    if overwrite:
        _clear_orbax(target)
    target = dit_convert.save_converted(target, params, cfg, cin, cout, src, backbone=export.backbone_of(cfg))
    print(f"wrote {target}")
    return target


# ----------------------------------------------------------------------------------------------- sources -> torch


def _orbax_dims(path: str, config_spec: str, like: str, scan_layers: bool
                ) -> tuple[Any, int, int, int, int | None, str | None, bool | None]:
    """(model config, in, out, latent channels, stage, condition_frames, self_condition) of an Orbax params
    checkpoint: the `--config` file, else `--like`'s config.json (a backbone), else the `ttm_convert.json` beside it
    (the last two say neither stage, condition frames nor self-conditioning: None)."""
    if config_spec:
        config = _load_config(config_spec)
        return (*export.stage_dims(config), inputs_lib.condition_frames(config), config_lib.self_condition(config))
    if like:
        cfg, cin, cout = dit_convert.read_config(like, scan_layers=scan_layers)
        return cfg, cin, cout, cout, None, None, None
    meta_file = dit_convert.converted_meta_file(path)
    if not os.path.exists(meta_file):
        raise cli.BadInput(f"--from=orbax:{path}: no {meta_file} beside it; pass --config=configs/stage2.py:VARIANT "
                           f"naming the model it holds, or --like=FOLDER naming the diffusers folder of its backbone")
    cfg, cin, cout = export.converted_dims(path)
    return cfg, cin, cout, cout, None, None, None


def _export(src_kind: str, src: str, dst: str, *, config_spec: str, like: str, params_kind: str, dtype: str,
            scan_layers: bool) -> dict[str, str]:
    """A trained run or an Orbax checkpoint -> a torch folder (`ttm_jax/convert/export.py`)."""
    params: Any
    if src_kind == "workdir":
        workdir, _, step = src.partition("@")
        if step and not step.isdigit():
            raise cli.BadInput(f"--from=workdir:{src}: the step after @ must be a number (workdir:DIR@1000)")
        config, params, at = export.load_workdir(workdir, step=int(step) if step else None, ema=params_kind == "ema")
        cfg, cin, cout, lat, stage = export.stage_dims(config)
        frames: str | None = inputs_lib.condition_frames(config)
        self_cond: bool | None = config_lib.self_condition(config)
        print(f"read {workdir} step {at} ({params_kind} params), stage {stage}")
    else:
        if os.path.isdir(os.path.join(src, "params")):
            src = os.path.join(src, "params")
        cfg, cin, cout, lat, stage, frames, self_cond = _orbax_dims(src, config_spec, like, scan_layers)
        params = export.load_orbax_params(src, cfg, cin, cout)
    paths = export.export_params(params, cfg, cin, cout, dst, latent_channels=lat, stage=stage,
                                 dtype=dtype or None, condition_frames=frames, self_condition=self_cond)
    print("wrote " + ", ".join(sorted(paths.values())))
    return paths


def _vae(src: str, out: str) -> str:
    """A Wan VAE folder checked (every key and shape maps) and written back to `out`."""
    cfg = wan_vae.read_config(src)
    params = vae_convert.load_diffusers_folder(src, cfg)
    n = sum(x.size for x in rb.flatten(params).values())
    print(f"{src}: {n / 1e6:.1f}M parameters, time factor {cfg.time_factor}, space factor {cfg.space_factor}, "
          f"z_dim {cfg.z_dim}: every tensor mapped")
    file = vae_convert.save_diffusers_folder(params, cfg, out)
    print(f"wrote {file}")
    return file


# ----------------------------------------------------------------------------------------------------- dispatch


def _split(spec: str, flag: str, kinds: Sequence[str]) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise cli.BadInput(f"{flag}={spec!r}: expected KIND:PATH with KIND one of {', '.join(kinds)} (e.g. "
                           f"--from=workdir:/runs/stage2 --to=torch:/out/stage2_transformer)")
    return kind, path


def run_conversion(f: flags.FlagValues) -> dict[str, str]:
    """The conversion the parsed flags `f` name (module docstring). Returns {name: written path}."""
    if f.dtype not in _DTYPES:
        raise cli.BadInput(f"--dtype={f.dtype}: choose bf16 or fp32")
    dtype = _DTYPES[f.dtype]
    src_kind, src = _split(f["from"].value, "--from", SOURCES)
    dst_kind, dst = _split(f.to, "--to", DESTINATIONS)
    stage = None if f.stage is None else int(f.stage)
    pair = f"--from={f['from'].value} --to={f.to}"
    if dst_kind == "diffusers":
        dst_kind = "torch"  # an export is a diffusers folder (plus the TTM files)
    if src_kind == "diffusers" and os.path.exists(os.path.join(src, ttm_export.TTM_CONFIG_FILE)):
        src_kind = "torch"  # an exported TTM folder
    if f.config and stage is None and dst_kind == "orbax":
        raise cli.BadInput("--config needs --stage: without it the backbone is converted as it is")
    if (stage is not None or f.seed) and not (src_kind in ("diffusers", "diffusers-unet") and dst_kind == "orbax"):
        raise cli.BadInput(f"{pair}: --stage and --seed graft a diffusers: or diffusers-unet: backbone into an "
                           f"orbax: stage checkpoint; drop them here")
    if (src_kind == "diffusers-vae") != (dst_kind == "diffusers-vae"):
        raise cli.BadInput(f"{pair}: a Wan VAE converts as --from=diffusers-vae:PATH --to=diffusers-vae:FOLDER; "
                           f"supported: {SUPPORTED}")
    if src_kind == "diffusers-vae":
        return {"weights": _vae(src, dst)}
    if dst_kind == "orbax":
        check_destination("orbax", os.path.join(dst, "params"), f.overwrite)
        if src_kind == "diffusers":
            return {"params": _dit(src, dst, stage=stage, config_spec=f.config, scan_layers=f.scan_layers,
                                   seed=f.seed, dtype=dtype, overwrite=f.overwrite)}
        if src_kind == "diffusers-unet":
            return {"params": _unet(src, dst, stage=stage, config_spec=f.config, seed=f.seed, dtype=dtype,
                                    overwrite=f.overwrite)}
        if src_kind == "torch":
            return {"params": _import(src, dst, scan_layers=f.scan_layers, overwrite=f.overwrite)}
    elif src_kind in ("orbax", "workdir"):
        check_destination("torch", dst, f.overwrite)
        return _export(src_kind, src, dst, config_spec=f.config, like=f.like, params_kind=f.params, dtype=dtype,
                       scan_layers=f.scan_layers)
    raise cli.BadInput(f"{pair}: supported: {SUPPORTED}")


def _no_positionals(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"convert: unexpected arguments {list(argv[1:])}; the one grammar is --from=KIND:PATH "
                             f"--to=KIND:PATH (python -m ttm_jax.convert --help)")


def convert(args: Sequence[str]) -> dict[str, str]:
    """The command line in a program: `args` as after `python -m ttm_jax.convert` (`["--from=diffusers:PATH",
    "--to=orbax:DIR", "--stage=2"]`), parsed into flags of its own (absl's global flags untouched). A bad argument
    raises `BadInput`. Returns {name: written path}."""
    f = flags.FlagValues()
    define_flags(f)
    try:
        rest = f(["convert", *args])
    except flags.Error as e:
        raise cli.BadInput(f"convert: {e}") from None
    try:
        _no_positionals(rest)
    except app.UsageError as e:
        raise cli.BadInput(str(e)) from None
    return run_conversion(f)


def main(argv: Sequence[str]) -> None:
    """Converts `--from` into `--to` and prints what it wrote."""
    _no_positionals(argv)
    run_conversion(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
