"""diffusers `AutoencoderKLWan` (Wan 2.1) <-> `ttm_jax.backbones.wan.vae.WanVAE` parameters: one reversible rulebook.

    params = load_diffusers_folder("<Wan2.1-T2V-1.3B-Diffusers>/vae")            # torch -> Flax, streamed
    save_diffusers_folder(params, cfg, "out/vae")                                 # Flax -> torch, streamed
    ae = make_wan_autoencoder(config.autoencoder)                                 # the project's autoencoder

Every torch key is mapped (no `Ignore`s: the VAE has no buffers), every Flax param produced, every shape checked
before any data moves (`rulebook.RuleBook.plan`). Reading goes tensor by tensor with `pread` (no memory map, so the
peak resident memory is the Flax params plus one tensor: `safetensors_io.PreadReader`); writing streams a
safetensors file tensor by tensor from the Flax params. `bench/convert.py` measures both.

`make_wan_autoencoder(config.autoencoder)` is the `autoencoder.name="wan"` entry point: the `WanAutoencoder` of
`ttm_jax.backbones.wan.vae` with the weights of the diffusers folder `config.autoencoder.path`, converted on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ttm_jax.backbones.wan import vae as wan_vae
from ttm_jax.models import autoencoder
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class TrailingOnes(rb.Transform):
    """torch `[C, 1, ..., 1]` (`ones` trailing singleton axes) <-> Flax `[C]`: `WanRMS_norm.gamma`."""

    ones: int

    def flax_shape(self, torch_shape):
        if len(torch_shape) != 1 + self.ones or any(d != 1 for d in torch_shape[1:]):
            raise ValueError(f"TrailingOnes({self.ones}) needs a torch shape [C{', 1' * self.ones}], got "
                             f"{tuple(torch_shape)}")
        return (torch_shape[0],)

    def torch_shape(self, flax_shape):
        if len(flax_shape) != 1:
            raise ValueError(f"TrailingOnes({self.ones}) needs a 1-d Flax param, got {tuple(flax_shape)}")
        return (flax_shape[0],) + (1,) * self.ones

    def to_flax(self, x):
        return x.reshape(self.flax_shape(x.shape))

    def to_torch(self, x):
        return x.reshape(self.torch_shape(x.shape))


GAMMA_3D = TrailingOnes(3)  # residual-block norms: gamma [C, 1, 1, 1]
GAMMA_2D = TrailingOnes(2)  # attention norms (images=True): gamma [C, 1, 1]


def _conv(t: str, f: str, transform: rb.Transform) -> list[rb.Rule]:
    return [rb.Rule(f"{t}.weight", f"{f}/kernel", transform), rb.Rule(f"{t}.bias", f"{f}/bias")]


def _residual(t: str, f: str) -> list[rb.Rule]:
    rules = [rb.Rule(f"{t}.norm1.gamma", f"{f}/norm1/gamma", GAMMA_3D),
             rb.Rule(f"{t}.norm2.gamma", f"{f}/norm2/gamma", GAMMA_3D)]
    for name in ("conv1", "conv2", "conv_shortcut"):
        rules += _conv(f"{t}.{name}", f"{f}/{name}", rb.CONV3D)
    return rules


def _attention(t: str, f: str) -> list[rb.Rule]:
    return ([rb.Rule(f"{t}.norm.gamma", f"{f}/norm/gamma", GAMMA_2D)] + _conv(f"{t}.to_qkv", f"{f}/to_qkv", rb.CONV2D)
            + _conv(f"{t}.proj", f"{f}/proj", rb.CONV2D))


def _resample(t: str, f: str) -> list[rb.Rule]:
    # torch keeps the spatial conv at index 1 of an nn.Sequential (after the upsample / zero-pad op)
    return _conv(f"{t}.resample.1", f"{f}/resample", rb.CONV2D) + _conv(f"{t}.time_conv", f"{f}/time_conv", rb.CONV3D)


def _rules() -> list[rb.Rule]:
    rules: list[rb.Rule] = []
    for part in ("encoder", "decoder"):
        rules += _conv(f"{part}.conv_in", f"{part}/conv_in", rb.CONV3D)
        rules += _conv(f"{part}.conv_out", f"{part}/conv_out", rb.CONV3D)
        rules.append(rb.Rule(f"{part}.norm_out.gamma", f"{part}/norm_out/gamma", GAMMA_3D))
        rules += _residual(f"{part}.mid_block.resnets.{{j}}", f"{part}/mid_block/resnets_{{j}}")
        rules += _attention(f"{part}.mid_block.attentions.{{j}}", f"{part}/mid_block/attentions_{{j}}")
    # encoder.down_blocks is one flat list of residual blocks and resamplers
    rules += _residual("encoder.down_blocks.{i}", "encoder/down_blocks_{i}")
    rules += _resample("encoder.down_blocks.{i}", "encoder/down_blocks_{i}")
    rules += _residual("decoder.up_blocks.{i}.resnets.{j}", "decoder/up_blocks_{i}_resnets_{j}")
    rules += _resample("decoder.up_blocks.{i}.upsamplers.0", "decoder/up_blocks_{i}_upsamplers_0")
    rules += _conv("quant_conv", "quant_conv", rb.CONV3D)
    rules += _conv("post_quant_conv", "post_quant_conv", rb.CONV3D)
    return rules


RULES = rb.RuleBook("wan_vae", _rules())


def template(cfg: wan_vae.WanVAEConfig) -> Any:
    """The Flax parameter tree of `cfg` as shapes (`jax.ShapeDtypeStruct`), float32."""
    return wan_vae.param_shapes(wan_vae.WanVAE(cfg))


def torch_to_flax(tensors: Mapping[str, Any], cfg: wan_vae.WanVAEConfig) -> dict[str, Any]:
    """{torch key: array or tensor} (e.g. `AutoencoderKLWan.state_dict()`) -> nested Flax params (numpy float32)."""
    arrays = {k: rb.as_numpy(v) for k, v in tensors.items()}
    return RULES.to_flax(arrays, template(cfg))


def flax_to_torch(params: Mapping[str, Any], torch_specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Nested Flax params -> {torch key: numpy array} (load with `torch.from_numpy` / `load_state_dict`)."""
    return RULES.to_torch(params, torch_specs)


