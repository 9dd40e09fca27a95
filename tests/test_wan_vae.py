"""Wan 2.1 VAE: parity with diffusers' `AutoencoderKLWan` (the oracle), chunking, and the reversible converter.

One tiny random torch VAE with Wan 2.1's layout (4 levels, time downsampling at levels 2 and 3, so 4x time and 8x
space) but odd sizes: base_dim 8, z_dim 4, non-square 24x40 frames,
13 = 1 + 4*3 frames, random norm gains and biases (ones/zeros would hide a transposed or misplaced tensor).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors import safe_open

from ttm_jax.assembly import registry
from ttm_jax.backbones.wan import vae as wan_vae
from ttm_jax.backbones.wan import vae_weights as convert
from ttm_jax.convert import __main__ as convert_cli
from ttm_jax.weights import rulebook as rb

TORCH_CONFIG = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                    temperal_downsample=[False, True, True], latents_mean=[0.3, -0.7, 0.1, 1.2],
                    latents_std=[1.5, 0.6, 2.2, 0.9])
FRAMES, HEIGHT, WIDTH = 13, 24, 40  # latent [4, 3, 5]; mid-block attention over 15 positions
TOL = 1e-5


@pytest.fixture(scope="module")
def torch_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TORCH_CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        # shift two output channels near the edges of [-1, 1], so the final clamp matters
        vae.decoder.conv_out.bias.copy_(torch.tensor([0.95, -0.95, 0.0]))
    return vae


@pytest.fixture(scope="module")
def folder(torch_vae, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("wan_vae") / "vae")
    torch_vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def cfg(folder) -> wan_vae.WanVAEConfig:
    return wan_vae.read_config(folder)


@pytest.fixture(scope="module")
def params(folder, cfg):
    return convert.load_diffusers_folder(folder, cfg)


@pytest.fixture(scope="module")
def model(cfg) -> wan_vae.WanVAE:
    return wan_vae.WanVAE(cfg)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    t = np.linspace(0, 1, FRAMES)[:, None, None, None]
    y = np.linspace(-1, 1, HEIGHT)[None, :, None, None]
    x = np.linspace(-1, 1, WIDTH)[None, None, :, None]
    smooth = np.sin(3 * x + 2 * y + 4 * t + np.arange(3) * 1.3)  # moving content, so time layers matter
    noise = np.random.RandomState(0).uniform(-1, 1, (2, FRAMES, HEIGHT, WIDTH, 3))
    return np.clip(0.7 * smooth[None] + 0.3 * noise, -1, 1).astype(np.float32)  # [2, T, H, W, 3]


def _to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def _from_torch(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def torch_outputs(torch_vae, video):
    with torch.no_grad():
        mean = torch_vae.encode(_to_torch(video)).latent_dist.mode()
        z = 2.0 * mean  # more spread than the encoder's output
        recon = torch_vae.decode(z).sample
    return _from_torch(mean), _from_torch(z), _from_torch(recon)


@functools.cache
def _jitted(model: wan_vae.WanVAE, fn: str, chunk: int):
    f = wan_vae.encode if fn == "encode" else wan_vae.decode
    return jax.jit(functools.partial(f, model, chunk=chunk))


@pytest.fixture(scope="module")
def autoencoder(folder):
    """The project interface (`make_autoencoder`), chunked over time one latent frame at a time as diffusers."""
    config = ml_collections.ConfigDict(dict(name="wan", path=folder, latent_channels=4, time_factor=4,
                                            space_factor=8, dtype="float32", chunk_frames=1))
    return registry.make_autoencoder(config)


MEAN, STD = np.array(TORCH_CONFIG["latents_mean"]), np.array(TORCH_CONFIG["latents_std"])


@pytest.fixture(scope="module")
def interface_outputs(autoencoder, video, torch_outputs):
    return np.asarray(autoencoder.encode(video)), np.asarray(autoencoder.decode((torch_outputs[1] - MEAN) / STD))


def test_encode_matches_diffusers(autoencoder, interface_outputs, torch_outputs):
    want = torch_outputs[0]
    assert (autoencoder.time_factor, autoencoder.space_factor, autoencoder.latent_channels) == (4, 8, 4)
    got = interface_outputs[0]  # normalised by latents_mean / latents_std: what the DiT sees
    assert got.shape == (2, 1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8, 4) == want.shape
    assert np.abs(want).max() > 0.1  # not a degenerate oracle
    np.testing.assert_allclose(got * STD + MEAN, want, rtol=0, atol=TOL)


def test_decode_matches_diffusers(interface_outputs, torch_outputs):
    want = torch_outputs[2]
    got = interface_outputs[1]  # decode undid the normalisation
    assert got.shape == (2, FRAMES, HEIGHT, WIDTH, 3) == want.shape
    assert 0.01 < np.mean(np.abs(want) == 1.0) < 0.5 and want.std() > 0.1  # some clamped, most not
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("fn", ["encode", "decode"])
def test_one_pass_equals_chunked(model, params, video, torch_outputs, interface_outputs, fn):
    # the interface ran frame 0, then three chunks of one latent frame through the lax.scan with caches
    x = video if fn == "encode" else torch_outputs[1]
    one_pass = np.asarray(_jitted(model, fn, 0)(params, x))
    chunked = interface_outputs[1] if fn == "decode" else interface_outputs[0] * STD + MEAN
    np.testing.assert_allclose(one_pass, torch_outputs[0 if fn == "encode" else 2], rtol=0, atol=TOL)
    np.testing.assert_allclose(chunked, one_pass, rtol=0, atol=5e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["encode", "decode"])
def test_uneven_chunks_equal_one_pass(model, params, video, torch_outputs, fn):
    # chunk=2 over the 3 latent frames after frame 0: one scanned chunk of 2, then a shorter last chunk of 1
    x = video if fn == "encode" else torch_outputs[1]
    one_pass = np.asarray(_jitted(model, fn, 0)(params, x))
    np.testing.assert_allclose(np.asarray(_jitted(model, fn, 2)(params, x)), one_pass, rtol=0, atol=5e-6)


def test_causal(model, params, video):
    # changing the last 4 frames changes only the last latent frame; earlier latents never see the future
    other = video.copy()
    other[:, -4:] = -other[:, -4:]
    a = np.asarray(_jitted(model, "encode", 0)(params, video))
    b = np.asarray(_jitted(model, "encode", 0)(params, other))
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert np.abs(a[:, -1] - b[:, -1]).max() > 1e-3


def test_round_trip_bit_identical(torch_vae, cfg):
    sd = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    flax_params = convert.torch_to_flax(sd, cfg)
    back = convert.flax_to_torch(flax_params, sd)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k
    # the Flax tree is exactly the model's, leaf for leaf
    shapes = jax.tree.map(lambda s: (s.shape, s.dtype), convert.template(cfg))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), flax_params) == shapes


def test_folder_round_trip_loads_in_diffusers(torch_vae, folder, params, cfg, tmp_path):
    out = str(tmp_path / "vae_back")
    file = convert.save_diffusers_folder(params, cfg, out)
    with safe_open(file, framework="np") as f:  # the streamed file is valid for the real safetensors library
        keys = set(f.keys())
        assert keys == set(torch_vae.state_dict())
        assert f.metadata() == {"format": "pt"}
    reloaded = AutoencoderKLWan.from_pretrained(out).eval()
    assert reloaded.config.latents_mean == torch_vae.config.latents_mean
    for k, v in torch_vae.state_dict().items():
        assert reloaded.state_dict()[k].numpy().tobytes() == v.numpy().tobytes(), k


def test_cli_vae_round_trip(torch_vae, folder, tmp_path, capsys):
    convert_cli.convert([f"--from=diffusers-vae:{folder}", f"--to=diffusers-vae:{tmp_path / 'back'}"])
    assert "every tensor mapped" in capsys.readouterr().out
    with safe_open(str(tmp_path / "back" / convert.WEIGHTS_FILE), framework="np") as f:
        for k, v in torch_vae.state_dict().items():
            assert f.get_tensor(k).tobytes() == v.numpy().tobytes(), k


def test_make_autoencoder_errors(folder):
    config = ml_collections.ConfigDict(dict(name="wan", path=folder, latent_channels=16, time_factor=4,
                                            space_factor=8))
    with pytest.raises(ValueError, match=r"config\.autoencoder\.latent_channels: 16.*config\.json makes 4"):
        registry.make_autoencoder(config)
    config.path = ""
    with pytest.raises(ValueError, match=r"config\.autoencoder\.path: empty"):
        registry.make_autoencoder(config)


def test_bad_frame_count(model, params, video):
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        wan_vae.encode(model, params, video[:, :12])


def test_converter_names_every_problem(torch_vae, cfg, folder, tmp_path):
    sd = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    broken = dict(sd)
    del broken["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]
    broken["encoder.down_blocks.2.conv1.weight"] = sd["encoder.down_blocks.2.conv1.weight"][:, :, :1]
    broken["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(rb.ConversionError) as e:
        convert.torch_to_flax(broken, cfg)
    msg = str(e.value)
    assert "missing torch key 'decoder.up_blocks.1.upsamplers.0.time_conv.weight'" in msg
    assert "'encoder.down_blocks.2.conv1.weight'" in msg and "shape mismatch" in msg
    assert "unmapped torch key 'encoder.extra.weight'" in msg
    # a checkpoint of another architecture than its config.json says
    with open(os.path.join(folder, "config.json")) as f:
        other = json.load(f)
    other["num_res_blocks"] = 2
    (tmp_path / "config.json").write_text(json.dumps(other))
    os.symlink(os.path.join(folder, convert.WEIGHTS_FILE), tmp_path / convert.WEIGHTS_FILE)
    with pytest.raises(rb.ConversionError, match="does not match config.json"):
        convert.load_diffusers_folder(str(tmp_path))


def test_wan22_config_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "is_residual": True,
                                                      "z_dim": 48, "patch_size": 2}))
    with pytest.raises(ValueError, match=r"config\.json: is_residual=true is the Wan 2\.2 VAE"):
        wan_vae.read_config(str(tmp_path))


@pytest.mark.slow
def test_bfloat16_compute(cfg, params, video, torch_outputs):
    model16 = wan_vae.WanVAE(cfg, dtype=jnp.bfloat16)
    got = np.asarray(_jitted(model16, "encode", 0)(params, video)).astype(np.float32)
    want = torch_outputs[0]
    err = np.abs(got - want).max()
    # bfloat16 has 8 mantissa bits: close to the float32 oracle, but not float32-exact (so it really ran in bf16)
    assert 1e-4 < err < 0.05 * np.abs(want).max()


def test_real_wan21_layout_maps_every_key():
    # the released Wan 2.1 VAE's layout (diffusers defaults), on torch's meta device: shapes only, no memory
    with torch.device("meta"):
        real = AutoencoderKLWan()
    cfg = wan_vae.WanVAEConfig.from_diffusers(dict(real.config))
    assert (cfg.time_factor, cfg.space_factor, cfg.z_dim) == (4, 8, 16)
    specs = {k: (tuple(v.shape), np.float32) for k, v in real.state_dict().items()}
    moves = convert.RULES.plan(rb.flatten(convert.template(cfg)), specs, "torch -> flax")
    assert {m.torch_key for m in moves} == set(specs)
