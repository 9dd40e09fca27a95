"""SD's AutoencoderKL: parity with diffusers' `AutoencoderKL` (the oracle), the folder loader and its errors, and the
registered `autoencoder.name="sd"` entry.

One tiny random torch VAE with SD's layout at 4 levels (so 8x space, as SD 1.5): block_out_channels (8, 16, 16, 16)
(a shortcut conv where the width changes in both directions), 1 layer per block, 4 groups, latent 4; random norm
gains and biases (ones/zeros would hide a misplaced tensor); a 2-frame non-square 16x24 video (latent 2x3, so a
swapped H/W shows).
"""

from __future__ import annotations

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file, save_file

from ttm_jax import config as config_lib
from ttm_jax.assembly import registry
from ttm_jax.backbones.animatediff import vae as sd_vae
from ttm_jax.backbones.animatediff import vae_weights as convert
from ttm_jax.weights import rulebook as rb

TORCH_CONFIG = dict(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                    sample_size=16)
B, T, H, W = 1, 2, 16, 24
TOL = 1e-5


@pytest.fixture(scope="module")
def torch_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**TORCH_CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def folder(torch_vae, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sd_vae") / "vae")
    torch_vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def ae_config(folder) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="sd", path=folder, latent_channels=4, time_factor=1, space_factor=8,
                                          dtype="float32", chunk_frames=1))


@pytest.fixture(scope="module")
def ae(ae_config) -> sd_vae.SDAutoencoder:
    return registry.make_autoencoder(ae_config)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (B, T, H, W, 3)).astype(np.float32)


def _frames(x: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, C] -> torch [B*T, C, H, W]."""
    return torch.from_numpy(x.reshape(-1, *x.shape[2:])).permute(0, 3, 1, 2)


def _video(y: torch.Tensor) -> np.ndarray:
    """torch [B*T, C, H, W] -> [B, T, H, W, C]."""
    y = y.permute(0, 2, 3, 1).numpy()
    return y.reshape(B, T, *y.shape[1:])


def test_config_and_interface(ae, folder):
    cfg = sd_vae.read_config(folder)
    assert cfg.block_out_channels == (8, 16, 16, 16) and cfg.scaling_factor == pytest.approx(0.18215)
    assert (ae.time_factor, ae.space_factor, ae.latent_channels) == (1, 8, 4)


def test_encode_matches_diffusers_posterior_mean_times_scaling_factor(ae, torch_vae, video):
    got = np.asarray(ae.encode(jnp.asarray(video)))
    with torch.no_grad():
        mean = _video(torch_vae.encode(_frames(video)).latent_dist.mean)
    want = mean * torch_vae.config.scaling_factor
    assert got.shape == (B, T, H // 8, W // 8, 4) and got.dtype == np.float32
    print(f"max abs diff: encode {np.abs(got - want).max():.2e} (latent scale {np.abs(want).max():.2f})")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the raw function in one pass (`ae` runs frame by frame) gives the unscaled mean
    encode = jax.jit(functools.partial(sd_vae.encode, sd_vae.SDVAE(ae.cfg), chunk=0))
    np.testing.assert_allclose(np.asarray(encode(ae.params, jnp.asarray(video))), mean, atol=TOL, rtol=0)


def test_decode_matches_diffusers(ae, torch_vae):
    z = np.random.default_rng(1).normal(size=(B, T, H // 8, W // 8, 4)).astype(np.float32)
    with torch.no_grad():
        raw = _video(torch_vae.decode(_frames(z) / torch_vae.config.scaling_factor).sample)
    got = np.asarray(ae.decode(jnp.asarray(z)))
    assert got.shape == (B, T, H, W, 3)
    np.testing.assert_allclose(got, np.clip(raw, -1.0, 1.0), atol=TOL, rtol=0)
    # unclamped (so the clamp cannot hide a wrong value), in one pass
    decode = jax.jit(functools.partial(sd_vae.decode, sd_vae.SDVAE(ae.cfg), chunk=0))
    mine = np.asarray(decode(ae.params, jnp.asarray(z / torch_vae.config.scaling_factor)))
    print(f"max abs diff: decode {np.abs(mine - raw).max():.2e} (output scale {np.abs(raw).max():.2f})")
    np.testing.assert_allclose(mine, raw, atol=TOL, rtol=0)


def test_round_trip_to_torch_names(ae, torch_vae):
    back = convert.flax_to_torch(ae.params, torch_vae.state_dict())
    want = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    assert back.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_legacy_attention_names_load(folder, ae, tmp_path):
    # older saves (SD 1.5's own vae/ files) name the mid attention query / key / value / proj_attn
    rename = dict(zip(convert.ATTENTION_NAMES["current"], convert.ATTENTION_NAMES["legacy"], strict=True))
    tensors = load_file(os.path.join(folder, convert.WEIGHTS_FILE))
    old = {}
    for k, v in tensors.items():
        for new, legacy in rename.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        old[k] = v
    assert any(k.endswith("attentions.0.proj_attn.weight") for k in old)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    save_file(old, str(tmp_path / convert.WEIGHTS_FILE))
    _, params = convert.load_params(str(tmp_path))
    flat, want = rb.flatten(params), rb.flatten(ae.params)
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(flat[k], np.asarray(want[k]), err_msg=k)


def test_missing_key_names_the_file_and_the_key(folder, tmp_path):
    key = "decoder.up_blocks.1.resnets.0.conv2.weight"
    tensors = load_file(os.path.join(folder, convert.WEIGHTS_FILE))
    del tensors[key]
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    save_file(tensors, str(tmp_path / convert.WEIGHTS_FILE))
    with pytest.raises(rb.ConversionError, match=r"(?s)diffusion_pytorch_model\.safetensors.*up_blocks.1.resnets.0"
                                                 r".conv2.weight"):
        convert.load_params(str(tmp_path))


def test_missing_weights_and_mismatched_config_fields(ae_config, tmp_path):
    shutil.copy(os.path.join(ae_config.path, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors: not found"):
        registry.make_autoencoder(ml_collections.ConfigDict({**ae_config.to_dict(), "path": str(tmp_path)}))
    with pytest.raises(ValueError, match=r"config\.autoencoder\.path: empty"):
        registry.make_autoencoder(ml_collections.ConfigDict({**ae_config.to_dict(), "path": ""}))
    with pytest.raises(ValueError, match=r"config\.autoencoder\.latent_channels: 16, but .*config\.json makes 4"):
        registry.make_autoencoder(ml_collections.ConfigDict({**ae_config.to_dict(), "latent_channels": 16}))
    with pytest.raises(ValueError, match=r"config\.autoencoder\.space_factor: 4, but"):
        registry.make_autoencoder(ml_collections.ConfigDict({**ae_config.to_dict(), "space_factor": 4}))


def test_config_checks_the_sd_autoencoder():
    config = config_lib.build(2, "tiny")
    # a time-grouping latent at the identity normalisation (the tiny stages' own is per frame and scaled)
    config.autoencoder.update(name="sd", time_factor=4, latent_channels=48, scaling_factor=1.0, shift_factor=0.0)
    with pytest.raises(config_lib.ConfigError, match=r"config\.autoencoder\.time_factor: 4 but the SD VAE is 2D"):
        config_lib.validate(config)
