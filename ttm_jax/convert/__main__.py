"""Checkpoint conversion CLI.

The main form names both ends:

  python -m ttm_jax.convert --from=diffusers:PATH --to=orbax:DIR [--stage=1|2] [--config=FILE[:ARG]] [--dtype=bf16|fp32]
      diffusers WanTransformer3DModel folder -> `DIR/params` (Orbax) + `DIR/ttm_convert.json`. Without --stage the
      backbone is converted as it is (same input channels, no TTM layers), so that diffusers -> orbax -> torch gives
      back a folder `WanTransformer3DModel.from_pretrained` loads, every tensor bit-identical. With --stage the
      backbone is grafted into the stage model (3 x latent input channels, the new ones zero; stage 2 adds TTM
      layers, freshly initialised with zero output, in the first ceil(num_layers / 4) blocks, or as --config says):
      the init checkpoint for `config.train.init_from=DIR/params`.
  python -m ttm_jax.convert --from=orbax:DIR | workdir:DIR[@STEP] --to=torch:PATH [--dtype=bf16|fp32]
      a converted or trained checkpoint -> safetensors + config.json (backbone in diffusers' layout) + the TTM weights
      (`ttm_layers.safetensors`, `ttm_config.json`), loadable by `ttm_jax.torch.TTMWanTransformer3DModel`.
  python -m ttm_jax.convert --from=torch:PATH --to=orbax:DIR      an exported TTM folder back (bit-identical)

The AnimateDiff U-Net (`config.model.backbone="unet"`):

  python -m ttm_jax.convert --from=diffusers-unet:PATH[,motion_adapter:PATH] --to=orbax:DIR [--stage=1|2]
      [--config=configs/stage2.py:animatediff] [--dtype=bf16|fp32]
      a diffusers `UNetMotionModel` folder, or SD 1.5's `unet/` folder plus an AnimateDiff `MotionAdapter` folder
      (`ttm_jax/weights/unet.py`) -> `DIR/params` + `DIR/ttm_convert.json` (`backbone: "unet"`). Without --stage the
      backbone as it is (diffusers -> orbax -> torch is bit-identical); with --stage the stage init checkpoint: the
      input conv widened to the stage's channels (the new ones zero), stage 2 with TTM's layers (zero output) in
      every encoder spatial transformer (SD 1.5: 6), or as --config says (its model.unet must match the folder's).
  --from=orbax:DIR | workdir:DIR[@STEP] --to=torch:PATH exports a U-Net stage as `UNetMotionModel` folder (the
      backbone, `in_channels` the stage's) + `ttm_layers.safetensors` + `ttm_config.json`; --from=torch:PATH back.

A destination that already holds something is refused before any source is read: a non-empty `torch:` folder, an
existing Orbax params checkpoint; `--overwrite` replaces what is there (the export's files; the whole params folder).

Subcommands for the single pieces:

  python -m ttm_jax.convert dit --src <Wan2.1-T2V-1.3B-Diffusers>/transformer --out <dir> \\
      [--config configs/stage2.py:wan1.3b | --in_channels 48 --ttm_layers 8] [--scan_layers true] [--seed 0]
      diffusers WanTransformer3DModel -> Orbax params checkpoint `<dir>/params` for `config.train.init_from`:
      the backbone streamed through the rulebook (ttm_jax/weights/dit.py), then grafted into the stage model
      (new input channels zero, TTM layers freshly initialised with zero output), plus `<dir>/ttm_convert.json`.
  python -m ttm_jax.convert dit-export --src <dir>/params --out <folder> --like <transformer folder>
      a backbone (ttm_layers=0, the source's in_channels) Orbax params checkpoint -> diffusers folder.
  python -m ttm_jax.convert vae --src <Wan2.1-T2V-1.3B-Diffusers>/vae [--out <folder>]
      checks a Wan VAE folder converts (every key, every shape) and, with --out, writes it back (bit-identical).

The Wan VAE needs no conversion step at run time: `config.autoencoder.path` is the diffusers folder itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import registry
from ttm_jax.convert import export
from ttm_jax.models import dit as dit_lib
from ttm_jax.models import unet as unet_lib
from ttm_jax.models import wan_vae
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.weights import dit as dit_convert
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import unet as unet_convert
from ttm_jax.weights import wan_vae as vae_convert

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "": ""}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not true/false")


def _load_config(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARG]` -> `FILE`'s `get_config(ARG)` (e.g. configs/stage2.py:wan1.3b)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("ttm_convert_config", path)
    if module_spec is None or module_spec.loader is None:
        raise cli.BadInput(f"--config {spec}: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def check_destination(kind: str, path: str, overwrite: bool) -> None:
    """Refuse (`SystemExit` naming the fix) a destination that holds something unless `overwrite`: a `torch` folder
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


