"""diffusers `AutoencoderKL` (Stable Diffusion's VAE) <-> `ttm_jax.backbones.animatediff.vae.SDVAE` parameters: one
rulebook.

    cfg, params = load_params("<stable-diffusion-v1-5>/vae")          # torch -> Flax, streamed tensor by tensor
    state_dict = flax_to_torch(params)                                # and back: {torch key: numpy array}
    ae = make_sd_autoencoder(config.autoencoder)                      # the project's autoencoder ("sd")

Every torch key is mapped and every Flax param produced, shapes checked before any data moves
(`rulebook.RuleBook.plan`); a missing, unexpected or mis-shaped tensor raises `rulebook.ConversionError` naming the
weights file and every offending key. The mid-block attention is read under either of diffusers' names: `to_q`,
`to_k`, `to_v`, `to_out.0` (current saves) or `query`, `key`, `value`, `proj_attn` (older saves such as the original
SD 1.5 `vae/` files, which diffusers renames on load); both hold `[C, C]` Linear weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ttm_jax import cli
from ttm_jax.backbones.animatediff import vae as sd_vae
from ttm_jax.models import autoencoder
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
ATTENTION_NAMES = {"current": ("to_q", "to_k", "to_v", "to_out.0"), "legacy": ("query", "key", "value", "proj_attn")}


def _conv(t: str, f: str) -> list[rb.Rule]:
    return [rb.Rule(f"{t}.weight", f"{f}/kernel", rb.CONV2D), rb.Rule(f"{t}.bias", f"{f}/bias")]


def _norm(t: str, f: str) -> list[rb.Rule]:
    return [rb.Rule(f"{t}.weight", f"{f}/scale"), rb.Rule(f"{t}.bias", f"{f}/bias")]


def _resnet(t: str, f: str) -> list[rb.Rule]:
    return (_norm(f"{t}.norm1", f"{f}/norm1") + _conv(f"{t}.conv1", f"{f}/conv1") + _norm(f"{t}.norm2", f"{f}/norm2")
            + _conv(f"{t}.conv2", f"{f}/conv2") + _conv(f"{t}.conv_shortcut", f"{f}/conv_shortcut"))


def _attention(t: str, f: str, names: tuple[str, ...]) -> list[rb.Rule]:
    rules = _norm(f"{t}.group_norm", f"{f}/group_norm")
    for torch_name, flax_name in zip(names, ("to_q", "to_k", "to_v", "to_out_0"), strict=True):
        rules += [rb.Rule(f"{t}.{torch_name}.weight", f"{f}/{flax_name}/kernel", rb.LINEAR),
                  rb.Rule(f"{t}.{torch_name}.bias", f"{f}/{flax_name}/bias")]
    return rules


def rulebook(attention: str = "current") -> rb.RuleBook:
    """The rules; `attention`: "current" (`to_q` ...) or "legacy" (`query` ...) torch names of the mid attention."""
    names = ATTENTION_NAMES[attention]
    rules: list[rb.Rule] = []
    for part in ("encoder", "decoder"):
        rules += _conv(f"{part}.conv_in", f"{part}/conv_in") + _conv(f"{part}.conv_out", f"{part}/conv_out")
        rules += _norm(f"{part}.conv_norm_out", f"{part}/conv_norm_out")
        rules += _resnet(f"{part}.mid_block.resnets.{{j}}", f"{part}/mid_block/resnets_{{j}}")
        rules += _attention(f"{part}.mid_block.attentions.0", f"{part}/mid_block/attentions_0", names)
    rules += _resnet("encoder.down_blocks.{i}.resnets.{j}", "encoder/down_blocks_{i}_resnets_{j}")
    rules += _conv("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder/down_blocks_{i}_downsamplers_0/conv")
    rules += _resnet("decoder.up_blocks.{i}.resnets.{j}", "decoder/up_blocks_{i}_resnets_{j}")
    rules += _conv("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder/up_blocks_{i}_upsamplers_0/conv")
    rules += _conv("quant_conv", "quant_conv") + _conv("post_quant_conv", "post_quant_conv")
    return rb.RuleBook("sd_vae" if attention == "current" else "sd_vae(legacy attention names)", rules)


RULES = rulebook()


def attention_naming(keys: Any) -> str:
    """"legacy" when the torch `keys` name the mid attention `query` / `key` / `value` / `proj_attn`, else
    "current"."""
    return "legacy" if any(k.endswith("attentions.0.query.weight") for k in keys) else "current"


def template(cfg: sd_vae.SDVAEConfig) -> Any:
    """The Flax parameter tree of `cfg` as shapes (`jax.ShapeDtypeStruct`), float32."""
    return sd_vae.param_shapes(sd_vae.SDVAE(cfg))


def torch_to_flax(tensors: Mapping[str, Any], cfg: sd_vae.SDVAEConfig) -> dict[str, Any]:
    """{torch key: array or tensor} (e.g. `AutoencoderKL.state_dict()`) -> nested Flax params (numpy float32)."""
    arrays = {k: rb.as_numpy(v) for k, v in tensors.items()}
    return rulebook(attention_naming(arrays)).to_flax(arrays, template(cfg))


def flax_to_torch(params: Mapping[str, Any], torch_specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Nested Flax params -> {torch key: numpy array} in diffusers' current names (`load_state_dict`-ready)."""
    return RULES.to_torch(params, torch_specs)


