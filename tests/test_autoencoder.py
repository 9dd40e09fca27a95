"""SpaceToDepth: exact round trip, the documented pixel <-> channel layout, causal frame grouping, errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax import config as config_lib
from ttm_jax.assembly import registry
from ttm_jax.models import autoencoder


def _video(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(dtype)


@pytest.mark.parametrize("tf,s,shape", [(4, 4, (2, 9, 8, 12, 3)), (2, 2, (1, 5, 6, 4, 3)), (1, 8, (1, 1, 8, 16, 3))])
def test_round_trip_is_bit_exact(tf, s, shape):
    ae = autoencoder.SpaceToDepth(time_factor=tf, space_factor=s)
    x = _video(shape)
    z = ae.encode(x)
    assert z.shape == (shape[0], 1 + (shape[1] - 1) // tf, shape[2] // s, shape[3] // s, 3 * s * s * tf)
    assert z.shape[-1] == ae.latent_channels
    np.testing.assert_array_equal(np.asarray(ae.decode(z)), x)


def test_normalised_latent_is_the_shifted_scaled_pixels_and_decodes_back():
    raw = autoencoder.SpaceToDepth(time_factor=1, space_factor=2)
    ae = autoencoder.SpaceToDepth(time_factor=1, space_factor=2, scaling_factor=4.0, shift_factor=-0.5)
    x = _video((2, 3, 4, 6, 3))
    z = np.asarray(ae.encode(x))
    np.testing.assert_array_equal(z, (np.asarray(raw.encode(x)) + 0.5) * 4.0)
    np.testing.assert_allclose(np.asarray(ae.decode(z)), x, atol=1e-6)
    # the config fields reach the registry's autoencoder
    cfg = config_lib.build(2, "tiny_unet").autoencoder
    cfg.update(scaling_factor=4.0, shift_factor=-0.5)
    np.testing.assert_array_equal(np.asarray(registry.make_autoencoder(cfg).encode(x)), z)
    with pytest.raises(ValueError, match=r"config\.autoencoder\.scaling_factor"):
        autoencoder.SpaceToDepth(scaling_factor=0.0)


def test_round_trip_inside_jit_keeps_bfloat16():
    ae = autoencoder.SpaceToDepth(time_factor=4, space_factor=2)
    x = jnp.asarray(_video((1, 5, 4, 6, 3)), jnp.bfloat16)
    z = jax.jit(ae.encode)(x)
    assert z.dtype == jnp.bfloat16
    y = jax.jit(ae.decode)(z)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))


def test_channel_layout_matches_documented_pixel_indexing():
    """Latent (t', y, x, channel (dt, dy, dx, c)) is pixel (frame, y*s+dy, x*s+dx, c), frame from causal grouping."""
    tf, s = 3, 2
    ae = autoencoder.SpaceToDepth(time_factor=tf, space_factor=s)
    x = _video((2, 1 + 2 * tf, 4, 6, 3), seed=1)
    z = np.asarray(ae.encode(x))
    rng = np.random.default_rng(2)
    for _ in range(200):
        b, lt, y, xx = (rng.integers(n) for n in z.shape[:4])
        dt, dy, dx, c = rng.integers(tf), rng.integers(s), rng.integers(s), rng.integers(3)
        frame = 0 if lt == 0 else 1 + (lt - 1) * tf + dt
        channel = ((dt * s + dy) * s + dx) * 3 + c
        assert z[b, lt, y, xx, channel] == x[b, frame, y * s + dy, xx * s + dx, c]


def test_causal_grouping_frame_k_changes_only_its_latent_frame():
    tf = 4
    ae = autoencoder.SpaceToDepth(time_factor=tf, space_factor=2)
    x = _video((1, 1 + 3 * tf, 4, 4, 3))
    z0 = np.asarray(ae.encode(x))
    for k in range(x.shape[1]):
        x2 = x.copy()
        x2[:, k] += 0.5
        changed = np.nonzero(np.any(np.asarray(ae.encode(x2)) != z0, axis=(0, 2, 3, 4)))[0].tolist()
        assert changed == [0 if k == 0 else 1 + (k - 1) // tf], k


def test_make_autoencoder_matches_config_latent_shape():
    config = config_lib.build(2, "tiny")
    ae = registry.make_autoencoder(config.autoencoder)
    assert isinstance(ae, autoencoder.Autoencoder)
    d = config.data
    z = jax.eval_shape(ae.encode, jax.ShapeDtypeStruct((2, d.num_frames, d.height, d.width, 3), jnp.float32))
    assert z.shape[1:] == config_lib.latent_shape(config)
    assert (ae.time_factor, ae.space_factor) == (config.autoencoder.time_factor, config.autoencoder.space_factor)


def test_bad_inputs_raise_naming_the_fix():
    ae = autoencoder.SpaceToDepth(time_factor=4, space_factor=4)
    with pytest.raises(ValueError, match=r"8 frames.*num_frames"):
        ae.encode(np.zeros((1, 8, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"10x8 is not divisible by space_factor=4"):
        ae.encode(np.zeros((1, 5, 10, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        ae.encode(np.zeros((1, 5, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match=r"192"):
        ae.decode(np.zeros((1, 2, 2, 2, 100), np.float32))
    with pytest.raises(ValueError, match="time_factor"):
        autoencoder.SpaceToDepth(time_factor=0)


def test_make_autoencoder_config_errors():
    cfg = config_lib.build(2, "tiny").autoencoder
    want = 3 * cfg.space_factor**2 * cfg.time_factor
    cfg.latent_channels = 7
    with pytest.raises(ValueError, match=rf"latent_channels: 7.*set it to {want}"):
        registry.make_autoencoder(cfg)
    cfg.name = "nope"
    with pytest.raises(ValueError, match="autoencoder.name"):
        registry.make_autoencoder(cfg)
    cfg.name = "wan"  # the Wan VAE always exists (no import guard); without weights it names the field to set
    cfg.path = ""
    with pytest.raises(ValueError, match=r"config\.autoencoder\.path: empty.*AutoencoderKLWan"):
        registry.make_autoencoder(cfg)