# ------------------------------------------------------------------------------------------------------ subcommands


def _dit(args: argparse.Namespace) -> None:
    overwrite = getattr(args, "overwrite", False)
    check_destination("orbax", os.path.join(args.out, "params"), overwrite)
    t0 = time.perf_counter()
    backbone_cfg, cin, cout, backbone = dit_convert.load_diffusers_folder(args.src, scan_layers=args.scan_layers)
    print(f"read {args.src}: dim {backbone_cfg.dim}, {backbone_cfg.num_layers} layers, in/out channels {cin}/{cout} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    if args.config:
        config = _load_config(args.config)
        config_lib.validate(config)
        stage_cfg = dit_lib.DiTConfig.from_config(config.model)
        in_channels = config_lib.in_channels(config)
        for f in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim", "patch_size", "eps"):
            if getattr(stage_cfg, f) != getattr(backbone_cfg, f):
                raise cli.BadInput(f"{args.config}: config.model.{f}={getattr(stage_cfg, f)} but {args.src}/"
                                   f"config.json has {getattr(backbone_cfg, f)}; set "
                                   f"config.model.{f}={getattr(backbone_cfg, f)}")
        stage_cfg = dataclasses.replace(stage_cfg, scan_layers=args.scan_layers)
    else:
        stage_cfg = dataclasses.replace(backbone_cfg, ttm_layers=args.ttm_layers)
        in_channels = args.in_channels or cin
    if in_channels < cin:
        raise cli.BadInput(f"--in_channels {in_channels} is below the checkpoint's {cin}")
    params = backbone
    if stage_cfg.ttm_layers or in_channels != cin:
        model = dit_lib.DiT(stage_cfg, in_channels, cout)
        iargs, ikw = dit_lib.init_inputs(stage_cfg, in_channels)
        fresh = jax.jit(lambda r: nn.unbox(model.init(r, *iargs, **ikw)["params"]))(jax.random.key(args.seed))
        params = dit_lib.graft_backbone(fresh, backbone, ttm_layers=stage_cfg.ttm_layers,
                                        scan_layers=stage_cfg.scan_layers)
        del fresh
    dtype = getattr(args, "dtype", "")
    if dtype:  # storage dtype of the checkpoint (training keeps fp32 master weights: config.model.param_dtype)
        params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    if overwrite:
        _clear_orbax(os.path.join(args.out, "params"))
    target = dit_convert.save_converted(os.path.join(args.out, "params"), params, stage_cfg, in_channels, cout,
                                        args.src)
    print(f"wrote {target} (set config.train.init_from to it) in {time.perf_counter() - t0:.1f}s", flush=True)


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


def _unet(args: argparse.Namespace) -> None:
    """diffusers U-Net folder(s) -> Orbax params (the backbone, or with `stage` the stage's init checkpoint)."""
    overwrite = getattr(args, "overwrite", False)
    target = os.path.join(args.out, "params")
    check_destination("orbax", target, overwrite)
    t0 = time.perf_counter()
    paths = _unet_paths(args.src)
    backbone_cfg, cin, cout, backbone = unet_convert.load_diffusers_folders(*paths)
    print(f"read {' + '.join(paths)}: levels {backbone_cfg.block_out_channels}, in/out channels {cin}/{cout} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    stage_cfg, in_channels = backbone_cfg, cin
    if args.config:
        config = _load_config(args.config)
        config_lib.validate(config)
        if registry.backbone_name(config) != "unet":
            raise cli.BadInput(f"{args.config}: config.model.backbone={registry.backbone_name(config)!r}; a U-Net "
                             f"source needs a backbone='unet' config (e.g. configs/stage2.py:animatediff)")
        if args.stage is not None and int(config.stage) != args.stage:
            raise cli.BadInput(f"--stage={args.stage} but {args.config} is a stage-{config.stage} config")
        stage_cfg = registry.unet_config(config)
        for f in _UNET_ARCH:
            if getattr(stage_cfg, f) != getattr(backbone_cfg, f):
                raise cli.BadInput(f"{args.config}: config.model.unet.{f}={getattr(stage_cfg, f)!r} but {paths[0]} has "
                                 f"{getattr(backbone_cfg, f)!r}; set config.model.unet.{f} to it")
        in_channels = config_lib.in_channels(config)
        if int(config.autoencoder.latent_channels) != cout:
            raise cli.BadInput(f"{args.config}: autoencoder.latent_channels={config.autoencoder.latent_channels} but "
                             f"the U-Net predicts {cout} channels")
    elif args.stage is not None:
        in_channels = 3 * cin  # noisy latent + the stage's two conditions
        stage_cfg = dataclasses.replace(backbone_cfg, ttm_layers=0 if args.stage == 1
                                        else backbone_cfg.num_encoder_transformers)  # the paper: all 6 of SD 1.5
    params = backbone
    if stage_cfg.ttm_layers or in_channels != cin:
        model = unet_lib.UNet(stage_cfg, in_channels, cout)
        iargs, ikw = unet_lib.init_inputs(stage_cfg, in_channels)
        fresh = jax.jit(lambda r: nn.unbox(model.init(r, *iargs, **ikw)["params"]))(jax.random.key(args.seed))
        params = unet_lib.graft_backbone(fresh, backbone)
        del fresh
    dtype = getattr(args, "dtype", "")
    if dtype:
        params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    else:
        params = jax.tree.map(np.asarray, params)
    if overwrite:
        _clear_orbax(target)
    target = dit_convert.save_converted(target, params, stage_cfg, in_channels, cout, paths[0], backbone="unet")
    print(f"wrote {target} (set config.train.init_from to it) in {time.perf_counter() - t0:.1f}s", flush=True)


def _dit_export(args: argparse.Namespace) -> None:
    cfg, cin, cout = dit_convert.read_config(args.like, scan_layers=args.scan_layers)
    abstract = dit_convert.template(cfg, cin, cout)
    params = checkpoint_lib.restore_tree(args.src, abstract, field="--src",
                                         fix="it must be an Orbax params checkpoint of the model --like describes")
    file = dit_convert.save_diffusers_folder(params, cfg, cin, cout, args.out)
    print(f"wrote {file}")


def _vae(args: argparse.Namespace) -> None:
    cfg = wan_vae.read_config(args.src)
    params = vae_convert.load_diffusers_folder(args.src, cfg)
    n = sum(x.size for x in rb.flatten(params).values())
    print(f"{args.src}: {n / 1e6:.1f}M parameters, time factor {cfg.time_factor}, space factor {cfg.space_factor}, "
          f"z_dim {cfg.z_dim}: every tensor mapped")
    if args.out:
        print(f"wrote {vae_convert.save_diffusers_folder(params, cfg, args.out)}")


# ----------------------------------------------------------------------------------------------------------- export


def _split(spec: str, flag: str, kinds: Sequence[str]) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise cli.BadInput(f"{flag}={spec!r}: expected one of {[k + ':PATH' for k in kinds]} "
                         f"(e.g. --from=workdir:/runs/stage2 --to=torch:/out/stage2_transformer)")
    return kind, path


def _orbax_dims(path: str, config_spec: str) -> tuple[Any, int, int, int, int | None, str | None, bool | None]:
    """(DiTConfig, in, out, latent channels, stage, condition_frames, self_condition) of an Orbax params checkpoint:
    `--config` file, else the `ttm_convert.json` beside it (which says neither of the last two: None)."""
    if config_spec:
        config = _load_config(config_spec)
        return (*export.stage_dims(config), inputs_lib.condition_frames(config), config_lib.self_condition(config))
    meta_file = dit_convert.converted_meta_file(path)
    if not os.path.exists(meta_file):
        raise cli.BadInput(f"--from=orbax:{path}: no {meta_file} beside it; pass --config=configs/stage2.py:VARIANT "
                         f"naming the model it holds")
    cfg, cin, cout = export.converted_dims(path)
    return cfg, cin, cout, cout, None, None, None


def export_main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """`export --from=workdir:DIR[@STEP] | orbax:DIR [--config=FILE:ARG] --to=torch:FOLDER [--params=ema|raw]
    [--dtype=float32|bfloat16]`, or the import direction `--from=torch:FOLDER --to=orbax:DIR [--scan_layers=true]`
    (`ttm_jax/convert/export.py`). Returns {name: written path}."""
    ap = cli.ArgumentParser(prog="python -m ttm_jax.convert export", description=export.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="workdir:DIR[@STEP] | orbax:DIR | torch:FOLDER")
    ap.add_argument("--to", dest="dst", required=True, help="torch:FOLDER | orbax:DIR")
    ap.add_argument("--config", default="", help="for orbax: sources without ttm_convert.json beside them")
    ap.add_argument("--params", choices=("ema", "raw"), default="ema", help="workdir: EMA params when kept")
    ap.add_argument("--dtype", default="", help="cast the exported tensors (default: as trained)")
    ap.add_argument("--scan_layers", default="true", choices=("true", "false"), help="torch -> orbax layout")
    ap.add_argument("--overwrite", action="store_true", help="replace what the destination holds")
    args = ap.parse_args(argv)
    src_kind, src = _split(args.src, "--from", ("workdir", "orbax", "torch"))
    dst_kind, dst = _split(args.dst, "--to", ("torch", "orbax"))
    if (src_kind == "torch") == (dst_kind == "torch"):
        raise cli.BadInput(f"--from={args.src} --to={args.dst}: one side must be torch:FOLDER")
    check_destination(dst_kind, dst, args.overwrite)

    if src_kind == "torch":
        cfg, cin, cout, params = export.import_folder(src, scan_layers=args.scan_layers == "true")
        if args.overwrite:
            _clear_orbax(dst)
        target = dit_convert.save_converted(dst, params, cfg, cin, cout, src, backbone=export.backbone_of(cfg))
        print(f"wrote {target}")
        return {"params": target}

    params: Any
    if src_kind == "workdir":
        workdir, _, step = src.partition("@")
        config, params, at = export.load_workdir(workdir, step=int(step) if step else None, ema=args.params == "ema")
        cfg, cin, cout, lat, stage = export.stage_dims(config)
        frames: str | None = inputs_lib.condition_frames(config)
        self_cond: bool | None = config_lib.self_condition(config)
        print(f"read {workdir} step {at} ({args.params} params), stage {stage}")
    else:
        cfg, cin, cout, lat, stage, frames, self_cond = _orbax_dims(src, args.config)
        params = export.load_orbax_params(src, cfg, cin, cout)
    paths = export.export_params(params, cfg, cin, cout, dst, latent_channels=lat, stage=stage,
                                 dtype=args.dtype or None, condition_frames=frames, self_condition=self_cond)
    print("wrote " + ", ".join(sorted(paths.values())))
    return paths


# ----------------------------------------------------------------------------------------------------- --from / --to


def _from_to(argv: list[str]) -> None:
    """`--from=KIND:PATH --to=KIND:PATH`: dispatch to the converters (see the module docstring)."""
    ap = cli.ArgumentParser(prog="python -m ttm_jax.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True,
                    help="diffusers:PATH | diffusers-unet:PATH[,motion_adapter:PATH] | torch:PATH | orbax:DIR | "
                         "workdir:DIR")
    ap.add_argument("--to", dest="dst", required=True, help="orbax:DIR | torch:PATH")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=None, help="graft into a stage model")
    ap.add_argument("--config", default="", help="the stage model's config (configs/stage2.py:wan1.3b)")
    ap.add_argument("--dtype", default="", help="bf16 | fp32 (default: as stored)")
    ap.add_argument("--scan_layers", type=_bool, default=True)
    ap.add_argument("--seed", type=int, default=0, help="init of the TTM layers (--stage=2)")
    ap.add_argument("--params", choices=("ema", "raw"), default="ema", help="workdir sources: EMA params when kept")
    ap.add_argument("--overwrite", action="store_true", help="replace what the destination holds (refused without)")
    a = ap.parse_args(argv)
    if a.dtype not in _DTYPES:
        raise cli.BadInput(f"--dtype={a.dtype}: choose bf16 or fp32")
    dtype = _DTYPES[a.dtype]
    src_kind, _, src = a.src.partition(":")
    dst_kind, _, dst = a.dst.partition(":")
    if not src or not dst:
        raise cli.BadInput(f"--from={a.src} --to={a.dst}: both need KIND:PATH (e.g. "
                           f"--from=diffusers:/ckpt/transformer)")
    if dst_kind == "orbax":
        check_destination("orbax", os.path.join(dst, "params"), a.overwrite)
    elif dst_kind in ("torch", "diffusers"):
        check_destination("torch", dst, a.overwrite)
    if src_kind == "diffusers-unet" and dst_kind == "orbax":
        _unet(argparse.Namespace(src=src, out=dst, config=a.config, stage=a.stage, seed=a.seed, dtype=dtype,
                                 overwrite=a.overwrite))
        return
    if src_kind in ("diffusers", "torch") and dst_kind == "orbax":
        if os.path.exists(os.path.join(src, export.TTM_CONFIG_FILE)):  # an exported TTM folder
            export_main([f"--from=torch:{src}", f"--to=orbax:{os.path.join(dst, 'params')}",
                         f"--scan_layers={str(a.scan_layers).lower()}", *(["--overwrite"] if a.overwrite else [])])
            return
        if a.stage is None and a.config:
            raise cli.BadInput("--config needs --stage: without it the backbone is converted as it is")
        ns = argparse.Namespace(src=src, out=dst, config=a.config, in_channels=0, ttm_layers=0,
                                scan_layers=a.scan_layers, seed=a.seed, dtype=dtype, overwrite=a.overwrite)
        if a.stage is not None and not a.config:
            cfg, cin, _ = dit_convert.read_config(src, scan_layers=a.scan_layers)
            ns.in_channels = 3 * cin
            ns.ttm_layers = 0 if a.stage == 1 else math.ceil(cfg.num_layers / 4)  # the paper: 10 of 40 blocks
        _dit(ns)
        return
    if src_kind in ("orbax", "workdir") and dst_kind in ("torch", "diffusers"):
        if src_kind == "orbax" and os.path.isdir(os.path.join(src, "params")):
            src = os.path.join(src, "params")
        args = [f"--from={src_kind}:{src}", f"--to=torch:{dst}", f"--params={a.params}"]
        if a.config:
            args.append(f"--config={a.config}")
        if dtype:
            args.append(f"--dtype={dtype}")
        if a.overwrite:
            args.append("--overwrite")
        export_main(args)
        return
    raise cli.BadInput(f"--from={a.src} --to={a.dst}: supported: diffusers:PATH | diffusers-unet:PATH[,motion_adapter:"
                     f"PATH] -> orbax:DIR, orbax:DIR | workdir:DIR -> torch:PATH, torch:PATH -> orbax:DIR")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (module docstring): `--from/--to`, or the subcommands `dit`, `dit-export`, `vae`, `export`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(x.startswith("--from") for x in argv) and (not argv or argv[0] != "export"):
        _from_to(argv)
        return
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    ap = cli.ArgumentParser(prog="python -m ttm_jax.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dit", help="diffusers WanTransformer3DModel -> Orbax params for config.train.init_from")
    d.add_argument("--src", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--config", default="", help="configs/stage2.py:wan1.3b: the stage model to graft into")
    d.add_argument("--in_channels", type=int, default=0, help="without --config: input channels (0: checkpoint's)")
    d.add_argument("--ttm_layers", type=int, default=0, help="without --config: TTM blocks")
    d.add_argument("--scan_layers", type=_bool, default=True)
    d.add_argument("--seed", type=int, default=0, help="init of the TTM layers")
    d.add_argument("--overwrite", action="store_true", help="replace an existing <out>/params")
    d.set_defaults(fn=_dit)
    e = sub.add_parser("dit-export", help="backbone Orbax params -> diffusers folder")
    e.add_argument("--src", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--like", required=True, help="the diffusers transformer folder whose config.json to use")
    e.add_argument("--scan_layers", type=_bool, default=True)
    e.set_defaults(fn=_dit_export)
    v = sub.add_parser("vae", help="check (and optionally write back) a Wan VAE folder")
    v.add_argument("--src", required=True)
    v.add_argument("--out", default="")
    v.set_defaults(fn=_vae)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    cli.guarded(main)()