def load_diffusers_folder(path: str, cfg: wan_vae.WanVAEConfig | None = None) -> dict[str, Any]:
    """Flax params (numpy float32) from a diffusers VAE folder or a `.safetensors` file, streamed tensor by tensor."""
    cfg = cfg or wan_vae.read_config(path)
    reader = safetensors_io.PreadReader(path)
    try:
        return rb.stream_to_flax(RULES, reader, template(cfg))
    except rb.ConversionError as e:
        raise rb.ConversionError(f"{path}: the checkpoint does not match config.json's architecture "
                                 f"({cfg}):\n{e}") from e


def diffusers_config(cfg: wan_vae.WanVAEConfig) -> dict[str, Any]:
    """The `AutoencoderKLWan` config.json dict of `cfg` (what `AutoencoderKLWan(**config)` takes)."""
    out = {"_class_name": "AutoencoderKLWan", "base_dim": cfg.base_dim, "z_dim": cfg.z_dim,
           "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks, "attn_scales": [],
           "temperal_downsample": list(cfg.temperal_downsample), "dropout": 0.0, "is_residual": False,
           "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "patch_size": None,
           "scale_factor_temporal": cfg.time_factor, "scale_factor_spatial": cfg.space_factor}
    if cfg.latents_mean is not None:
        out["latents_mean"] = list(cfg.latents_mean)
    if cfg.latents_std is not None:
        out["latents_std"] = list(cfg.latents_std)
    return out


def torch_specs(params: Mapping[str, Any], dtype: Any = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{torch key: (shape, dtype)} that `flax_to_torch(params)` produces, from shapes alone (no data moves)."""
    flat = rb.flatten(params)
    moves = RULES.plan(flat, None, "flax -> torch")
    out = {}
    for mv in moves:
        leaf = flat[mv.flax_path]
        out[mv.torch_key] = (mv.torch_shape, rb.as_dtype(dtype if dtype is not None else leaf.dtype))
    return out


def save_diffusers_folder(params: Mapping[str, Any], cfg: wan_vae.WanVAEConfig, out_dir: str,
                          dtype: Any = None) -> str:
    """Writes `out_dir/config.json` and `out_dir/diffusion_pytorch_model.safetensors` (loadable by
    `AutoencoderKLWan.from_pretrained`), one tensor in memory at a time. Returns the weights path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, autoencoder.CONFIG_FILE), "w") as f:
        json.dump(diffusers_config(cfg), f, indent=2)
    specs = torch_specs(params, dtype)
    file = os.path.join(out_dir, WEIGHTS_FILE)
    safetensors_io.write_safetensors(file, specs, iter_torch(params), metadata={"format": "pt"})
    return file


def iter_torch(params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, numpy array) one tensor at a time from Flax params (numpy or jax arrays)."""
    return RULES.iter_torch(params)



def load_params(path: str, cfg: wan_vae.WanVAEConfig | None = None) -> tuple[wan_vae.WanVAEConfig, Any]:
    """(config, params) from a diffusers `AutoencoderKLWan` folder; every tensor mapped and shape-checked."""
    cfg = cfg or wan_vae.read_config(path)
    return cfg, load_diffusers_folder(path, cfg)


def make_wan_autoencoder(config: Any) -> wan_vae.WanAutoencoder:
    """The autoencoder of `config.autoencoder` (name "wan"): weights from `config.autoencoder.path`.

    Reads `path` (diffusers folder), `dtype` (compute dtype, default float32), `chunk_frames` (latent frames per
    chunk, default 1), and checks `latent_channels`, `time_factor`, `space_factor` against the folder's config.json.
    `encode` maps video `[B, T, H, W, 3]` to normalised latents `[B, 1 + (T-1)/4, H/8, W/8, z_dim]`.
    """
    return wan_vae.WanAutoencoder.load(config, load_params)