def weights_file(path: str) -> str:
    """`<path>/diffusion_pytorch_model.safetensors` (or `path` itself when it is a `.safetensors` file)."""
    if path.endswith(".safetensors"):
        return path
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))) if os.path.isdir(path) \
            else []
        raise cli.MissingInput(f"{file}: not found (the folder holds {found}); config.autoencoder.path must be a "
                                f"diffusers AutoencoderKL folder with {WEIGHTS_FILE} (float32 or float16; re-save a "
                                f".bin checkpoint with AutoencoderKL.save_pretrained(..., safe_serialization=True))")
    return file


def load_diffusers_folder(path: str, cfg: sd_vae.SDVAEConfig | None = None) -> dict[str, Any]:
    """Flax params (numpy float32) from a diffusers `AutoencoderKL` folder, streamed tensor by tensor."""
    cfg = cfg or sd_vae.read_config(path)
    file = weights_file(path)
    reader = safetensors_io.PreadReader(file)
    try:
        return rb.stream_to_flax(rulebook(attention_naming(reader.specs)), reader, template(cfg))
    except rb.ConversionError as e:
        config_file = os.path.join(path, autoencoder.CONFIG_FILE)
        raise rb.ConversionError(f"{file}: does not match the architecture of {config_file} "
                                 f"({cfg}); point config.autoencoder.path at a complete AutoencoderKL folder whose "
                                 f"config.json describes its weights:\n{e}") from e


def load_params(path: str, cfg: sd_vae.SDVAEConfig | None = None) -> tuple[sd_vae.SDVAEConfig, Any]:
    """(config, params) from a diffusers `AutoencoderKL` folder; every tensor mapped and shape-checked."""
    cfg = cfg or sd_vae.read_config(path)
    return cfg, load_diffusers_folder(path, cfg)


def make_sd_autoencoder(config: Any) -> sd_vae.SDAutoencoder:
    """The autoencoder of `config.autoencoder` (name "sd"): SD's `AutoencoderKL`, weights from
    `config.autoencoder.path`.

    Reads `path` (diffusers folder), `dtype` (compute dtype, default float32), `chunk_frames` (frames encoded or
    decoded per step, default 1; 0: all at once), and checks `latent_channels`, `time_factor` (1) and `space_factor`
    against the folder's config.json. `encode` maps video `[B, T, H, W, 3]` to scaled latents `[B, T, H/8, W/8, 4]`.
    """
    return sd_vae.SDAutoencoder.load(config, load_params)
